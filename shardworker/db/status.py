"""Provider status write-back, coalesced and batched.

A cold start or a failover connects thousands of providers within seconds; writing
``status``, ``server_capabilities`` and the auth-failure reset one provider at a time
cost more than the IMAP work itself.  ``StatusWriter`` keeps only the latest pending state
per provider and flushes everything every ``interval_s`` in one transaction (two
``UPDATE … FROM unnest(…)`` statements), from its own thread with a stop path.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from shardworker.db.store import PAUSE_REASONS, STATUSES
from shardworker.logs import get_logger

log = get_logger(__name__)


@dataclass
class _Pending:
    status: str | None = None
    error: str | None = None
    capabilities: list[str] | None = None
    clear_auth_failures: bool = False


_UPDATE_PROVIDERS = """
UPDATE email_providers p SET
  status = COALESCE(x.status, p.status),
  error_message = CASE WHEN x.status IS NULL THEN p.error_message ELSE x.error END,
  inbound_auth_failure_count = CASE WHEN x.clear THEN 0 ELSE p.inbound_auth_failure_count END,
  updated_at = now()
FROM unnest(%(tenants)s::uuid[], %(pids)s::uuid[], %(statuses)s::text[], %(errors)s::text[],
            %(clears)s::bool[]) AS x(t, p, status, error, clear)
WHERE p.tenant = x.t AND p.id = x.p
"""

_PAUSE_PROVIDER = """
UPDATE email_providers SET
  inbound_paused_at = COALESCE(inbound_paused_at, now()), inbound_pause_reason = %(reason)s,
  status = 'error', error_message = %(error)s, updated_at = now()
WHERE tenant = %(tenant)s::uuid AND id = %(pid)s::uuid
"""

_PAUSE_CONFIG = """
UPDATE imap_email_provider_config SET last_error = %(error)s
WHERE tenant = %(tenant)s::uuid AND email_provider_id = %(pid)s::uuid
"""

_UPDATE_CONFIGS = """
UPDATE imap_email_provider_config c SET
  last_error = CASE WHEN x.status IS NULL THEN c.last_error ELSE x.error END,
  server_capabilities = COALESCE(x.caps, c.server_capabilities)
FROM unnest(%(tenants)s::uuid[], %(pids)s::uuid[], %(statuses)s::text[], %(errors)s::text[],
            %(caps)s::jsonb[]) AS x(t, p, status, error, caps)
WHERE c.tenant = x.t AND c.email_provider_id = x.p
"""


class StatusWriter:
    def __init__(self, pool: ConnectionPool, interval_s: float = 0.25) -> None:
        self._pool = pool
        self._interval_s = interval_s
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and write what is still pending."""
        self._stop.set()
        self._thread.join(timeout_s)
        self.flush()

    def status(self, tenant: str, provider_id: str, status: str, error: str | None) -> None:
        """Alga's connection status; ``error`` must already be free of secrets."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}, got {status!r}")
        with self._lock:
            pending = self._pending.setdefault((tenant, provider_id), _Pending())
            pending.status, pending.error = status, error

    def connected(self, tenant: str, provider_id: str, capabilities: Sequence[str]) -> None:
        """A login succeeded: record the capabilities and reset the auth-failure count."""
        with self._lock:
            pending = self._pending.setdefault((tenant, provider_id), _Pending())
            pending.capabilities = list(capabilities)
            pending.clear_auth_failures = True

    def clear_auth_failures(self, tenant: str, provider_id: str) -> None:
        """A login with the current credentials succeeded: reset the auth-failure count."""
        with self._lock:
            self._pending.setdefault((tenant, provider_id), _Pending()).clear_auth_failures = True

    def paused(self, tenant: str, provider_id: str, reason: str, error: str) -> None:
        """Pause the provider and set its error now, in one transaction (not batched).

        A pause must hold before the pool's next read of the provider rows, and a status
        still pending for it must not land afterwards and hide the error: it is dropped.
        """
        if reason not in PAUSE_REASONS:
            raise ValueError(f"pause reason must be one of {sorted(PAUSE_REASONS)}, got {reason!r}")
        with self._lock:
            pending = self._pending.get((tenant, provider_id))
            if pending is not None:
                pending.status = pending.error = None
        params = {"tenant": tenant, "pid": provider_id, "reason": reason, "error": error}
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(_PAUSE_PROVIDER, params)
            conn.execute(_PAUSE_CONFIG, params)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.flush()
            except Exception:  # status is advisory: retried on the next tick
                log.error("status_flush_failed", exc=True)

    def flush(self) -> int:
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        keys = list(batch)
        rows = [batch[k] for k in keys]
        params = {
            "tenants": [t for t, _ in keys], "pids": [p for _, p in keys],
            "statuses": [r.status for r in rows], "errors": [r.error for r in rows],
            "clears": [r.clear_auth_failures for r in rows],
            "caps": [None if r.capabilities is None else Jsonb(r.capabilities) for r in rows],
        }  # fmt: skip
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute(_UPDATE_PROVIDERS, params)
                conn.execute(_UPDATE_CONFIGS, params)
        except Exception:
            self._requeue(batch)
            raise
        return len(keys)

    def _requeue(self, batch: dict[tuple[str, str], _Pending]) -> None:
        """Put a failed batch back under anything newer that arrived meanwhile."""
        with self._lock:
            for key, old in batch.items():
                self._pending.setdefault(key, old)
