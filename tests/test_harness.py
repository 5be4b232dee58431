"""The real-server harness itself: Dovecot, PostgreSQL and Redis fixtures do what they say."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest
import redis
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from tests.conftest import start_dovecot
from tests.harness.dovecot import Dovecot, ImapUser, TlsMode
from tests.harness.imap_util import parse_append_uids, parse_uid_set
from tests.harness.pg import PG_ADMIN_DSN, create_database, database_exists, drop_database, dsn_for

MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hello\r\n\r\nbody\r\n"
SESSIONS = 300


def _wait_for_sessions(dovecot: Dovecot, user: str, want: int, timeout_s: float = 3.0) -> int:
    """`doveadm who` count for `user` once it equals `want` (anvil hears of logins and
    disconnects asynchronously), or the last count seen at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = dovecot.who().get(user, 0)
        if count == want or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


# ------------------------------------------------------------------- TLS and login


def test_plain_port_offers_starttls_and_logs_in(dovecot: Dovecot, imap_user: ImapUser) -> None:
    client = dovecot.connect(mode="plain")
    try:
        assert b"STARTTLS" in client.capabilities()
        client.login(*imap_user)
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
    finally:
        client.logout()


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_tls_login_verifies_through_the_ca_file(
    dovecot: Dovecot, imap_user: ImapUser, mode: TlsMode
) -> None:
    ctx = ssl.create_default_context(cafile=str(dovecot.cafile))
    client = dovecot.connect(imap_user.name, mode=mode, ssl_context=ctx)
    try:
        sock = client.socket()
        assert isinstance(sock, ssl.SSLSocket)
        cert = sock.getpeercert()
        assert cert is not None
        assert (("commonName", "localhost"),) in cert["subject"]
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
    finally:
        client.logout()


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_tls_without_the_ca_fails_verification(dovecot: Dovecot, mode: TlsMode) -> None:
    untrusting = ssl.create_default_context()  # system roots only
    with pytest.raises(ssl.SSLCertVerificationError):
        dovecot.connect(mode=mode, ssl_context=untrusting)


