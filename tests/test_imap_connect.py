"""shardworker.imap.connect: security modes, TLS contexts, login, error classification.

Pure tests build exceptions the way imaplib/imapclient raise them.  What Dovecot cannot be
made to do (no STARTTLS, silence, echoing secrets, OAuth challenges) is played by a
scripted one-connection server on a loopback port; everything else runs against Dovecot.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import imaplib
import json
import logging
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pytest
from imapclient import exceptions as imap_exc

from shardworker.errors import (
    ConfigError,
    FolderError,
    ImapAuthError,
    ImapProtocolError,
    ImapTransientError,
)
from shardworker.imap.connect import (
    Credentials,
    capabilities,
    classify_error,
    close_client,
    open_client,
    security_mode,
    tls_context,
)
from tests.conftest import start_dovecot
from tests.harness.dovecot import Dovecot, ImapUser
from tests.harness.net import free_port
from tests.support import wait_until

SECRET = 'pa"ss\\w0rd-s3cr3t'


# ---------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("secure", "allow_starttls", "expected"),
    [(True, False, "tls"), (True, True, "tls"), (False, True, "starttls"), (False, False, "plain")],
)
def test_security_mode(secure: bool, allow_starttls: bool, expected: str) -> None:
    assert security_mode(secure, allow_starttls) == expected


def test_credentials_never_show_the_secret() -> None:
    creds = Credentials("password", "alice", SECRET)
    assert SECRET not in repr(creds)
    assert SECRET not in str(creds)
    assert "alice" in repr(creds)


def test_tls_context_verifies_and_is_cached() -> None:
    ctx = tls_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls_context() is ctx
    assert tls_context("") is ctx


def test_tls_context_with_unreadable_ca_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="SHARDWORKER_TLS_CA_FILE"):
        tls_context("/nonexistent/ca.pem")


def _login_error(text: str, cause: BaseException | None = None) -> imap_exc.LoginError:
    """A LoginError as imapclient raises it: from inside ``except``, so the cause is context."""
    exc = imap_exc.LoginError(text)
    exc.__context__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (socket.gaierror(-2, "Name or service not known"), "dns"),
        (ConnectionRefusedError(111, "Connection refused"), "refused"),
        (TimeoutError("timed out"), "timeout"),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), "tls_certificate"),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "tls"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "network"),
        (ConnectionResetError(104, "Connection reset by peer"), "network"),
        (BrokenPipeError(32, "Broken pipe"), "network"),
        (EOFError("eof"), "network"),
        (imaplib.IMAP4.abort("socket error: EOF"), "network"),
        (imaplib.IMAP4.abort("command: IDLE => socket error: timed out"), "timeout"),
        (imaplib.IMAP4.abort("unexpected response: b'garbage'"), "protocol"),
        (imaplib.IMAP4.abort("[LIMIT] Too many connections"), "limit"),
        (imaplib.IMAP4.error("LOGIN command error: NO [b'[LIMIT] Max connections']"), "limit"),
        (_login_error("NO [UNAVAILABLE] Temporary authentication failure."), "unavailable"),
        (_login_error("b'[SERVERBUG] Internal error'"), "unavailable"),
        (_login_error("", imaplib.IMAP4.abort("socket error: EOF")), "network"),
        (_login_error("", TimeoutError("timed out")), "timeout"),
        (
            imap_exc.CapabilityError("Server does not support STARTTLS capability"),
            "starttls_unavailable",
        ),
        (imap_exc.ProtocolError("unexpected response"), "protocol"),
        (imaplib.IMAP4.error("FETCH command error: BAD [b'Error in IMAP command']"), "protocol"),
        (ValueError("cannot parse"), "protocol"),
    ],
)
def test_transient_classification(exc: BaseException, reason: str) -> None:
    error = classify_error(exc)
    assert type(error) in (ImapTransientError, ImapProtocolError)
    assert isinstance(error, ImapTransientError)
    assert error.reason == reason


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (
            "LOGIN command error: NO [b'[AUTHENTICATIONFAILED] Authentication failed.']",
            "authenticationfailed",
        ),
        ("b'[AUTHORIZATIONFAILED] Not allowed to log in as that user'", "authorizationfailed"),
        ("b'[EXPIRED] Password expired'", "expired"),
        ("b'[PRIVACYREQUIRED] Use TLS'", "privacyrequired"),
        ("b'[ALERT] Please log in via your web browser'", "auth_failed"),
        ("LOGIN failed.", "auth_failed"),
    ],
)
def test_auth_classification(text: str, code: str) -> None:
    error = classify_error(_login_error(text))
    assert isinstance(error, ImapAuthError)
    assert error.code == code


def test_folder_response_codes_are_folder_errors() -> None:
    nonexistent = imaplib.IMAP4.error("select failed: [NONEXISTENT] Mailbox doesn't exist")
    noperm = imaplib.IMAP4.error("select failed: [NOPERM] Permission denied")
    assert isinstance(classify_error(nonexistent), FolderError)
    assert isinstance(classify_error(noperm), FolderError)


def test_classification_keeps_shardworker_errors_and_prefixes_and_redacts() -> None:
    already = ImapAuthError("x", code="login_disabled")
    assert classify_error(already) is already
    error = classify_error(_login_error(f"NO LOGIN alice {SECRET} rejected"), where="h:1",
                           redact=[SECRET])  # fmt: skip
    assert str(error).startswith("h:1: LoginError: ")
    assert SECRET not in str(error)
    assert "***" in str(error)


# ---------------------------------------------------------------- scripted server


@dataclass
class Exchange:
    """What the scripted server saw, and a way to answer."""

    rfile: BinaryIO
    conn: socket.socket
    received: list[bytes] = field(default_factory=list)
    sasl: list[bytes] = field(default_factory=list)

    def send(self, *lines: str) -> None:
        self.conn.sendall("".join(line + "\r\n" for line in lines).encode())

    def read(self) -> bytes:
        line = self.rfile.readline()
        self.received.append(line)
        return line

    def read_sasl(self) -> str:
        """One client response of an AUTHENTICATE exchange (base64 text)."""
        line = self.read()
        self.sasl.append(base64.b64decode(line.strip()))
        return line.decode().strip()


Script = Callable[[Exchange], None]


class ScriptedServer:
    """Accepts one connection on a loopback port and runs ``script`` on it."""

    def __init__(self, script: Script) -> None:
        self._script = script
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(10)
        self.port = int(self._listener.getsockname()[1])
        self.stop = threading.Event()
        self.received: list[bytes] = []
        self.sasl: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as rfile:
            exchange = Exchange(rfile, conn, self.received, self.sasl)
            with contextlib.suppress(OSError):
                self._script(exchange)

    def close(self) -> None:
        self.stop.set()
        self._listener.close()
        self._thread.join(10)


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: Script) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


Answer = Callable[[Exchange, str, bytes], None]


def imap_script(caps: str, answers: dict[str, Answer] | None = None) -> Script:
    """A tiny IMAP server: greeting, CAPABILITY, LOGOUT, and ``answers`` per command."""

    def run(io: Exchange) -> None:
        io.send("* OK scripted server ready")
        while line := io.read():
            tag, command = line.split()[0].decode(), line.split()[1].decode().upper()
            if command == "CAPABILITY":
                io.send(f"* CAPABILITY {caps}", f"{tag} OK done")
            elif command == "LOGOUT":
                io.send("* BYE bye", f"{tag} OK done")
                return
            elif answers and command in answers:
                answers[command](io, tag, line)
            else:
                io.send(f"{tag} BAD unknown command")

    return run


def ok(io: Exchange, tag: str, line: bytes) -> None:
    io.send(f"{tag} OK done")


def sasl_ok(io: Exchange, tag: str, line: bytes) -> None:
    io.send("+ ")
    io.read_sasl()
    io.send(f"{tag} OK logged in")


def _open(port: int, creds: Credentials, security: str = "plain", **kw: float) -> Any:
    return open_client(
        "127.0.0.1", port, security, creds,  # type: ignore[arg-type]
        timeout_s=kw.get("timeout_s", 5.0), connect_timeout_s=kw.get("connect_timeout_s", 5.0),
        ssl_context=None,
    )  # fmt: skip


def test_starttls_required_but_not_offered(scripted: Callable[[Script], ScriptedServer]) -> None:
    server = scripted(imap_script("IMAP4rev1 AUTH=PLAIN", {"LOGIN": ok}))
    with pytest.raises(ImapTransientError) as info:
        _open(server.port, Credentials("password", "alice", SECRET), "starttls")
    assert info.value.reason == "starttls_unavailable"
    server.close()
    assert not any(b"LOGIN" in line or b"AUTHENTICATE" in line for line in server.received)


@pytest.mark.parametrize("security", ["plain", "tls"])
def test_silent_server_times_out(
    scripted: Callable[[Script], ScriptedServer], security: str
) -> None:
    server = scripted(lambda io: server.stop.wait(10) and None)
    with pytest.raises(ImapTransientError) as info:
        _open(server.port, Credentials("password", "a", "b"), security, connect_timeout_s=0.3)
    assert info.value.reason == "timeout"


def test_plain_mode_warns_once(
    scripted: Callable[[Script], ScriptedServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = scripted(imap_script("IMAP4rev1", {"LOGIN": ok}))
    with caplog.at_level(logging.WARNING, logger="shardworker.imap.connect"):
        client = _open(server.port, Credentials("password", "alice", SECRET))
    close_client(client)
    warnings = [r for r in caplog.records if r.getMessage() == "imap_plaintext_connection"]
    assert len(warnings) == 1
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_login_quotes_user_and_password(scripted: Callable[[Script], ScriptedServer]) -> None:
    server = scripted(imap_script("IMAP4rev1", {"LOGIN": ok}))
    client = _open(server.port, Credentials("password", 'al ice"', SECRET))
    close_client(client)
    login = next(line for line in server.received if b" LOGIN " in line)
    assert login.split(b" LOGIN ", 1)[1] == b'"al ice\\"" "pa\\"ss\\\\w0rd-s3cr3t"\r\n'


@pytest.mark.parametrize(
    ("caps", "mechanism", "payload"),
    [
        ("AUTH=XOAUTH2 AUTH=OAUTHBEARER", b"XOAUTH2", b"user=bob\x01auth=Bearer tok-123\x01\x01"),
        ("AUTH=OAUTHBEARER", b"OAUTHBEARER", b"n,a=bob,\x01auth=Bearer tok-123\x01\x01"),
        ("", b"XOAUTH2", b"user=bob\x01auth=Bearer tok-123\x01\x01"),
    ],
)
def test_oauth2_mechanism_choice(
    scripted: Callable[[Script], ScriptedServer], caps: str, mechanism: bytes, payload: bytes
) -> None:
    server = scripted(imap_script(f"IMAP4rev1 {caps}", {"AUTHENTICATE": sasl_ok}))
    client = _open(server.port, Credentials("oauth2", "bob", "tok-123"))
    close_client(client)
    auth = next(line for line in server.received if b"AUTHENTICATE" in line)
    assert auth.split()[2] == mechanism
    assert server.sasl == [payload]


def test_rejected_token_answers_the_error_challenge_with_an_empty_line(
    scripted: Callable[[Script], ScriptedServer],
) -> None:
    def reject(io: Exchange, tag: str, line: bytes) -> None:
        io.send("+ ")
        io.read_sasl()
        io.send("+ " + base64.b64encode(b'{"status":"401","schemes":"bearer"}').decode())
        io.read_sasl()
        io.send(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)")

    server = scripted(imap_script("IMAP4rev1 AUTH=XOAUTH2", {"AUTHENTICATE": reject}))
    with pytest.raises(ImapAuthError) as info:
        _open(server.port, Credentials("oauth2", "bob", "tok-123"))
    assert info.value.code == "authenticationfailed"
    server.close()
    assert server.sasl == [b"user=bob\x01auth=Bearer tok-123\x01\x01", b""]
    assert "tok-123" not in str(info.value)


def test_login_disabled_uses_authenticate_plain(
    scripted: Callable[[Script], ScriptedServer],
) -> None:
    server = scripted(imap_script("IMAP4rev1 LOGINDISABLED AUTH=PLAIN", {"AUTHENTICATE": sasl_ok}))
    client = _open(server.port, Credentials("password", "alice", SECRET))
    close_client(client)
    assert server.sasl == [f"\0alice\0{SECRET}".encode()]


def test_login_disabled_without_plain_fails_without_sending_the_password(
    scripted: Callable[[Script], ScriptedServer],
) -> None:
    server = scripted(imap_script("IMAP4rev1 LOGINDISABLED", {"LOGIN": ok}))
    with pytest.raises(ImapAuthError) as info:
        _open(server.port, Credentials("password", "alice", SECRET))
    assert info.value.code == "login_disabled"
    server.close()
    assert not any(SECRET.encode() in line for line in server.received)


def test_echoed_secrets_are_scrubbed(scripted: Callable[[Script], ScriptedServer]) -> None:
    def echo(io: Exchange, tag: str, line: bytes) -> None:
        io.send(f"{tag} NO [AUTHENTICATIONFAILED] you sent: {line.decode().strip()}")

    def echo_sasl(io: Exchange, tag: str, line: bytes) -> None:
        io.send("+ ")
        sent = io.read_sasl()
        io.send(f"{tag} NO [AUTHENTICATIONFAILED] you sent {sent} = {base64.b64decode(sent)!r}")

    server = scripted(imap_script("IMAP4rev1", {"LOGIN": echo}))
    with pytest.raises(ImapAuthError) as info:
        _open(server.port, Credentials("password", "alice", SECRET))
    assert "alice" in str(info.value)
    assert "s3cr3t" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    server = scripted(imap_script("IMAP4rev1 AUTH=XOAUTH2", {"AUTHENTICATE": echo_sasl}))
    with pytest.raises(ImapAuthError) as info:
        _open(server.port, Credentials("oauth2", "bob", "tok-123456"))
    assert "tok-123456" not in str(info.value)
    sent = base64.b64encode(b"user=bob\x01auth=Bearer tok-123456\x01\x01").decode()
    assert sent not in str(info.value)


@pytest.mark.parametrize(
    ("reply", "kind", "detail"),
    [
        (
            "{tag} NO [UNAVAILABLE] Temporary authentication failure.",
            ImapTransientError,
            "unavailable",
        ),
        ("* BYE [LIMIT] Too many connections", ImapTransientError, "limit"),
        ("", ImapTransientError, "network"),
        (
            "{tag} NO [AUTHENTICATIONFAILED] Authentication failed.",
            ImapAuthError,
            "authenticationfailed",
        ),
    ],
)
def test_login_failures_are_classified(
    scripted: Callable[[Script], ScriptedServer], reply: str, kind: type, detail: str
) -> None:
    def answer(io: Exchange, tag: str, line: bytes) -> None:
        if reply:
            io.send(reply.format(tag=tag))
        io.conn.shutdown(socket.SHUT_RDWR)

    server = scripted(imap_script("IMAP4rev1", {"LOGIN": answer}))
    with pytest.raises(kind) as info:
        _open(server.port, Credentials("password", "alice", SECRET))
    assert getattr(info.value, "reason", getattr(info.value, "code", None)) == detail


@pytest.mark.parametrize(
    "banner", ["+OK POP3 server ready", "SSH-2.0-OpenSSH_9.6 internal-bastion-7"]
)
def test_a_server_that_is_not_imap_is_its_own_error_and_not_echoed(
    scripted: Callable[[Script], ScriptedServer], banner: str
) -> None:
    server = scripted(lambda io: io.send(banner))
    with pytest.raises(ImapTransientError) as info:
        _open(server.port, Credentials("password", "alice", SECRET))
    assert info.value.reason == "not_imap"
    assert "did not answer with an IMAP greeting" in str(info.value)
    # What an internal service says never reaches error_message / last_error.
    assert banner.split(maxsplit=1)[0] not in str(info.value)
    assert "internal" not in str(info.value) and "POP3" not in str(info.value)


def test_a_bye_greeting_is_a_transient_unavailable(
    scripted: Callable[[Script], ScriptedServer],
) -> None:
    server = scripted(lambda io: io.send("* BYE Server is busy, try later"))
    with pytest.raises(ImapTransientError) as info:
        _open(server.port, Credentials("password", "alice", SECRET))
    assert info.value.reason == "unavailable"


def test_capabilities_are_decoded_and_sorted(
    scripted: Callable[[Script], ScriptedServer],
) -> None:
    server = scripted(imap_script("IMAP4rev1 IDLE AUTH=PLAIN ENABLE", {"LOGIN": ok}))
    client = _open(server.port, Credentials("password", "alice", SECRET))
    try:
        assert capabilities(client) == ("AUTH=PLAIN", "ENABLE", "IDLE", "IMAP4REV1")
    finally:
        close_client(client)


# ---------------------------------------------------------------- real Dovecot

AWKWARD_PASSWORDS = ('q"uo\\te (x) {3}', "pässwörd-日本")


@pytest.fixture(scope="module")
def users(dovecot: Dovecot) -> dict[str, ImapUser]:
    made = {"plain": dovecot.add_user(), "starttls": dovecot.add_user(),
            "tls": dovecot.add_user(), "wrong": dovecot.add_user()}  # fmt: skip
    made |= {password: dovecot.add_user(password=password) for password in AWKWARD_PASSWORDS}
    return made


@pytest.fixture(scope="module")
def trusted(dovecot: Dovecot) -> ssl.SSLContext:
    """Our own context: system CAs plus the test CA."""
    return tls_context(str(dovecot.cafile))


def _dovecot_open(
    dovecot: Dovecot, security: str, creds: Credentials, context: ssl.SSLContext | None
) -> Any:
    port = dovecot.tls_port if security == "tls" else dovecot.plain_port
    return open_client(
        "localhost", port, security, creds,  # type: ignore[arg-type]
        timeout_s=7.0, connect_timeout_s=5.0, ssl_context=context,
    )  # fmt: skip


@pytest.mark.parametrize("security", ["plain", "starttls", "tls"])
def test_login_on_dovecot(
    dovecot: Dovecot, users: dict[str, ImapUser], trusted: ssl.SSLContext, security: str
) -> None:
    client = _dovecot_open(dovecot, security, Credentials("password", *users[security]), trusted)
    try:
        assert client.socket().gettimeout() == 7.0
        caps = capabilities(client)
        assert "IDLE" in caps and "IMAP4REV1" in caps
        assert list(caps) == sorted(caps)
        assert (security != "plain") == isinstance(client.socket(), ssl.SSLSocket)
        assert client.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"] > 0
    finally:
        close_client(client)


@pytest.mark.parametrize("password", AWKWARD_PASSWORDS)
def test_awkward_passwords_on_dovecot(
    dovecot: Dovecot, users: dict[str, ImapUser], trusted: ssl.SSLContext, password: str
) -> None:
    creds = Credentials("password", *users[password])
    close_client(_dovecot_open(dovecot, "starttls", creds, trusted))


def test_wrong_password_on_dovecot(
    dovecot: Dovecot, users: dict[str, ImapUser], trusted: ssl.SSLContext
) -> None:
    wrong = users["wrong"].password + "-wrong"
    with pytest.raises(ImapAuthError) as info:
        _dovecot_open(dovecot, "tls", Credentials("password", users["wrong"].name, wrong), trusted)
    assert info.value.code == "authenticationfailed"
    assert wrong not in str(info.value)
    assert str(info.value).startswith(f"localhost:{dovecot.tls_port}: ")


def test_closed_port_is_refused() -> None:
    with pytest.raises(ImapTransientError) as info:
        _open(free_port(), Credentials("password", "a", "b"), "tls")
    assert info.value.reason == "refused"


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_untrusted_certificate(dovecot: Dovecot, users: dict[str, ImapUser], security: str) -> None:
    system_only = tls_context()
    creds = Credentials("password", *users[security])
    with pytest.raises(ImapTransientError) as info:
        _dovecot_open(dovecot, security, creds, system_only)
    assert info.value.reason == "tls_certificate"


def test_tls_on_the_plain_port_is_a_tls_error(dovecot: Dovecot, trusted: ssl.SSLContext) -> None:
    with pytest.raises(ImapTransientError) as info:
        open_client(
            "localhost", dovecot.plain_port, "tls", Credentials("password", "a", "b"),
            timeout_s=5.0, connect_timeout_s=5.0, ssl_context=trusted,
        )  # fmt: skip
    assert info.value.reason == "tls"


def test_too_many_connections_is_a_transient_limit(
    dovecot_factory: Callable[..., Dovecot],
) -> None:
    limit = (
        "mail_max_userip_connections = 1\nprotocol imap {\n  mail_max_userip_connections = 1\n}\n"
    )
    server = dovecot_factory(extra_conf=limit)
    creds = Credentials("password", *server.add_user())
    first = _dovecot_open(server, "plain", creds, None)
    try:
        with pytest.raises(ImapTransientError) as info:
            _dovecot_open(server, "plain", creds, None)
        assert info.value.reason == "limit"
    finally:
        close_client(first)


class _Introspection(http.server.BaseHTTPRequestHandler):
    """RFC 7662 token introspection for Dovecot's oauth2 passdb: tokens "good-<user>"."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        token = urllib.parse.parse_qs(body).get("token", [""])[0]
        if token.startswith("good-"):
            answer = {"active": "true", "username": token.removeprefix("good-")}
        else:
            answer = {"active": "false"}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module", params=["XOAUTH2", "OAUTHBEARER"])
