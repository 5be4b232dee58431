"""OAuth2 access tokens for XOAUTH2 / OAUTHBEARER logins, refreshed before they expire.

Only the worker that holds a provider's lease calls this (from the engine's credential
loading), so two processes never race on a refresh token that the server rotates.  Within
the worker, the provider runtime's lock serialises its folder slots.

A token is refreshed when it is missing, has no known expiry, or expires within
``REFRESH_MARGIN_S`` (or half its lifetime, for short-lived tokens).  The refresh is a
``grant_type=refresh_token`` POST to the provider's ``oauth_token_url`` with the client id
and secret in the body.  The new access token, its expiry and a rotated refresh token are
written in one transaction (the tokens encrypted in shardworker's secret table).

Failures are classified once, here:

* ``invalid_grant`` (revoked or expired refresh token): the provider is paused with reason
  ``auth_failure`` and an error message saying what to do; ``TokenRefreshError``;
* any other OAuth error answer (``invalid_client``...): ``TokenRefreshError``, counted
  like a rejected login;
* 5xx, 429, timeouts, refused connections, garbage: ``TokenEndpointError`` (transient),
  retried with the engine's backoff.

No token, secret or form body ever reaches a log line or an exception message.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from shardworker.config import Settings
from shardworker.db.status import StatusWriter
from shardworker.db.store import Pool, ProviderConfig
from shardworker.errors import (
    SecretNotFoundError,
    StoreError,
    TokenEndpointError,
    TokenPendingError,
    TokenRefreshError,
)
from shardworker.imap.connect import tls_context
from shardworker.logs import get_logger
from shardworker.netpolicy import OutboundPolicy
from shardworker.secrets.store import SecretStore, secret_name
from shardworker.tokenclient import post_token_request

log = get_logger(__name__)

REFRESH_MARGIN_S = 300.0
# How long a sync thread waits for a refresh it started: a healthy endpoint answers
# within it; a slow one is left to the refresher's threads and the slot comes back later.
REFRESH_WAIT_S = 1.0
PENDING_RETRY_S = 1.0

__all__ = ["AccessToken", "RefreshExecutor", "TokenRefresher", "post_token_request"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: datetime | None
    lifetime_s: float | None = None  # known when we obtained it ourselves

    def fresh(self, now: datetime) -> bool:
        """Usable for a login now, i.e. not within the refresh margin of its expiry."""
        if self.expires_at is None:
            return False
        margin = REFRESH_MARGIN_S
        if self.lifetime_s is not None:
            margin = min(margin, self.lifetime_s / 2)
        return (self.expires_at - now).total_seconds() > margin


class RefreshExecutor:
    """A few daemon threads that run token refreshes, apart from the sync threads.

    Every refresh has a total deadline (shardworker.tokenclient), so a thread is never held
    for longer than ``SHARDWORKER_CONNECT_TIMEOUT_S``; being daemons, they never hold up
    the process's exit either.
    """

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._jobs: queue.SimpleQueue[tuple[Callable[[], AccessToken], Future[AccessToken]] | None]
        self._jobs = queue.SimpleQueue()
        self._started: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[], AccessToken]) -> Future[AccessToken]:
        future: Future[AccessToken] = Future()
        with self._lock:
            if self._closed:
                future.set_exception(TokenEndpointError("the token refresher is closed"))
                return future
            if len(self._started) < self._threads:
                thread = threading.Thread(target=self._work, name="oauth-refresh", daemon=True)
                self._started.append(thread)
                thread.start()
        self._jobs.put((fn, future))
        return future

    def close(self) -> None:
        with self._lock:
            self._closed = True
            started = len(self._started)
        for _ in range(started):
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to whoever waits for the token
                future.set_exception(exc)


class TokenRefresher:
    """Access tokens for the providers this worker owns; refreshes run off the sync path.

    A slot that needs a new token starts its provider's refresh on the
    :class:`RefreshExecutor` and waits ``REFRESH_WAIT_S`` at most.  A refresh still
    running then (a slow or dripping endpoint) raises ``TokenPendingError``: the engine
    retries the slot shortly, the sync thread serves other providers meanwhile, and the
    next attempt picks the finished refresh up.  One refresh per provider at a time.
    """

    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        status: StatusWriter,
        secrets: SecretStore,
        *,
        now: Callable[[], datetime] = _utcnow,
        wait_s: float = REFRESH_WAIT_S,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._status = status
        self._secrets = secrets
        self._now = now
        self._wait_s = wait_s
        self._policy = OutboundPolicy.from_settings(settings)
        self._executor = RefreshExecutor(settings.oauth_refresh_threads)
        self._inflight: dict[tuple[str, str], Future[AccessToken]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._executor.close()

    def is_fresh(self, token: AccessToken | None) -> bool:
        return token is not None and token.fresh(self._now())

    def access_token(self, cfg: ProviderConfig, *, force: bool = False) -> AccessToken:
        """The token to log in with, refreshed first when needed (or when ``force``)."""
        finished = self._take_finished(cfg)
        if finished is not None and not force:  # a forced refresh must not reuse it
            return finished.result()
        stored = self._stored(cfg)
        if stored is not None and not force and stored.fresh(self._now()):
            return stored
        refresh_token = self._secret(cfg, "refresh_token")
        if refresh_token is None:
            if stored is None:
                raise SecretNotFoundError(
                    f"provider {cfg.provider_id}: no {secret_name('access_token', '<id>')} "
                    f"and no {secret_name('refresh_token', '<id>')} to obtain one"
                )
            # Nothing to refresh with (another system owns the tokens): use what is there.
            return stored
        return self._await_refresh(cfg, refresh_token)

    def _take_finished(self, cfg: ProviderConfig) -> Future[AccessToken] | None:
        key = (cfg.tenant, cfg.provider_id)
        with self._lock:
            future = self._inflight.get(key)
            if future is None or not future.done():
                return None
            del self._inflight[key]
            return future

    def _await_refresh(self, cfg: ProviderConfig, refresh_token: str) -> AccessToken:
        key = (cfg.tenant, cfg.provider_id)
        with self._lock:
            future = self._inflight.get(key)
            started = future is None
            if future is None:
                future = self._executor.submit(lambda: self._refresh_job(cfg, refresh_token))
                self._inflight[key] = future
        try:
            # Only the attempt that started the refresh waits; later ones look and go.
            token = future.result(timeout=self._wait_s if started else 0)
        except FutureTimeout:
            raise TokenPendingError(
                f"provider {cfg.provider_id}: token refresh in progress; retrying shortly",
                retry_s=PENDING_RETRY_S,
            ) from None
        finally:
            self._forget_if_done(key, future)
        return token

    def _forget_if_done(self, key: tuple[str, str], future: Future[AccessToken]) -> None:
        with self._lock:
            if future.done() and self._inflight.get(key) is future:
                del self._inflight[key]

    def _refresh_job(self, cfg: ProviderConfig, refresh_token: str) -> AccessToken:
        try:
            return self.refresh(cfg, refresh_token)
        except TokenRefreshError as exc:
            if exc.code == "invalid_grant":
                self._pause(cfg, exc)
            raise

    def refresh(self, cfg: ProviderConfig, refresh_token: str) -> AccessToken:
        url = cfg.oauth_token_url
        if not url:
            raise TokenRefreshError(
                f"provider {cfg.provider_id}: oauth_token_url is not set", code="no_token_url"
            )
        client_secret = self._secret(cfg, "oauth_client_secret")
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
                "client_id": cfg.oauth_client_id or ""}  # fmt: skip
        if client_secret:
            form["client_secret"] = client_secret
        if cfg.oauth_scopes:
            form["scope"] = cfg.oauth_scopes
        redact = [refresh_token, client_secret or ""]
        answer = post_token_request(
            url, form, self._settings.connect_timeout_s, redact,
            policy=self._policy, ssl_context=tls_context(self._settings.tls_ca_file),
        )  # fmt: skip
        token = _access_token(answer, url, self._now())
        rotated = answer.get("refresh_token")
        rotated = rotated if isinstance(rotated, str) and rotated != refresh_token else None
        self._save(cfg, token, rotated)
        log.info("oauth_token_refreshed", provider_id=cfg.provider_id, tenant=cfg.tenant,
                 expires_at=token.expires_at, rotated=rotated is not None)  # fmt: skip
        return token

    # -- storage -------------------------------------------------------------------------

    def _secret(self, cfg: ProviderConfig, kind: str) -> str | None:
        try:
            return self._secrets.get(
                cfg.tenant, cfg.provider_id, secret_name(kind, cfg.provider_id)
            )
        except SecretNotFoundError:
            return None

    def _stored(self, cfg: ProviderConfig) -> AccessToken | None:
        value = self._secret(cfg, "access_token")
        if value is None:
            return None
        # Read the expiry fresh: the engine's config row may predate our last refresh.
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT token_expires_at FROM imap_email_provider_config "
                "WHERE tenant = %s::uuid AND email_provider_id = %s::uuid",
                (cfg.tenant, cfg.provider_id),
            ).fetchone()
        return AccessToken(value, None if row is None else row[0])

    def _save(self, cfg: ProviderConfig, token: AccessToken, rotated: str | None) -> None:
        tenant, pid = cfg.tenant, cfg.provider_id
        try:
            with self._pool.connection() as conn, conn.transaction():
                self._secrets.put(tenant, pid, secret_name("access_token", pid), token.value,
                                  conn=conn)  # fmt: skip
                if rotated is not None:
                    self._secrets.put(tenant, pid, secret_name("refresh_token", pid), rotated,
                                      conn=conn)  # fmt: skip
                conn.execute(
                    "UPDATE imap_email_provider_config SET token_expires_at = %s, "
                    "updated_at = now() WHERE tenant = %s::uuid AND email_provider_id = %s::uuid",
                    (token.expires_at, tenant, pid),
                )
        except Exception as exc:
            # A rotated refresh token that could not be stored is lost: say so loudly.
            log.error("oauth_token_store_failed", provider_id=pid, tenant=tenant,
                      rotated=rotated is not None, error_type=type(exc).__name__)  # fmt: skip
            raise StoreError(f"provider {pid}: storing the refreshed token failed") from None

    def _pause(self, cfg: ProviderConfig, exc: TokenRefreshError) -> None:
        message = (
            f"OAuth2 refresh token rejected ({exc}); re-authorise the mailbox, store the new "
            "refresh token, then resume the provider"
        )
        log.warning("oauth_refresh_token_rejected", provider_id=cfg.provider_id,
                    tenant=cfg.tenant, code=exc.code)  # fmt: skip
        self._status.paused(cfg.tenant, cfg.provider_id, "auth_failure", message)


def _access_token(answer: dict[str, Any], url: str, now: datetime) -> AccessToken:
    value = answer.get("access_token")
    if not isinstance(value, str) or not value:
        raise TokenEndpointError(
            f"token endpoint {urlsplit(url).hostname}: the answer has no access_token"
        )
    expires_in = answer.get("expires_in")
    lifetime: float | None = None
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        lifetime = float(expires_in)
    elif isinstance(expires_in, str) and expires_in.isdigit():
        lifetime = float(expires_in)  # some servers send it as a string
    expires_at = now + timedelta(seconds=lifetime) if lifetime is not None else None
    return AccessToken(value, expires_at, lifetime)