def test_certificate_is_valid_for_localhost_by_name(dovecot: Dovecot) -> None:
    ctx = dovecot.ssl_context()
    with (
        socket.create_connection((dovecot.host, dovecot.tls_port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with (
        socket.create_connection((dovecot.host, dovecot.tls_port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="mismatch"),
    ):
        ctx.wrap_socket(raw, server_hostname="imap.example.com")


def test_wrong_password_is_refused_without_penalising_the_next_login(
    dovecot: Dovecot, imap_user: ImapUser
) -> None:
    for _ in range(2):
        client = dovecot.connect()
        with pytest.raises(LoginError):
            client.login(imap_user.name, "wrong")
        client.shutdown()
    started = time.monotonic()
    dovecot.connect(imap_user.name).logout()
    assert time.monotonic() - started < 1.0


# ---------------------------------------------------------------- sessions and push


def test_three_hundred_sessions_of_one_user(dovecot: Dovecot, imap_user: ImapUser) -> None:
    clients: list[IMAPClient] = []
    try:
        for _ in range(SESSIONS):
            client = dovecot.connect(imap_user.name)
            client.select_folder("INBOX", readonly=True)
            clients.append(client)
        assert _wait_for_sessions(dovecot, imap_user.name, SESSIONS) >= SESSIONS
    finally:
        for client in clients:
            client.shutdown()


def test_append_is_pushed_to_an_idling_session(dovecot: Dovecot, imap_user: ImapUser) -> None:
    client = dovecot.connect(imap_user.name)
    try:
        client.select_folder("INBOX")
        client.idle()
        started = time.monotonic()
        uid = dovecot.append(imap_user.name, "INBOX", MESSAGE)
        responses: list[tuple[object, ...]] = []
        while (1, b"EXISTS") not in responses and time.monotonic() - started < 1.5:
            responses += client.idle_check(timeout=max(0.0, 1.5 - (time.monotonic() - started)))
        elapsed = time.monotonic() - started
        client.idle_done()
        assert (1, b"EXISTS") in responses
        assert uid == 1
        assert elapsed < 1.5
    finally:
        client.logout()


def test_hide_idle_instance_lacks_idle(dovecot_factory: Callable[..., Dovecot]) -> None:
    server = dovecot_factory(hide_idle=True)
    user = server.add_user()
    client = server.connect()
    try:
        assert b"IDLE" not in client.capabilities()
        client.login(*user)
        capabilities = client.capabilities()
        assert b"IDLE" not in capabilities
        assert b"UIDPLUS" in capabilities
    finally:
        client.logout()


def test_kick_disconnects_every_session(dovecot: Dovecot, imap_user: ImapUser) -> None:
    # Another user's session in the same imap process: without -f the kick would not happen.
    bystander = dovecot.connect(*dovecot.add_user())
    clients = [dovecot.connect(imap_user.name) for _ in range(2)]
    clients.append(bystander)  # closed below; being cut too is the documented cost
    try:
        assert _wait_for_sessions(dovecot, imap_user.name, 2) == 2
        dovecot.kick(imap_user.name)
        for client in clients[:2]:
            with pytest.raises((OSError, IMAPClientError)):
                client.noop()
    finally:
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown()
    assert _wait_for_sessions(dovecot, imap_user.name, 0) == 0
    dovecot.kick(imap_user.name)  # nobody left: not an error


def test_restart_keeps_ports_users_and_mail(dovecot_factory: Callable[..., Dovecot]) -> None:
    server = dovecot_factory()
    user = server.add_user()
    server.append(user.name, "INBOX", MESSAGE)
    ports = (server.plain_port, server.tls_port)
    server.restart()
    assert (server.plain_port, server.tls_port) == ports
    assert server.append(user.name, "INBOX", MESSAGE) == 2  # cached session reconnected
    server.restart(graceful=False)
    later = server.add_user()
    client = server.connect(user.name, mode="implicit")
    try:
        assert client.select_folder("INBOX")[b"EXISTS"] == 2
    finally:
        client.logout()
    server.connect(*later).logout()


# ------------------------------------------------------------------ mail admin


def test_users_in_bulk_can_log_in(dovecot: Dovecot) -> None:
    started = time.monotonic()
    users = dovecot.add_users(1000, prefix="bulk")
    assert time.monotonic() - started < 1.0
    assert len({u.name for u in users}) == 1000
    assert dovecot.password(users[-1].name) == users[-1].password
    dovecot.connect(*users[-1]).logout()
    with pytest.raises(ValueError, match="already exists"):
        dovecot.add_user(users[0].name)
    with pytest.raises(ValueError, match="may not contain"):
        dovecot.add_user("bad:name")


def test_append_many_returns_contiguous_uids(dovecot: Dovecot, imap_user: ImapUser) -> None:
    raws = [MESSAGE.replace(b"hello", f"n{i}".encode()) for i in range(250)]
    uids = dovecot.append_many(imap_user.name, "INBOX", raws)
    assert uids == list(range(1, 251))
    assert dovecot.folder_status(imap_user.name, "INBOX")["MESSAGES"] == 250
    flagged = dovecot.append(imap_user.name, "INBOX", MESSAGE, flags=[b"\\Seen"])
    client = dovecot.connect(imap_user.name)
    try:
        client.select_folder("INBOX", readonly=True)
        assert b"\\Seen" in client.get_flags([flagged])[flagged]
    finally:
        client.logout()


def test_non_ascii_folder_and_uidvalidity_change(dovecot: Dovecot, imap_user: ImapUser) -> None:
    folder = "Économie/日本語"
    dovecot.create_folder(imap_user.name, folder)
    assert dovecot.append(imap_user.name, folder, MESSAGE) == 1
    before = dovecot.folder_status(imap_user.name, folder)["UIDVALIDITY"]
    dovecot.set_uidvalidity(imap_user.name, folder, before + 7)
    assert dovecot.folder_status(imap_user.name, folder)["UIDVALIDITY"] == before + 7
    client = dovecot.connect(imap_user.name)
    try:
        names = [name for _flags, _sep, name in client.list_folders()]
        assert folder in names
    finally:
        client.logout()
    dovecot.delete_folder(imap_user.name, folder)
    assert "Économie/日本語" not in dovecot.doveadm("mailbox", "list", "-u", imap_user.name)


def test_special_use_folders_carry_their_flag(dovecot: Dovecot, imap_user: ImapUser) -> None:
    dovecot.create_folder(imap_user.name, "Junk")
    client = dovecot.connect(imap_user.name)
    try:
        flags = {name: fl for fl, _sep, name in client.list_folders()}
        assert b"\\Junk" in flags["Junk"]
    finally:
        client.logout()


def test_broken_config_fails_the_fixture_clearly() -> None:
    with pytest.raises(pytest.fail.Exception, match="cannot start the private Dovecot"):
        start_dovecot(extra_conf="no_such_setting = 1\n")


def test_log_records_logins(dovecot: Dovecot, imap_user: ImapUser) -> None:
    dovecot.connect(*imap_user).logout()
    assert f"user=<{imap_user.name}>" in dovecot.log_text()


# ------------------------------------------------------------------------ oauth2


class _Introspection(BaseHTTPRequestHandler):
    """RFC 7662 endpoint: token "good-<user>" is active for <user>."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        token = dict(p.split("=", 1) for p in body.split("&")).get("token", "")
        answer: dict[str, object] = {"active": False}
        if token.startswith("good-"):
            answer = {"active": True, "username": token.removeprefix("good-")}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request stderr line."""


@pytest.fixture
def introspection_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Introspection)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/introspect"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_oauth2_passdb_accepts_xoauth2(
    dovecot_factory: Callable[..., Dovecot], introspection_url: str
) -> None:
    server = dovecot_factory(oauth2_introspection_url=introspection_url)
    user = server.add_user()
    client = server.connect(mode="implicit")
    try:
        assert b"AUTH=XOAUTH2" in client.capabilities()
        client.oauth2_login(user.name, f"good-{user.name}")
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
    finally:
        client.logout()
    refused = server.connect(mode="implicit")
    with pytest.raises(LoginError):
        refused.oauth2_login(user.name, "expired")
    refused.shutdown()
    server.connect(*user).logout()  # the password still works beside the token


# ------------------------------------------------------------------ parsers


def test_uid_set_parsing() -> None:
    assert parse_uid_set("4:6,9") == [4, 5, 6, 9]
    assert parse_uid_set("7") == [7]
    assert parse_append_uids(("OK", [b"[APPENDUID 17 1:3] Append completed."])) == [1, 2, 3]
    with pytest.raises(ValueError, match="no APPENDUID"):
        parse_append_uids(b"Append completed.")


# ---------------------------------------------------------------- PostgreSQL


def test_pg_dsn_is_a_throwaway_database(pg_dsn: str) -> None:
    """The session's own database: empty, or holding only what `migrated_dsn` (which earlier
    tests may have asked for) puts there; never the shared `test` database."""
    with psycopg.connect(pg_dsn) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    assert name is not None and name[0].startswith("sw_test_")
    alga = {"email_providers", "imap_email_provider_config"}
    assert all(t in alga or t.startswith("shardworker_") for (t,) in tables), tables


def test_create_and_drop_database() -> None:
    name = create_database()
    try:
        assert database_exists(name)
        conn = psycopg.connect(dsn_for(PG_ADMIN_DSN, name))
        conn.execute("CREATE TABLE t (x int)")
        conn.commit()
        drop_database(name)  # an open session must not block the drop (WITH FORCE)
        conn.close()
    finally:
        drop_database(name)
    assert not database_exists(name)


# --------------------------------------------------------------------- Redis

_seen_redis_urls: list[str] = []


@pytest.mark.parametrize("attempt", [1, 2])
def test_redis_url_is_private_and_flushed(
    redis_url: str, redis_client: redis.Redis, attempt: int
) -> None:
    assert redis_url not in _seen_redis_urls
    assert not redis_url.endswith("/0")
    assert redis_client.dbsize() == 0
    redis_client.set("left-behind", attempt)
    _seen_redis_urls.append(redis_url)
