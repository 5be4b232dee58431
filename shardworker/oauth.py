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

import http.client
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson

from shardworker.config import Settings
from shardworker.db.status import StatusWriter
from shardworker.db.store import Pool, ProviderConfig
from shardworker.errors import (
    SecretNotFoundError,
    StoreError,
    TokenEndpointError,
    TokenRefreshError,
)
from shardworker.logs import get_logger
from shardworker.secrets.store import SecretStore, secret_name

log = get_logger(__name__)

REFRESH_MARGIN_S = 300.0
MAX_ANSWER_BYTES = 64 * 1024
_TRANSIENT_STATUS = frozenset({408, 425, 429})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


class TokenRefresher:
    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        status: StatusWriter,
        secrets: SecretStore,
        *,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._status = status
        self._secrets = secrets
        self._now = now

    def is_fresh(self, token: AccessToken | None) -> bool:
        return token is not None and token.fresh(self._now())

    def access_token(self, cfg: ProviderConfig, *, force: bool = False) -> AccessToken:
        """The token to log in with, refreshed first when needed (or when ``force``)."""
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
        answer = post_token_request(url, form, self._settings.connect_timeout_s, redact)
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


# -- the token endpoint --------------------------------------------------------------------


def post_token_request(
    url: str, form: dict[str, str], timeout_s: float, redact: Sequence[str] = ()
) -> dict[str, Any]:
    """POST a token request; the JSON answer, or a classified error without secrets."""
    where = f"token endpoint {urlsplit(url).netloc}"
    request = urllib.request.Request(
        url,
        data=urlencode(form).encode(),
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded",
                 "Accept": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read(MAX_ANSWER_BYTES)
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read(MAX_ANSWER_BYTES)
        raise _classify_refusal(where, exc.code, body, redact) from None
    except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts included
        reason = getattr(exc, "reason", exc)
        raise TokenEndpointError(f"{where}: {type(reason).__name__}: {reason}") from None
    answer = _json_object(body)
    if answer is None:
        raise TokenEndpointError(f"{where}: the answer is not a JSON object")
    return answer


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _classify_refusal(
    where: str, status: int, body: bytes, redact: Sequence[str]
) -> TokenRefreshError | TokenEndpointError:
    if status >= 500 or status in _TRANSIENT_STATUS:
        return TokenEndpointError(f"{where}: HTTP {status}")
    answer = _json_object(body) or {}
    error = answer.get("error")
    code = error if isinstance(error, str) and error.isascii() and error else f"http_{status}"
    detail = answer.get("error_description")
    text = f"{where}: {code}"
    if isinstance(detail, str) and detail:
        text += f" ({_clean(detail, redact)})"
    return TokenRefreshError(text, code=code[:64])


def _clean(text: str, redact: Sequence[str]) -> str:
    text = _CONTROL.sub(" ", text)[:200]
    for secret in redact:
        if secret:
            text = text.replace(secret, "***")
    return text


def _access_token(answer: dict[str, Any], url: str, now: datetime) -> AccessToken:
    value = answer.get("access_token")
    if not isinstance(value, str) or not value:
        raise TokenEndpointError(
            f"token endpoint {urlsplit(url).netloc}: the answer has no access_token"
        )
    expires_in = answer.get("expires_in")
    lifetime: float | None = None
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        lifetime = float(expires_in)
    elif isinstance(expires_in, str) and expires_in.isdigit():
        lifetime = float(expires_in)  # some servers send it as a string
    expires_at = now + timedelta(seconds=lifetime) if lifetime is not None else None
    return AccessToken(value, expires_at, lifetime)
