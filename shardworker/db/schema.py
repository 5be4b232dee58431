"""The schema shardworker needs: Alga's two provider tables, and its own versioned tables.

Alga's ``email_providers`` and ``imap_email_provider_config`` are created exactly as in
``alga-contract.md`` §3 only when absent (a standalone deployment).  When Alga created
them they are never altered, only checked for the columns shardworker reads and writes.
shardworker's own tables come as numbered steps so later versions can be appended.
On Citus every tenant-keyed table is distributed by ``tenant`` (Alga does the same).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

# The pause CHECK spells out ``reason IS NOT NULL``: Alga's ``reason IN (...)`` alone is
# NULL (so passes) for a pause without a reason, breaking "both null or both set".
ALGA_EMAIL_PROVIDERS = """
CREATE TABLE email_providers (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    tenant uuid NOT NULL,
    provider_type varchar(50) NOT NULL,
    provider_name varchar(255) NOT NULL,
    mailbox varchar(255) NOT NULL,
    is_active boolean DEFAULT true,
    status text DEFAULT 'configuring'
        CONSTRAINT email_providers_status_check
        CHECK (status IN ('connected', 'disconnected', 'error', 'configuring')),
    last_sync_at timestamptz,
    error_message text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    inbound_ticket_defaults_id uuid,
    sender_display_name varchar(255),
    inbound_paused_at timestamptz,
    inbound_pause_reason text,
    inbound_auth_failure_count integer NOT NULL DEFAULT 0,
    inbound_auth_failure_last_at timestamptz,
    inbound_auth_failure_code text,
    CONSTRAINT email_providers_pkey PRIMARY KEY (id, tenant),
    CONSTRAINT email_providers_tenant_mailbox_unique UNIQUE (tenant, mailbox),
    CONSTRAINT email_providers_inbound_pause_reason_check CHECK (
        (inbound_paused_at IS NULL AND inbound_pause_reason IS NULL)
        OR (inbound_paused_at IS NOT NULL AND inbound_pause_reason IS NOT NULL
            AND inbound_pause_reason IN ('manual', 'tenant_cancelled', 'auth_failure'))
    )
);
CREATE INDEX email_providers_tenant_is_active_index ON email_providers (tenant, is_active);
CREATE INDEX email_providers_tenant_provider_type_index
    ON email_providers (tenant, provider_type);
CREATE INDEX email_providers_tenant_mailbox_index ON email_providers (tenant, mailbox);
"""

ALGA_IMAP_CONFIG = """
CREATE TABLE imap_email_provider_config (
    email_provider_id uuid NOT NULL,
    tenant uuid NOT NULL,
    host varchar(255) NOT NULL,
    port integer NOT NULL,
    secure boolean DEFAULT true,
    allow_starttls boolean DEFAULT false,
    auth_type varchar(50) NOT NULL,
    username varchar(255) NOT NULL,
    auto_process_emails boolean DEFAULT true,
    max_emails_per_sync integer DEFAULT 50,
    folder_filters jsonb DEFAULT '[]'::jsonb,
    oauth_authorize_url text,
    oauth_token_url text,
    oauth_client_id varchar(255),
    oauth_client_secret text,
    oauth_scopes text,
    access_token text,
    refresh_token text,
    token_expires_at timestamptz,
    uid_validity varchar(255),
    last_uid varchar(255),
    last_seen_at timestamptz,
    last_sync_at timestamptz,
    last_error text,
    folder_state jsonb DEFAULT '{}'::jsonb,
    last_processed_message_id text,
    server_capabilities jsonb DEFAULT '[]'::jsonb,
    lease_owner varchar(255),
    lease_expires_at timestamptz,
    connection_timeout_ms integer,
    socket_keepalive boolean,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT imap_email_provider_config_pkey PRIMARY KEY (email_provider_id, tenant)
);
CREATE INDEX idx_imap_email_config_tenant ON imap_email_provider_config (tenant);
CREATE INDEX idx_imap_email_config_tenant_provider
    ON imap_email_provider_config (tenant, email_provider_id);
"""

# Alga's tables in creation order, with their DDL.
ALGA_TABLES: Mapping[str, str] = {
    "email_providers": ALGA_EMAIL_PROVIDERS,
    "imap_email_provider_config": ALGA_IMAP_CONFIG,
}

# Every column of Alga's tables that the Store reads or writes; verified when Alga owns them.
REQUIRED_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "email_providers": (
        "id",
        "tenant",
        "provider_type",
        "provider_name",
        "mailbox",
        "is_active",
        "status",
        "last_sync_at",
        "error_message",
        "updated_at",
        "inbound_paused_at",
        "inbound_pause_reason",
        "inbound_auth_failure_count",
        "inbound_auth_failure_last_at",
        "inbound_auth_failure_code",
    ),
    "imap_email_provider_config": (
        "email_provider_id",
        "tenant",
        "host",
        "port",
        "secure",
        "allow_starttls",
        "auth_type",
        "username",
        "auto_process_emails",
        "max_emails_per_sync",
        "folder_filters",
        "oauth_token_url",
        "oauth_client_id",
        "oauth_scopes",
        "token_expires_at",
        "uid_validity",
        "last_uid",
        "last_seen_at",
        "last_sync_at",
        "last_error",
        "folder_state",
        "last_processed_message_id",
        "server_capabilities",
        "lease_owner",
        "lease_expires_at",
        "connection_timeout_ms",
        "updated_at",
    ),
}

SHARDWORKER_V1 = """
CREATE TABLE shardworker_schema_version (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE shardworker_ledger (
    tenant uuid NOT NULL,
    provider_id uuid NOT NULL,
    folder text NOT NULL,
    uid_validity bigint NOT NULL,
    uid bigint NOT NULL,
    message_id text NOT NULL,
    stream_id text,
    status text NOT NULL CHECK (status IN ('published', 'duplicate', 'dead_lettered')),
    reason text,
    published_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, provider_id, folder, uid_validity, uid)
);
CREATE INDEX shardworker_ledger_message_id_idx
    ON shardworker_ledger (tenant, provider_id, message_id);
