"""OAuth2 against a real Dovecot whose oauth2 passdb asks a token-introspection endpoint run
by the test, with a token endpoint beside it: XOAUTH2 logins, refresh before expiry,
rotation stored encrypted, a forced refresh after a rejected token, transient endpoint
errors retried, a revoked refresh token pausing the provider, and no token in any log."""

from __future__ import annotations

import io
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import orjson
import psycopg
import pytest
import redis

from shardworker.admin.service import AdminService
from shardworker.errors import TokenEndpointError, TokenRefreshError
from shardworker.oauth import post_token_request
from shardworker.secrets.store import SecretStore
from tests.admin_support import assert_no_secret, captured_logs, private_database
from tests.harness.dovecot import Dovecot
from tests.harness.net import free_port
from tests.support import Rig, events, make_mail, rig_settings, wait_until

pytestmark = pytest.mark.timeout(60)


class IdP:
    """A token endpoint (refresh grant, rotating refresh tokens) and RFC 7662 introspection."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client_id = "client-" + secrets.token_hex(4)
        self.client_secret = "cs-" + secrets.token_urlsafe(16)
        self.expires_in = 3600
        self.fail_next = 0
        self.access: dict[str, tuple[str, float]] = {}  # token → (user, expiry, monotonic)
        self.refresh: dict[str, str] = {}  # live refresh token → user
        self.token_calls: list[dict[str, str]] = []
        self.introspected: list[tuple[str, bool]] = []
        self.issued: list[str] = []  # every token ever handed out, for the leak scans
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server = server
        self.url = f"http://127.0.0.1:{server.server_port}"
        self.thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def new_refresh_token(self, user: str) -> str:
        token = "rt-" + secrets.token_urlsafe(16)
        with self.lock:
            self.refresh[token] = user
            self.issued.append(token)
        return token

    def _issue(self, user: str) -> dict[str, Any]:
        access, rotated = "at-" + secrets.token_urlsafe(16), "rt-" + secrets.token_urlsafe(16)
        self.access[access] = (user, time.monotonic() + self.expires_in)
        self.refresh[rotated] = user
        self.issued += [access, rotated]
        return {"access_token": access, "token_type": "Bearer", "expires_in": self.expires_in,
                "refresh_token": rotated}  # fmt: skip

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.token_calls.append(form)
            if self.fail_next > 0:
                self.fail_next -= 1
                return 503, {"error": "temporarily_unavailable"}
            if (form.get("client_id"), form.get("client_secret")) != (
                self.client_id, self.client_secret,
            ):  # fmt: skip
                # Some servers echo what they got: the client must not pass it on.
                return 401, {
                    "error": "invalid_client",
                    "error_description": f"bad client for {form.get('refresh_token')}",
                }
            user = self.refresh.pop(form.get("refresh_token", ""), None)
            if form.get("grant_type") != "refresh_token" or user is None:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                }
            return 200, self._issue(user)

    def introspect(self, form: dict[str, str]) -> dict[str, Any]:
        with self.lock:
            user, expiry = self.access.get(form.get("token", ""), ("", 0.0))
            active = bool(user) and time.monotonic() < expiry
            self.introspected.append((form.get("token", ""), active))
        return {"active": True, "username": user} if active else {"active": False}

    def revoke_access(self) -> None:
        with self.lock:
            self.access.clear()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"])).decode()
                form = dict(parse_qsl(raw))
                if self.path == "/token":
                    status, answer = idp.token(form)
                elif self.path == "/introspect":
                    status, answer = 200, idp.introspect(form)
                else:
                    status, answer = 200, {}
                data = b"not json" if self.path == "/garbage" else orjson.dumps(answer)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                """Silence the per-request stderr line."""

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def idp() -> Iterator[IdP]:
    made = IdP()
    yield made
    made.close()


@pytest.fixture(scope="module")
def server(idp: IdP) -> Iterator[Dovecot]:
    from tests.conftest import start_dovecot

    made = start_dovecot(oauth2_introspection_url=f"{idp.url}/introspect")
    yield made
    made.close()


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    with private_database() as made:
        yield made


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    with captured_logs() as stream:
        yield stream


@pytest.fixture
def setup(idp: IdP, server: Dovecot, dsn: str, redis_url: str) -> Iterator[Callable[..., Any]]:
    """`setup(refresh_token=..., **fields)` → (rig, provider id, IMAP user); engine not started."""
    idp.expires_in, idp.fail_next = 3600, 0
    rigs: list[Rig] = []

    def make(refresh_token: str | None = None, **fields: Any) -> tuple[Rig, str, str]:
        user = server.add_user().name
        rig = Rig(rig_settings(dsn, redis_url, str(server.cafile)), server)
        rigs.append(rig)
        body = {
            "tenant": rig.tenant, "mailbox": f"{user}@example.com", "host": "127.0.0.1",
            "port": server.tls_port, "secure": True, "auth_type": "oauth2", "username": user,
            "oauth_token_url": f"{idp.url}/token", "oauth_client_id": idp.client_id,
            "oauth_client_secret": idp.client_secret,
            "refresh_token": refresh_token or idp.new_refresh_token(user), **fields,
        }  # fmt: skip
        client = redis.Redis.from_url(redis_url)
        made = AdminService(rig.settings, rig.pool, client).add(body)
        client.close()
        return rig, made["provider_id"], user

    yield make
    for rig in rigs:
        rig.close()


def connected(rig: Rig, pid: str) -> bool:
    return bool(rig.row(pid)["status"] == "connected")


def stored(rig: Rig, pid: str, kind: str) -> str:
    return SecretStore(rig.settings, rig.pool).get(rig.tenant, pid, f"imap_{kind}_{pid}")


def test_xoauth2_login_with_a_refreshed_token(
    setup: Any, idp: IdP, server: Dovecot, logs: io.StringIO
) -> None:
    """A stored access token that expires within the margin is replaced before any login."""
    stale = "at-stale-" + secrets.token_hex(8)
    soon = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
    rig, pid, user = setup(access_token=stale, token_expires_at=soon)
    calls = len(idp.token_calls)
    rig.start()
    wait_until(lambda: connected(rig, pid), 30)
    assert [t for t, _ in idp.introspected if t == stale] == []
    assert len(idp.token_calls) == calls + 1
    call = idp.token_calls[-1]
    assert call["grant_type"] == "refresh_token" and call["client_id"] == idp.client_id
    assert call["client_secret"] == idp.client_secret
    # The rotated refresh token and the new access token are stored, encrypted.
    assert stored(rig, pid, "refresh_token") in idp.refresh
    assert stored(rig, pid, "access_token") in idp.access
    with psycopg.connect(rig.settings.database_url) as conn:
        envelopes = [r[0] for r in conn.execute(
            "SELECT envelope FROM shardworker_secrets WHERE provider_id = %s", (pid,))]  # fmt: skip
        [(expires,)] = conn.execute(
            "SELECT token_expires_at FROM imap_email_provider_config "
            "WHERE email_provider_id = %s", (pid,),
        ).fetchall()  # fmt: skip
    assert len(envelopes) == 3 and all(e.startswith("sw1.") for e in envelopes)
    assert abs((expires - datetime.now(UTC)).total_seconds() - 3600) < 60
    assert f"Login: user=<{user}>, method=XOAUTH2" in server.log_text()
    server.append(user, "INBOX", make_mail(message_id="<oauth1@example.com>"))
    wait_until(lambda: events(rig.redis), 30)
    assert events(rig.redis)[0]["payload"]["emailData"]["id"] == "<oauth1@example.com>"
    assert_no_secret([logs.getvalue(), rig.row(pid)["error_message"] or ""],
                     [*idp.issued, idp.client_secret, stale])  # fmt: skip


def test_an_expiring_token_is_refreshed_before_it_fails(
    setup: Any, idp: IdP, server: Dovecot
) -> None:
    idp.expires_in = 4  # short-lived: refreshed within half its lifetime of expiry
    rig, pid, user = setup()
    calls = len(idp.token_calls)
    rig.start()
    wait_until(lambda: connected(rig, pid), 30)
    time.sleep(4.2)  # the token in use has expired at the IdP; the session lives on
    server.kick(user)  # as servers do with sessions whose token expired
    wait_until(lambda: len(idp.token_calls) == calls + 2, 30)
    wait_until(lambda: server.who().get(user, 0) == 1, 30)
    assert not [t for t, active in idp.introspected if not active]  # no login ever failed
    assert rig.row(pid)["inbound_auth_failure_count"] == 0
    server.append(user, "INBOX", make_mail(message_id="<after-expiry@example.com>"))
    wait_until(lambda: events(rig.redis), 30)


def test_a_rejected_token_forces_a_refresh(setup: Any, idp: IdP, server: Dovecot) -> None:
    rig, pid, user = setup()
    calls = len(idp.token_calls)
    rig.start()
    wait_until(lambda: connected(rig, pid), 30)
    idp.revoke_access()  # the cached token still looks fresh, but the server refuses it
    server.kick(user)
    wait_until(lambda: len(idp.token_calls) == calls + 2, 30)
    wait_until(lambda: server.who().get(user, 0) == 1, 30)
    assert [active for _, active in idp.introspected][-2:] == [False, True]
    assert rig.row(pid)["inbound_paused_at"] is None


def test_transient_token_endpoint_errors_are_retried(setup: Any, idp: IdP) -> None:
    rig, pid, _ = setup()
    idp.fail_next = 2
    calls = len(idp.token_calls)
    rig.start()
    wait_until(lambda: connected(rig, pid), 30)
    assert len(idp.token_calls) == calls + 3
    row = rig.row(pid)
    assert row["inbound_paused_at"] is None and row["inbound_auth_failure_count"] == 0


def test_a_revoked_refresh_token_pauses_with_auth_failure(
    setup: Any, idp: IdP, server: Dovecot, logs: io.StringIO
) -> None:
    revoked = "rt-revoked-" + secrets.token_hex(8)
    rig, pid, user = setup(refresh_token=revoked)
    rig.start()
    wait_until(lambda: rig.row(pid)["inbound_paused_at"] is not None, 30)
    row = rig.row(pid)
    assert row["inbound_pause_reason"] == "auth_failure" and row["status"] == "error"
    assert "invalid_grant" in row["error_message"] and "re-authorise" in row["error_message"]
    assert f"user=<{user}>" not in server.log_text()  # no login was even tried
    assert rig.ctx is not None
    key = f"{rig.tenant}:{pid}"
    wait_until(lambda: key not in rig.ctx.engine.providers, 15)  # the engine let it go
    calls = len(idp.token_calls)
    time.sleep(1.5)  # past the auth backoff: the endpoint is not asked again
    assert len(idp.token_calls) == calls
    assert_no_secret([logs.getvalue(), row["error_message"]], [revoked, idp.client_secret])


def test_token_endpoint_answers_are_classified(idp: IdP) -> None:
    refresh = idp.new_refresh_token("nobody")
    form = {"grant_type": "refresh_token", "refresh_token": refresh, "client_id": idp.client_id,
            "client_secret": "wrong-" + secrets.token_hex(4)}  # fmt: skip
    with pytest.raises(TokenRefreshError) as refused:
        post_token_request(f"{idp.url}/token", form, 5, [refresh, form["client_secret"]])
    assert refused.value.code == "invalid_client"
    assert refresh not in str(refused.value) and "***" in str(refused.value)
    with pytest.raises(TokenRefreshError) as bad_grant:
        post_token_request(f"{idp.url}/token", {**form, "client_secret": idp.client_secret,
                                                "refresh_token": "unknown"}, 5)  # fmt: skip
    assert bad_grant.value.code == "invalid_grant"
    idp.fail_next = 1
    with pytest.raises(TokenEndpointError, match="HTTP 503"):
        post_token_request(f"{idp.url}/token", form, 5)
    with pytest.raises(TokenEndpointError, match="not a JSON object"):
        post_token_request(f"{idp.url}/garbage", form, 5)
    with pytest.raises(TokenEndpointError, match="ConnectionRefusedError"):
        post_token_request(f"http://127.0.0.1:{free_port()}/token", form, 5)
