"""Plain values the Store returns, and the parsing of Alga's loosely typed columns.

Alga stores UIDs as strings (``varchar`` columns and JSON strings in ``folder_state``) and
``folder_filters`` as JSON; the parsing here is lenient (a malformed entry is ignored,
never fatal) because the rows are written by another service.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson


@dataclass(frozen=True)
class FolderCursor:
    uid_validity: int
    last_uid: int


@dataclass(frozen=True)
class LedgerEntry:
    uid: int
    message_id: str
    stream_id: str | None
    status: str  # published | duplicate | dead_lettered | skipped (the loop policy)
    reason: str | None = None


@dataclass(frozen=True)
class ProviderConfig:
    """One IMAP provider (both Alga rows). Holds no secret: those live in the secret store."""

    tenant: str
    provider_id: str
    provider_name: str
    mailbox: str
    host: str
    port: int
    secure: bool
    allow_starttls: bool
    auth_type: str
    username: str
    folder_filters: tuple[str, ...]
    max_emails_per_sync: int
    auto_process_emails: bool
    connection_timeout_ms: int | None
    oauth_token_url: str | None
    oauth_client_id: str | None
    oauth_scopes: str | None
    token_expires_at: datetime | None
    paused: bool
    pause_reason: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    # Changes exactly when a setting the engine acts on changes (see ``config_version``).
    version: str
    cursors: Mapping[str, FolderCursor] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> str:
        """The provider's identity in the pool (see :func:`provider_key`)."""
        return provider_key(self.tenant, self.provider_id)


def provider_key(tenant: str, provider_id: str) -> str:
    """A provider's identity everywhere in the pool: ``<tenant>:<provider_id>``.

    Alga's provider ids are unique only within a tenant, so the assignment, the held-lease
    map, the engine and command routing all key by the pair, never by the id alone.
    """
    return f"{tenant}:{provider_id}"


def split_key(key: str) -> tuple[str, str]:
    """``(tenant, provider_id)`` of a :func:`provider_key`."""
    tenant, sep, provider_id = key.partition(":")
    if not sep or not tenant or not provider_id:
        raise ValueError(f"not a provider key (tenant:provider_id): {key!r}")
    return tenant, provider_id


# The fields whose change must make the engine rebuild a provider's sessions.  Deliberately
# not ``updated_at``: Alga and shardworker both bump it on every cursor write and status
# change, which would look like a config edit after every batch.
VERSIONED_FIELDS = (
    "provider_name", "mailbox", "host", "port", "secure", "allow_starttls", "auth_type",
    "username", "folder_filters", "max_emails_per_sync", "auto_process_emails",
    "connection_timeout_ms", "oauth_token_url", "oauth_client_id", "oauth_scopes", "paused",
    "pause_reason",
)  # fmt: skip


def config_version(values: Mapping[str, Any]) -> str:
    blob = orjson.dumps([values[name] for name in VERSIONED_FIELDS])
    return hashlib.sha256(blob).hexdigest()[:16]


def as_uid(value: object) -> int | None:
    """A UID or UIDVALIDITY from Alga's strings (or numbers); None when not a valid one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def parse_cursors(
    folder_state: object, top_uid_validity: object, top_last_uid: object
) -> dict[str, FolderCursor]:
    cursors: dict[str, FolderCursor] = {}
    if isinstance(folder_state, dict):
        for folder, entry in folder_state.items():
            if not isinstance(entry, dict):
                continue
            uid_validity, last_uid = (
                as_uid(entry.get("uid_validity")),
                as_uid(entry.get("last_uid")),
            )
            if uid_validity is not None and last_uid is not None:
                cursors[str(folder)] = FolderCursor(uid_validity, last_uid)
    if "INBOX" not in cursors:
        # Alga's older rows only have the top-level columns, which mirror INBOX.
        uid_validity, last_uid = as_uid(top_uid_validity), as_uid(top_last_uid)
        if uid_validity is not None and last_uid is not None:
            cursors["INBOX"] = FolderCursor(uid_validity, last_uid)
    return cursors


def parse_folder_filters(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        # Some writers double-encode (a JSON string holding a JSON array).
        text = value
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            return (text,) if text.strip() else ()
    if not isinstance(value, list):
        return ()
    return tuple(str(v) for v in value if isinstance(v, str) and v.strip())
