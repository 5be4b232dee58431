"""How the engine answers a failed cycle: one decision per error class, made once.

* lease lost or fenced → stop the provider at once;
* auth rejected → provider-wide auth backoff, counted once per window; pause at the
  threshold (no further logins until resumed);
* folder missing or unselectable → park the folder and re-probe it later;
* our side failed (Redis, PostgreSQL) → keep the IMAP session, retry the drain;
* the server throttled us (Exchange, Gmail's bandwidth limit) → close, wait the time it
  asked for; neither an error nor an auth failure, and the backoff counters stay;
* anything else (network, protocol, secrets) → close, back off, report the error.

:class:`FailurePolicy` only decides (it advances the backoff counters, which are its own
bookkeeping); the engine loop applies the :class:`Decision`: timers, sessions, reports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import psycopg
from psycopg_pool import PoolTimeout

from shardworker.config import Settings
from shardworker.engine.state import ProviderRuntime, Slot
from shardworker.errors import (
    DatabaseUnavailableError,
    FencedError,
    FolderError,
    ImapAuthError,
    ImapThrottledError,
    LeaseLostError,
    PublishError,
    SecretError,
    ShardworkerError,
    StoreError,
    TokenPendingError,
)
from shardworker.imap.connect import classify_error


class Action(enum.Enum):
    STOP_PROVIDER = "stop_provider"
    AUTH_BACKOFF = "auth_backoff"
    PARK = "park"
    RETRY_DRAIN = "retry_drain"
    RECONNECT = "reconnect"
    WAIT = "wait"  # not a failure: try again shortly, backoff and status untouched
    THROTTLE = "throttle"


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float = 0.0
    # AUTH_BACKOFF: the first failure of a backoff window, which counts towards the pause
    # threshold; later ones inside the window only wait for its end.
    count_auth_failure: bool = False


def classify_failure(exc: BaseException) -> ShardworkerError:
    """The shardworker error for an unexpected exception out of a sync cycle.

    PostgreSQL's own failures are a dependency (database) failure, never the mailbox's:
    psycopg_pool's ``PoolTimeout`` (no connection within the pool timeout, as when the
    server went silent) and psycopg's ``OperationalError`` become a
    ``DatabaseUnavailableError`` (a ``StoreError``: the IMAP session is kept and the drain
    retried).  Everything else goes through the IMAP classification.
    """
    if isinstance(exc, ShardworkerError):
        return exc
    if isinstance(exc, PoolTimeout):
        return DatabaseUnavailableError(f"PostgreSQL pool: {exc}", reason="db_pool_timeout")
    if isinstance(exc, psycopg.OperationalError):
        return DatabaseUnavailableError(
            f"PostgreSQL: {type(exc).__name__}: {exc}", reason="db_unavailable"
        )
    return classify_error(exc)


def error_reason(err: ShardworkerError) -> str:
    reason = getattr(err, "reason", None) or getattr(err, "code", None) or type(err).__name__
    return str(reason)


def scrub_secret(text: str, rt: ProviderRuntime) -> str:
    """A hostile server may echo the password back in a garbled reply after login: the
    message goes to logs and to the provider row, so the secret is blanked first."""
    creds = rt.credentials
    if creds is not None and len(creds.secret) >= 4 and creds.secret in text:
        return text.replace(creds.secret, "***")
    return text


class FailurePolicy:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def decide(self, slot: Slot, err: ShardworkerError, now: float) -> Decision:
        if isinstance(err, TokenPendingError):  # the refresh runs on its own threads
            return Decision(Action.WAIT, err.retry_s)
        if isinstance(err, FencedError | LeaseLostError):
            return Decision(Action.STOP_PROVIDER)
        if isinstance(err, ImapThrottledError):
            # Honoured as asked: Exchange often hangs up after the answer, so reconnect.
            return Decision(Action.THROTTLE, err.retry_after_s)
        if isinstance(err, ImapAuthError):
            return self._auth(slot.provider, now)
        if isinstance(err, FolderError) and not slot.resolving:
            return Decision(Action.PARK, self.settings.folder_reprobe_s)
        if isinstance(err, PublishError | StoreError) and slot.connected:
            # Our side failed, not the mailbox: keep the IMAP session, retry the drain.
            return Decision(Action.RETRY_DRAIN, slot.backoff.failure(now))
        delay = slot.backoff.failure(now)
        if isinstance(err, SecretError):
            delay = max(delay, self.settings.auth_backoff_base_s)
        return Decision(Action.RECONNECT, delay)

    @staticmethod
    def _auth(rt: ProviderRuntime, now: float) -> Decision:
        if now < rt.auth_blocked_until:
            return Decision(Action.AUTH_BACKOFF, rt.auth_blocked_until - now)
        return Decision(Action.AUTH_BACKOFF, rt.auth_backoff.failure(now), count_auth_failure=True)
