"""Provider secrets: the read chain (db, env, filesystem) and shardworker's encrypted table.

Names follow Alga (``imap_password_<providerId>`` ...), so a secret Alga already holds in
its env or filesystem layout is found without copying it.  ``db`` rows are AES-GCM
envelopes bound to ``tenant|name``.  Values are returned to the caller only: never
logged, never put in an exception.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import psycopg
from psycopg.rows import TupleRow

from shardworker.config import Settings
from shardworker.db.store import Pool
from shardworker.errors import SecretError, SecretNotFoundError
from shardworker.logs import get_logger
from shardworker.secrets.crypto import Keyring

log = get_logger(__name__)

Connection = psycopg.Connection[TupleRow]

_UPSERT = (
    "INSERT INTO shardworker_secrets (tenant, provider_id, name, key_id, envelope) "
    "VALUES (%s::uuid, %s::uuid, %s, %s, %s) ON CONFLICT (tenant, name) DO UPDATE "
    "SET provider_id = EXCLUDED.provider_id, key_id = EXCLUDED.key_id, "
    "envelope = EXCLUDED.envelope, updated_at = now()"
)

# Alga's names, plus the access token which only shardworker caches.
_PREFIXES = {
    "password": "imap_password_",
    "oauth_client_secret": "imap_oauth_client_secret_",
    "refresh_token": "imap_refresh_token_",
    "access_token": "imap_access_token_",
}


# A prefetched value serves one get() within this time, then it is read afresh.
PREFETCH_TTL_S = 60.0


def secret_name(kind: str, provider_id: str) -> str:
    try:
        return _PREFIXES[kind] + provider_id
    except KeyError:
        raise SecretError(f"unknown secret kind {kind!r}; use one of {sorted(_PREFIXES)}") from None


def _aad(tenant: str, name: str) -> bytes:
    # Canonical uuid text, so an envelope written with any spelling of the tenant decrypts
    # with the spelling PostgreSQL returns (rotation reads it back from the table).
    try:
        canonical = str(uuid.UUID(tenant))
    except ValueError:
        raise SecretError(f"tenant must be a uuid, got {tenant!r}") from None
    return f"{canonical}|{name}".encode()


def _check_path_parts(tenant: str, name: str) -> None:
    """Tenant and name become path segments: refuse anything that could escape the base."""
    for part in (tenant, name):
        if not part or "/" in part or "\\" in part or part in (".", "..") or "\0" in part:
            raise SecretError(f"invalid tenant or secret name for a path: {part!r}")


class SecretStore:
    def __init__(
        self, settings: Settings, pool: Pool | None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        self._keyring = Keyring.from_setting(settings.secret_keys)
        self._chain = settings.secret_read_chain
        self._base = Path(settings.secret_fs_base_path)
        self._pool = pool
        self._environ = os.environ if environ is None else environ
        self._prefetched: dict[tuple[str, str], tuple[float, str]] = {}
        self._prefetch_lock = threading.Lock()

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    def get(self, tenant: str, provider_id: str, name: str) -> str:
        """The first value the chain yields; SecretNotFoundError names the sources tried."""
        prefetched = self._take_prefetched(tenant, name)
        if prefetched is not None:
            return prefetched
        tried: list[str] = []
        for source in self._chain:
            value = self._read(source, tenant, name)
            tried.append(source)
            if value is not None:
                return value
        raise SecretNotFoundError(
            f"secret {name} for tenant {tenant} (provider {provider_id}) not found; "
            f"tried {', '.join(tried) or 'no source'}"
        )

    def prefetch(self, wanted: Sequence[tuple[str, str]]) -> int:
        """Read many ``(tenant, name)`` secrets of the table in one query, each for the next
        ``get()`` of it (once, within ``PREFETCH_TTL_S``): a cold start reads thousands,
        one query and one pooled checkout each.  Only when the table is the chain's first
        source, so the precedence stays; a value it cannot decrypt is left for ``get()``
        to fail on loudly.  Returns how many were found.
        """
        if not wanted or self._pool is None or self._chain[:1] != ("db",):
            return 0
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT s.tenant::text, s.name, s.envelope FROM shardworker_secrets s "
                "JOIN unnest(%s::uuid[], %s::text[]) AS w(t, n) ON s.tenant = w.t AND s.name = w.n",
                ([t for t, _ in wanted], [n for _, n in wanted]),
            ).fetchall()
        expires = time.monotonic() + PREFETCH_TTL_S
        found: dict[tuple[str, str], tuple[float, str]] = {}
        for tenant, name, envelope in rows:
            try:
                found[(tenant, name)] = (
                    expires,
                    self._keyring.decrypt(envelope, _aad(tenant, name)),
                )
            except SecretError:
                continue
        with self._prefetch_lock:
            now = time.monotonic()
            self._prefetched = {k: v for k, v in self._prefetched.items() if v[0] > now}
            self._prefetched.update(found)
        return len(found)

    def _take_prefetched(self, tenant: str, name: str) -> str | None:
        if not self._prefetched:
            return None
        try:
            key = (str(uuid.UUID(tenant)), name)
        except ValueError:
            return None
        with self._prefetch_lock:
            entry = self._prefetched.pop(key, None)
        return entry[1] if entry is not None and entry[0] > time.monotonic() else None

    def _read(self, source: str, tenant: str, name: str) -> str | None:
        if source == "db":
            return self._read_db(tenant, name)
        if source == "env":
            value = self._environ.get(f"TENANT_{tenant}_{name}")
            return value if value else None
        if source == "filesystem":
            return self._read_file(tenant, name)
        raise SecretError(f"unknown secret source {source!r}")

    def _read_db(self, tenant: str, name: str) -> str | None:
        if self._pool is None:
            return None
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT envelope FROM shardworker_secrets WHERE tenant = %s::uuid AND name = %s",
                (tenant, name),
            ).fetchone()
        if row is None:
            return None
        # A wrong or missing key is loud: falling through to another source would hide it.
        return self._keyring.decrypt(str(row[0]), _aad(tenant, name))

    def _read_file(self, tenant: str, name: str) -> str | None:
        _check_path_parts(tenant, name)
        path = self._base / "tenants" / tenant / name
        try:
            value = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SecretError(f"cannot read secret file for {name}: {exc.strerror}") from None
        return value or None

    def put(
        self,
        tenant: str,
        provider_id: str,
        name: str,
        value: str,
        *,
        conn: Connection | None = None,
    ) -> None:
        """Store (or replace) a secret in shardworker's table, encrypted with the newest key.

        With ``conn`` the write joins the caller's transaction (a provider and its secrets
        are written all or nothing).
        """
        envelope = self._keyring.encrypt(value, _aad(tenant, name))
        params = (tenant, provider_id, name, self._keyring.newest_kid, envelope)
        self._take_prefetched(tenant, name)  # a value read before this write is stale
        if conn is not None:
            conn.execute(_UPSERT, params)
        else:
            with self._require_pool().connection() as own:
                own.execute(_UPSERT, params)
        log.info("secret_stored", tenant=tenant, provider_id=provider_id, name=name)

    def delete(self, tenant: str, name: str, *, conn: Connection) -> None:
        """Remove one secret from shardworker's table, in the caller's transaction."""
        conn.execute(
            "DELETE FROM shardworker_secrets WHERE tenant = %s::uuid AND name = %s", (tenant, name)
        )

    def delete_provider_secrets(
        self, tenant: str, provider_id: str, *, conn: Connection | None = None
    ) -> int:
        query = "DELETE FROM shardworker_secrets WHERE tenant = %s::uuid AND provider_id = %s::uuid"
        if conn is not None:
            return conn.execute(query, (tenant, provider_id)).rowcount
        with self._require_pool().connection() as own:
            return own.execute(query, (tenant, provider_id)).rowcount

    def rotate_keys(self) -> int:
        """Re-encrypt every secret not under the newest key, in one transaction."""
        newest = self._keyring.newest_kid
        with self._require_pool().connection() as conn, conn.transaction():
            # Spans tenants by nature (an operator command); Citus runs it on every shard.
            rows = conn.execute(
                "SELECT tenant::text, name, envelope FROM shardworker_secrets "
                "WHERE key_id <> %s ORDER BY tenant, name",
                (newest,),
            ).fetchall()
            count = 0
            for tenant, name, envelope in rows:
                aad = _aad(tenant, name)
                fresh = self._keyring.encrypt(self._keyring.decrypt(envelope, aad), aad)
                cur = conn.execute(
                    "UPDATE shardworker_secrets SET key_id = %s, envelope = %s, updated_at = now()"
                    " WHERE tenant = %s::uuid AND name = %s AND envelope = %s",
                    (newest, fresh, tenant, name, envelope),
                )
                count += cur.rowcount
        log.info("secrets_rotated", count=count, kid=newest)
        return count

    def _require_pool(self) -> Pool:
        if self._pool is None:
            raise SecretError("the secret table needs a database pool")
        return self._pool