CREATE TABLE shardworker_secrets (
    tenant uuid NOT NULL,
    provider_id uuid NOT NULL,
    name text NOT NULL,
    key_id text NOT NULL,
    envelope text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);
CREATE TABLE shardworker_provider_state (
    tenant uuid NOT NULL,
    provider_id uuid NOT NULL,
    fencing_epoch bigint NOT NULL DEFAULT 0,
    owner text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, provider_id)
);
"""

# v2: the loop policy's "skip" records the message as 'skipped' with its reason.  The
# constraint v1 created unnamed carries PostgreSQL's default name; dropping it "IF EXISTS"
# and adding it by that name works on a v1 database and on a fresh one alike.
SHARDWORKER_V2 = """
ALTER TABLE shardworker_ledger DROP CONSTRAINT IF EXISTS shardworker_ledger_status_check;
ALTER TABLE shardworker_ledger ADD CONSTRAINT shardworker_ledger_status_check
    CHECK (status IN ('published', 'duplicate', 'dead_lettered', 'skipped'));
"""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str
    # Tables this step creates that carry a ``tenant`` column (distributed on Citus).
    tenant_tables: tuple[str, ...] = ()


# The control plane picks provider changes up by ``updated_at`` (and Alga leases running
# out by ``lease_expires_at``) instead of reading every row each round: these indexes make
# those reads proportional to what changed.  They are the only objects shardworker adds to
# Alga's tables, and change nothing Alga reads or writes.
SHARDWORKER_V3 = """
CREATE INDEX IF NOT EXISTS shardworker_email_providers_updated_at
    ON email_providers (updated_at);
CREATE INDEX IF NOT EXISTS shardworker_imap_config_updated_at
    ON imap_email_provider_config (updated_at);
CREATE INDEX IF NOT EXISTS shardworker_imap_config_lease_expires_at
    ON imap_email_provider_config (lease_expires_at);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "shardworker tables: schema_version, ledger, secrets, provider_state",
        SHARDWORKER_V1,
        ("shardworker_ledger", "shardworker_secrets", "shardworker_provider_state"),
    ),
    Migration(2, "ledger status 'skipped' (loop policy)", SHARDWORKER_V2),
    Migration(
        3, "indexes for incremental provider reads (updated_at, lease expiry)", SHARDWORKER_V3
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version


@dataclass(frozen=True)
class Step:
    """One planned change: ``version`` is set for shardworker's numbered migrations."""

    description: str
    sql: str
    version: int | None = None
    # False for session settings that change nothing in the catalog.
    reported: bool = True


def distribute_sql(table: str) -> str:
    return f"SELECT create_distributed_table('{table}', 'tenant')"


def plan(missing_alga: Collection[str], applied: Collection[int], citus: bool) -> list[Step]:
    """The changes to bring a database to the latest schema, in order (pure, testable)."""
    steps: list[Step] = []
    if citus and (missing_alga or any(m.version not in applied for m in MIGRATIONS)):
        # Citus' documented recipe for distributing tables inside a transaction block.
        steps.append(
            Step(
                "citus: sequential shard DDL",
                "SET LOCAL citus.multi_shard_modify_mode TO 'sequential'",
                reported=False,
            )
        )
    for table, ddl in ALGA_TABLES.items():
        if table in missing_alga:
            steps.append(Step(f"created Alga table {table} (absent)", ddl))
            if citus:
                steps.append(Step(f"citus: distributed {table} by tenant", distribute_sql(table)))
    for migration in MIGRATIONS:
        if migration.version in applied:
            continue
        steps.append(
            Step(f"v{migration.version}: {migration.description}", migration.sql, migration.version)
        )
        if citus:
            steps.extend(
                Step(f"citus: distributed {table} by tenant", distribute_sql(table))
                for table in migration.tenant_tables
            )
    return steps


def missing_columns(present: Mapping[str, Collection[str]]) -> list[str]:
    """``table.column`` names shardworker needs that ``present`` (table → columns) lacks."""
    missing: list[str] = []
    for table, columns in REQUIRED_COLUMNS.items():
        have = present.get(table, ())
        missing.extend(f"{table}.{c}" for c in columns if c not in have)
    return missing


def describe_missing(missing: Sequence[str]) -> str:
    return (
        "existing Alga tables lack column(s) shardworker needs: "
        + ", ".join(missing)
        + " (upgrade Alga's migrations first; shardworker never alters Alga's tables)"
    )
