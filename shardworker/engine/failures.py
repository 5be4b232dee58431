"""How the engine answers a failed cycle: one decision per error class, made once.

* lease lost or fenced → stop the provider at once;
* auth rejected → provider-wide auth backoff, counted once per window; pause at the
  threshold (no further logins until resumed);
* folder missing or unselectable → park the folder and re-probe it later;
* our side failed (Redis, PostgreSQL) → keep the IMAP session, retry the drain;
* anything else (network, protocol, secrets) → close, back off, report the error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shardworker import metrics
from shardworker.config import Settings
from shardworker.engine.cycle import CycleDeps
from shardworker.engine.state import ProviderRuntime, Slot
from shardworker.errors import (
    FencedError,
    FolderError,
    ImapAuthError,
    LeaseLostError,
    PublishError,
    SecretError,
    ShardworkerError,
    StoreError,
    TokenPendingError,
    TokenRefreshError,
)
from shardworker.imap.session import State
from shardworker.logs import get_logger

log = get_logger("shardworker.engine.loop")


def scrub_secret(text: str, rt: ProviderRuntime) -> str:
    """A hostile server may echo the password back in a garbled reply after login: the
    message goes to logs and to the provider row, so the secret is blanked first."""
    creds = rt.credentials
    if creds is not None and len(creds.secret) >= 4 and creds.secret in text:
        return text.replace(creds.secret, "***")
    return text


class FailurePolicy:
    """Mixed into Engine; the attributes and methods below are the Engine's."""

    settings: Settings
    deps: CycleDeps
    providers: dict[str, ProviderRuntime]
    clock: Callable[[], float]
    stats: Any

    def post(self, fn: Callable[[], None]) -> None:
        raise NotImplementedError

    def _stop_provider(self, rt: ProviderRuntime, *, immediate: bool) -> None:
        raise NotImplementedError

    def _set_timer(self, slot: Slot, delay_s: float) -> None:
        raise NotImplementedError

    def _update_parked(self, rt: ProviderRuntime) -> None:
        raise NotImplementedError

    def _report(self, rt: ProviderRuntime, status: str, error: str | None) -> None:
        raise NotImplementedError

    def _background(self, fn: Callable[..., Any], *args: Any) -> None:
        raise NotImplementedError

    def _on_error(self, slot: Slot, err: ShardworkerError) -> None:
        if isinstance(err, TokenPendingError):  # not a failure: the refresh runs elsewhere
            slot.state = State.BACKOFF
            self._set_timer(slot, err.retry_s)
            return
        rt, now = slot.provider, self.clock()
        reason = getattr(err, "reason", None) or getattr(err, "code", None) or type(err).__name__
        self.stats.errors[str(reason)] += 1
        metrics.session_error(err)
        was_connected = slot.connected
        text = scrub_secret(str(err), rt)
        slot.last_error = f"{type(err).__name__}: {text}"
        log.warning(
            "session_error",
            **slot.log_fields(),
            error_type=type(err).__name__,
            reason=str(reason),
            error=text,
        )
        if isinstance(err, FencedError | LeaseLostError):
            self._stop_provider(rt, immediate=True)
        elif isinstance(err, ImapAuthError):
            self._on_auth_failure(slot, err, now)
        elif isinstance(err, FolderError) and not slot.resolving:
            slot.session.close(logout=False)
            slot.state = State.PARKED
            self._set_timer(slot, self.settings.folder_reprobe_s)
            if slot.folder not in rt.missing_folders:
                rt.missing_folders += (slot.folder,)
            self._update_parked(rt)
            self._report(rt, "connected", rt.parked_detail)
        elif isinstance(err, PublishError | StoreError) and slot.connected:
            # Our side failed, not the mailbox: keep the IMAP session, retry the drain.
            slot.state = State.BACKOFF
            self._set_timer(slot, slot.backoff.failure(now))
        else:
            slot.session.close(logout=False)
            slot.state = State.BACKOFF
            delay = slot.backoff.failure(now)
            if isinstance(err, SecretError):
                delay = max(delay, self.settings.auth_backoff_base_s)
            self._set_timer(slot, delay)
            self._report(rt, "error", slot.last_error)
        if was_connected and not slot.connected:
            log.info("disconnected", **slot.log_fields(), reason=str(reason))

    def _on_auth_failure(self, slot: Slot, err: ImapAuthError, now: float) -> None:
        rt = slot.provider
        slot.session.close(logout=False)
        slot.state = State.BACKOFF
        rt.credentials = None
        rt.force_token_refresh = True  # an OAuth2 token may have expired or been revoked
        if now < rt.auth_blocked_until:
            self._set_timer(slot, rt.auth_blocked_until - now)
            return
        delay = rt.auth_backoff.failure(now)
        rt.auth_blocked_until = now + delay
        self._set_timer(slot, delay)
        cfg, threshold = rt.config, self.settings.auth_failure_pause_threshold

        def record() -> None:
            paused = self.deps.store.record_auth_failure(
                cfg.tenant, cfg.provider_id, err.code, threshold
            )
            # A rejected refresh token has already paused the provider (shardworker.oauth).
            paused = paused or (isinstance(err, TokenRefreshError) and err.code == "invalid_grant")
            self.post(lambda: self._after_auth_record(rt, paused))

        self._background(record)

    def _after_auth_record(self, rt: ProviderRuntime, paused: bool) -> None:
        if paused and self.providers.get(rt.key) is rt:
            log.warning("provider_paused", provider_id=rt.key, reason="auth_failure")
            rt.paused = True
            rt.replacement = None
            self._stop_provider(rt, immediate=False)
