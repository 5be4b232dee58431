"""Gmail and Exchange dialects (issue 20, items 1, 2 and 4): shardworker.imap.dialects against
the scripted providers of tests/dialect_imap.py, over real imapclient connections, beside a
healthy Dovecot mailbox."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from shardworker.errors import ImapAuthError, ImapThrottledError, ImapTransientError
from shardworker.imap import dialects
from shardworker.imap.connect import Credentials, classify_error, open_client
from shardworker.imap.dialects import Dialect
from shardworker.imap.session import FolderSession
from tests.dialect_imap import GMAIL_CONNECTION_LIMIT, GMAIL_MSGID_BASE, DialectImap
from tests.support import make_mail

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server() -> Iterator[DialectImap]:
    srv = DialectImap().start()
    srv.gmail_port = srv.listen("gmail")  # type: ignore[attr-defined]
    srv.exchange_port = srv.listen("exchange")  # type: ignore[attr-defined]
    yield srv
    srv.close()


def connect(port: int) -> IMAPClient:
    return IMAPClient("127.0.0.1", port, ssl=False, timeout=5)


def greeting(client: IMAPClient) -> bytes:
    return bytes(client.welcome)


_users = iter(range(1, 10_000))


def user(role: str, suffix: str = "") -> str:
    return f"{role}-{next(_users)}{suffix}"


# -- pure ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "delay"),
    [
        ("NO Request is throttled. Suggested Backoff Time: 2000 milliseconds", 2.0),
        ("Request is throttled. Suggested Backoff Time: 150 ms", 0.15),
        ("NO [THROTTLED] Request is throttled.", dialects.DEFAULT_THROTTLE_S),
        ("NO [throttled] slow down", dialects.DEFAULT_THROTTLE_S),
        ("Request is throttled. Suggested Backoff Time: 99999999999 milliseconds", 900.0),
        ("NO [AUTHENTICATIONFAILED] Invalid credentials", None),
        ("NO [LIMIT] too many", None),
    ],
)
def test_throttle_delay(text: str, delay: float | None) -> None:
    assert dialects.throttle_delay_s(text) == delay


def test_detect_dialect_from_shapes() -> None:
    assert dialects.detect_dialect([b"IMAP4rev1", b"X-GM-EXT-1"]) is Dialect.GMAIL
    assert dialects.detect_dialect(["IMAP4rev1"], b"* OK The Microsoft Exchange IMAP4 service")
    assert dialects.detect_dialect(["IMAP4", "IMAP4REV1", "AUTH=XOAUTH2"]) is Dialect.EXCHANGE
    assert dialects.detect_dialect(["IMAP4rev1", "IDLE"], b"* OK Dovecot ready.") is (
        Dialect.GENERIC
    )


@pytest.mark.parametrize(
    ("username", "secret", "caps", "mech"),
    [
        ("alice@contoso.example", "pw", [], "login"),
        ("alice@contoso.example/support@contoso.example", "pw", [], "login"),
        ("CONTOSO\\alice\\support", "pw", [], "login"),
        ("alice@contoso.example", "pässword", [], "plain"),
        ("alice@contoso.example", "pw", ["LOGINDISABLED"], "plain"),
    ],
)
def test_password_mechanism(username: str, secret: str, caps: list[str], mech: str) -> None:
    assert dialects.password_mechanism(username, secret, caps) == mech


@pytest.mark.parametrize(
    ("secret", "caps", "why"),
    [("pässword", [], "non-ASCII"), ("pw", ["LOGINDISABLED"], "disables")],
)
def test_shared_mailbox_without_login_is_a_clear_error(
    secret: str, caps: list[str], why: str
) -> None:
    with pytest.raises(ImapAuthError, match=why) as caught:
        dialects.password_mechanism("alice@contoso.example/support@contoso.example", secret, caps)
    assert caught.value.code == "unsupported_mechanism" and secret not in str(caught.value)


def test_not_connected_message_names_the_causes() -> None:
    text = "NO User is authenticated but not connected."
    shared = dialects.classify_provider_answer(
        text, where="imap:993", username="a@x.example/s@x.example", auth_type="password"
    )
    assert isinstance(shared, ImapAuthError) and shared.code == "not_connected"
    message = str(shared)
    assert "shared-mailbox login is wrong" in message and "connection cap" in message
    oauth = dialects.classify_provider_answer(text, username="s@x.example", auth_type="oauth2")
    assert oauth is not None and "IMAP.AccessAsUser.All" in str(oauth)
    assert "shared mailbox" in str(oauth)


def test_gmail_answers() -> None:
    cap = dialects.classify_provider_answer("NO [ALERT] Too many simultaneous connections.")
    assert isinstance(cap, ImapTransientError) and cap.reason == "limit"
    assert not isinstance(cap, ImapAuthError)
    bw = dialects.classify_provider_answer(
        "NO [ALERT] Account exceeded command or bandwidth limits. (Failure)"
    )
    assert isinstance(bw, ImapThrottledError) and bw.retry_after_s == 3600
    app = dialects.classify_provider_answer(
        "NO [ALERT] Application-specific password required: https://support.google.com/..."
    )
    assert isinstance(app, ImapAuthError) and app.code == "app_password_required"
    assert dialects.classify_provider_answer("NO [AUTHENTICATIONFAILED] Invalid") is None


def test_gmail_attrs_parse_and_apply() -> None:
    item: dict[bytes, Any] = {
        b"X-GM-MSGID": 1278455344230334865,
        b"X-GM-THRID": 1278455344230334000,
        b"X-GM-LABELS": (b"\\Inbox", b"Muy Importante", b"&AMQ-nderungen"),
    }
    attrs = dialects.gmail_attrs(item)
    assert attrs is not None
    assert attrs.labels == ("\\Inbox", "Muy Importante", "Änderungen")
    assert attrs.dedupe_key == "gm:1278455344230334865"
    assert dialects.gmail_attrs({b"X-GM-MSGID": b"junk"}) is None
    assert dialects.gmail_attrs({}) is None
    data = {"id": "<a@x>", "headers": {"subject": "hi", "x-shardworker-gmail-labels": "forged"}}
    out = dialects.apply_gmail(data, attrs)
    assert out["threadId"] == "1278455344230334000"
    assert json.loads(out["headers"]["x-shardworker-gmail-labels"]) == list(attrs.labels)
    assert out["headers"]["x-shardworker-gmail-msgid"] == "1278455344230334865"
    assert data["headers"]["x-shardworker-gmail-labels"] == "forged"  # input untouched
    threaded = dialects.apply_gmail({"threadId": "<root@x>"}, attrs)
    assert threaded["threadId"] == "<root@x>"  # References / In-Reply-To win


# -- Gmail against the scripted server ---------------------------------------------------------


def test_gmail_detected_all_mail_and_x_gm_fetch(server: Any, dovecot: Any, imap_user: Any) -> None:
    name = user("gmail")
    for i in range(3):
        server.deliver(name, make_mail(subject=f"m{i}"))
    q = server.quirks_of(name)
    q.labels = {0: ("\\Inbox", "\\Important"), 1: ("Muy Importante", "&AMQ-nderungen")}
    q.thread_of = {2: 0}
    client = connect(server.gmail_port)
    try:
        assert dialects.detect_dialect(client.capabilities(), greeting(client)) is Dialect.GMAIL
        client.login(name, "app-password")
        caps = client.capabilities()
        assert dialects.detect_dialect(caps) is Dialect.GMAIL
        all_mail = dialects.all_mail_folder(client.list_folders("", "*"))
        assert all_mail == "[Gmail]/Alle Nachrichten"
        session = FolderSession(all_mail)
        session.attach(client, [c.decode() for c in caps])
        session.examine()
        items = dialects.meta_fetch_items(Dialect.GMAIL)
        got = session._fetch_range("1:*", items)
    finally:
        client.logout()
    attrs = {uid: dialects.gmail_attrs(item) for uid, item in got.items()}
    assert set(attrs) == {1, 2, 3}
    assert attrs[1] is not None and attrs[1].msgid == GMAIL_MSGID_BASE
    assert attrs[1].labels == ("\\Inbox", "\\Important")
    assert attrs[2] is not None and attrs[2].labels == ("Muy Importante", "Änderungen")
    assert attrs[3] is not None and attrs[3].thrid == attrs[1].thrid  # same thread
    assert got[1][b"RFC822.SIZE"] > 0  # the usual metadata still arrives

    # Beside it, the healthy Dovecot: generic, no \All folder, the generic FETCH works.
    name2, password = imap_user
    plain = IMAPClient("127.0.0.1", dovecot.plain_port, ssl=False, timeout=5)
    try:
        assert dialects.detect_dialect(plain.capabilities(), greeting(plain)) is Dialect.GENERIC
        plain.login(name2, password)
        assert dialects.all_mail_folder(plain.list_folders("", "*")) is None
        plain.append("INBOX", make_mail(subject="dovecot"))
        session = FolderSession("INBOX")
        session.attach(plain, [c.decode() for c in plain.capabilities()])
        session.examine()
        rows = session._fetch_range("1:*", dialects.meta_fetch_items(Dialect.GENERIC))
        assert [dialects.gmail_attrs(item) for item in rows.values()] == [None]
    finally:
        plain.logout()


def test_gmail_connection_cap_is_transient(server: Any) -> None:
    name = user("gmail")
    clients = []
    try:
        for _ in range(GMAIL_CONNECTION_LIMIT):
            c = connect(server.gmail_port)
            c.login(name, "pw")
            clients.append(c)
        extra = connect(server.gmail_port)
        with pytest.raises(LoginError) as caught:
            extra.login(name, "pw")
        extra.shutdown()
    finally:
        for c in clients:
            c.logout()
    text = str(caught.value)
    generic = classify_error(caught.value)
    assert isinstance(generic, ImapAuthError)  # what today's classification would do
    found = dialects.classify_provider_answer(text)
    assert isinstance(found, ImapTransientError) and found.reason == "limit"
    assert server.refused[name] == 1


# -- Exchange against the scripted server -------------------------------------------------------


def test_exchange_detected_from_greeting(server: Any) -> None:
    client = connect(server.exchange_port)
    try:
        assert dialects.detect_dialect(client.capabilities(), greeting(client)) is (
            Dialect.EXCHANGE
        )
        assert dialects.detect_dialect(client.capabilities()) is Dialect.EXCHANGE
    finally:
        client.shutdown()


@pytest.mark.parametrize(("ms", "expected"), [(1500, 1.5), (None, dialects.DEFAULT_THROTTLE_S)])
def test_exchange_throttling_is_a_backoff(server: Any, ms: int | None, expected: float) -> None:
    name = user("exchange")
    server.deliver(name, make_mail())
    q = server.quirks_of(name)
    q.throttle_commands, q.throttle_ms = 1, ms
    client = connect(server.exchange_port)
    try:
        client.login(name, "pw")
        with pytest.raises(IMAPClientError) as caught:
            client.select_folder("INBOX", readonly=True)
        error = dialects.classify_provider_answer(str(caught.value))
        assert isinstance(error, ImapThrottledError)
        assert error.retry_after_s == expected and error.reason == "throttled"
        # Honoured, the next try works: the throttle was a delay, not a failure.
        assert client.select_folder("INBOX", readonly=True)[b"EXISTS"] == 1
    finally:
        client.logout()
    assert q.throttled == 1


def test_exchange_throttle_with_bye_and_at_login(server: Any) -> None:
    name = user("exchange")
    q = server.quirks_of(name)
    q.throttle_commands, q.throttle_ms, q.throttle_bye = 1, 299910, True
    client = connect(server.exchange_port)
    client.login(name, "pw")
    with pytest.raises(IMAPClientError) as caught:
        client.select_folder("INBOX", readonly=True)
    client.shutdown()
    error = dialects.classify_provider_answer(str(caught.value))
    assert isinstance(error, ImapThrottledError) and error.retry_after_s == 299.91
    # Throttled at login: today's rules call that rejected credentials (a pause after 5);
    # the dialect rule must run first.
    q.throttle_logins, q.throttle_bye = 1, False
    client = connect(server.exchange_port)
    with pytest.raises(LoginError) as refused:
        client.login(name, "pw")
    assert isinstance(classify_error(refused.value), ImapAuthError)
    assert isinstance(dialects.classify_provider_answer(str(refused.value)), ImapThrottledError)
    client.login(name, "pw")  # the next login goes through
    client.logout()


def test_exchange_shared_mailbox_login_not_plain(server: Any) -> None:
    name = user("exchange", "/support@contoso.example")
    mech = dialects.password_mechanism(name, "pw", [c.decode() for c in _caps(server)])
    assert mech == "login"
    refused = connect(server.exchange_port)
    with pytest.raises(LoginError):
        refused.plain_login(name, "pw")  # what AUTHENTICATE PLAIN would get
    refused.shutdown()
    assert server.plain_refused[name] == 1
    creds = Credentials("password", name, "pw")
    client = open_client(
        "127.0.0.1", server.exchange_port, "plain", creds, timeout_s=5, connect_timeout_s=5,
        ssl_context=None,
    )  # fmt: skip
    try:
        assert client.select_folder("INBOX", readonly=True)[b"EXISTS"] == 0
    finally:
        client.logout()


def _caps(server: Any) -> tuple[bytes, ...]:
    client = connect(server.exchange_port)
    try:
        return tuple(client.capabilities())
    finally:
        client.shutdown()


def test_exchange_authenticated_but_not_connected(server: Any) -> None:
    name = user("exchange", "/shared@contoso.example")
    server.quirks_of(name).not_connected = True
    client = connect(server.exchange_port)
    try:
        client.login(name, "pw")  # the login itself succeeds
        with pytest.raises(IMAPClientError) as caught:
            client.select_folder("INBOX", readonly=True)
    finally:
        client.logout()
    generic = classify_error(caught.value)
    assert not isinstance(generic, ImapAuthError)  # today: a protocol error, retried forever
    error = dialects.classify_provider_answer(
        str(caught.value), where="outlook:993", username=name, auth_type="password"
    )
    assert isinstance(error, ImapAuthError) and error.code == "not_connected"
    assert "shared-mailbox login is wrong" in str(error)