def oauth_dovecot(request: pytest.FixtureRequest) -> Iterator[tuple[Dovecot, ImapUser]]:
    """A Dovecot whose oauth2 passdb asks a local introspection endpoint, and one user;
    offering both token mechanisms (XOAUTH2 is chosen), or OAUTHBEARER only."""
    mechanisms = "xoauth2 oauthbearer" if request.param == "XOAUTH2" else "oauthbearer"
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Introspection)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    server = start_dovecot(
        oauth2_introspection_url=f"http://127.0.0.1:{httpd.server_port}/",
        extra_conf=f"auth_mechanisms = plain login {mechanisms}\n",
    )
    try:
        user = server.add_user()
        yield server, user
    finally:
        server.close()
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_oauth2_login_on_dovecot(
    oauth_dovecot: tuple[Dovecot, ImapUser], request: pytest.FixtureRequest
) -> None:
    server, user = oauth_dovecot
    creds = Credentials("oauth2", user.name, f"good-{user.name}")
    client = _dovecot_open(server, "plain", creds, None)
    try:
        assert client.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"] > 0
    finally:
        close_client(client)
    mechanism = request.node.callspec.params["oauth_dovecot"]
    # Dovecot writes its login line asynchronously: wait for it instead of reading once.
    wanted = f"user=<{user.name}>, method={mechanism}"
    wait_until(lambda: wanted in server.log_text(), timeout_s=10)


def test_rejected_oauth2_token_on_dovecot(oauth_dovecot: tuple[Dovecot, ImapUser]) -> None:
    server, user = oauth_dovecot
    with pytest.raises(ImapAuthError) as info:
        _dovecot_open(server, "plain", Credentials("oauth2", user.name, "revoked-token-xyz"), None)
    assert info.value.code == "authenticationfailed"
    assert "revoked-token-xyz" not in str(info.value)
