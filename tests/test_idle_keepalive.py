"""Keepalive-only wakes are handled on the loop thread, without a sync cycle (issue 14).

Dovecot's ``* OK Still here`` (every 2 min) reaches every idling session at once; at
5,000 folders each one used to run a full cycle on the sync threads, and a real push
queued 882 ms behind 4,999 empty cycles.  A bare keepalive only proves liveness; an
untagged EXISTS (or anything not understood) still starts a cycle, and an EXISTS that
arrives in the same segment as a keepalive is not lost.
"""

from __future__ import annotations

import select
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from shardworker.imap.connect import Credentials, Security, open_client
from shardworker.imap.idlewake import Wake, is_keepalive, keepalive_prefix, read_idle_wake
from shardworker.imap.session import FolderSession
from tests.hostile_imap import HostileImap
from tests.support import Rig, make_mail, message_ids, rig_settings, wait_until

pytestmark = pytest.mark.timeout(60)

PASSWORD = "Keepalive-Secret-1"
KEEPALIVE = b"* OK Still here\r\n"


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileImap]:
    server = HostileImap().start()
    yield server
    server.close()


def send_to_idlers(server: HostileImap, user: str, data: bytes, mail: bytes | None = None) -> None:
    """Write ``data`` in one piece to the user's idling connections (after adding ``mail``
    to the mailbox, so an EXISTS in ``data`` is true)."""

    def send() -> None:
        box = server.mailbox(user)
        if mail is not None:
            box.raws.append(mail)
        for conn in list(box.idlers):
            conn.writer.write(data)

    server._call(send)


# -- the classification alone -------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "keepalive"),
    [
        (b"* OK Still here\r\n", True),
        (b"* ok still here\r\n", True),
        (b"* OK\r\n", True),
        (b"* OK [ALERT] quota nearly full\r\n", False),  # a response code: let a cycle see it
        (b"* OK [UIDVALIDITY 7] changed\r\n", False),
        (b"* 3 EXISTS\r\n", False),
        (b"* 1 RECENT\r\n", False),
        (b"* 2 EXPUNGE\r\n", False),
        (b"* 1 FETCH (FLAGS (\\Seen))\r\n", False),
        (b"* BYE shutting down\r\n", False),
        (b"* OKAY\r\n", False),
        (b"* OK text {5}\r\n", False),  # imaplib would read a literal after it
        (b"a1 OK IDLE terminated\r\n", False),
    ],
)
def test_only_a_bare_untagged_ok_is_a_keepalive(line: bytes, keepalive: bool) -> None:
    assert is_keepalive(line) is keepalive


def test_the_keepalive_prefix_stops_at_the_first_other_or_partial_line() -> None:
    assert keepalive_prefix(KEEPALIVE * 2) == 2 * len(KEEPALIVE)
    assert keepalive_prefix(KEEPALIVE + b"* 4 EXISTS\r\n") == len(KEEPALIVE)
    assert keepalive_prefix(KEEPALIVE + b"* OK Still") == len(KEEPALIVE)  # partial: not eaten
    assert keepalive_prefix(b"* 4 EXISTS\r\n" + KEEPALIVE) == 0


# -- on a real socket: what the loop thread reads ------------------------------------------


def _idle_session(host: str, port: int, security: Security, user: str, password: str, *,
                  ssl_context: Any = None) -> FolderSession:  # fmt: skip
    client = open_client(
        host, port, security, Credentials("password", user, password), timeout_s=5,
        connect_timeout_s=5, ssl_context=ssl_context,
    )  # fmt: skip
    session = FolderSession("INBOX")
    session.attach(client, ["IMAP4rev1", "IDLE"])
    session.examine()
    assert session.enter_idle() is False
    return session


def _wait_readable(session: FolderSession, timeout_s: float = 5.0) -> None:
    assert session.sock is not None
    readable, _, _ = select.select([session.sock], [], [], timeout_s)
    assert readable, f"nothing arrived within {timeout_s} s"


def test_a_keepalive_is_consumed_and_the_session_stays_in_step(hostile: HostileImap) -> None:
    user = f"good-{uuid.uuid4().hex[:8]}"
    session = _idle_session("127.0.0.1", hostile.port, "plain", user, PASSWORD)
    try:
        send_to_idlers(hostile, user, KEEPALIVE * 3)
        _wait_readable(session)
        time.sleep(0.05)  # all three lines in
        assert read_idle_wake(session) is Wake.KEEPALIVE
        assert session.sock is not None and session.sock.gettimeout() == 5  # restored
        assert select.select([session.sock], [], [], 0.2)[0] == []  # nothing left behind
        session.leave_idle()  # DONE → the tagged OK: imaplib reads exactly where it should
        assert session.new_messages(0) == []
    finally:
        session.close(logout=False)


def test_an_exists_in_the_same_segment_as_a_keepalive_is_activity(
    hostile: HostileImap,
) -> None:
    user = f"good-{uuid.uuid4().hex[:8]}"
    session = _idle_session("127.0.0.1", hostile.port, "plain", user, PASSWORD)
    try:
        send_to_idlers(hostile, user, KEEPALIVE + b"* 1 EXISTS\r\n", mail=make_mail())
        _wait_readable(session)
        assert read_idle_wake(session) is Wake.ACTIVITY
        session.leave_idle()
        assert [m.uid for m in session.new_messages(0)] == [1]
    finally:
        session.close(logout=False)


def test_an_exists_right_after_a_consumed_keepalive_wakes_the_selector_again(
    hostile: HostileImap,
) -> None:
    user = f"good-{uuid.uuid4().hex[:8]}"
    session = _idle_session("127.0.0.1", hostile.port, "plain", user, PASSWORD)
    try:
        send_to_idlers(hostile, user, KEEPALIVE)
        _wait_readable(session)
        assert read_idle_wake(session) is Wake.KEEPALIVE
        send_to_idlers(hostile, user, b"* 1 EXISTS\r\n", mail=make_mail())
        _wait_readable(session)
        assert read_idle_wake(session) is Wake.ACTIVITY
    finally:
        session.close(logout=False)


def test_a_closed_connection_is_activity_for_the_cycle_to_report(hostile: HostileImap) -> None:
    user = f"good-{uuid.uuid4().hex[:8]}"
    session = _idle_session("127.0.0.1", hostile.port, "plain", user, PASSWORD)
    try:
        hostile._call(lambda: [c.close() for c in list(hostile.mailbox(user).idlers)])
        _wait_readable(session)
        assert read_idle_wake(session) is Wake.ACTIVITY
    finally:
        session.close(logout=False)


def test_dovecots_own_keepalive_over_tls_is_recognised(dovecot_factory: Any) -> None:
    """The real server's line, through the TLS object's buffer, then a real EXISTS."""
    server = dovecot_factory(extra_conf="imap_idle_notify_interval = 1 secs\n")
    user, password = server.add_user()
    session = _idle_session(server.host, server.tls_port, "tls", user, password,
                            ssl_context=server.ssl_context())  # fmt: skip
    try:
        for _ in range(2):
            _wait_readable(session, timeout_s=10)
            assert read_idle_wake(session) is Wake.KEEPALIVE
        server.append(user, "INBOX", make_mail())
        wakes = []
        while not wakes or wakes[-1] is Wake.KEEPALIVE:  # a keepalive may come first
            _wait_readable(session, timeout_s=10)
            wakes.append(read_idle_wake(session))
        session.leave_idle()
        assert len(session.new_messages(0)) == 1
    finally:
        session.close(logout=False)


# -- the engine: keepalives schedule no cycle; an EXISTS does ------------------------------


@pytest.fixture
def rig(migrated_dsn: str, redis_url: str, dovecot: Any) -> Iterator[Rig]:
    r = Rig(rig_settings(migrated_dsn, redis_url, str(dovecot.cafile)), dovecot)
    yield r
    r.close()


def test_keepalives_schedule_no_cycle_and_an_exists_with_one_is_published(
    hostile: HostileImap, rig: Rig
) -> None:
    user = f"good-{uuid.uuid4().hex[:8]}"
    rig.add_provider(user, PASSWORD, port=hostile.port)
    ctx = rig.start()
    box = hostile.mailbox(user)
    wait_until(lambda: len(box.idlers) == 1, timeout_s=10)
    time.sleep(0.2)  # the first cycle's outcome applied: registered in the selector
    commands, idles = dict(box.commands), len(box.idle_entered)

    for sent in range(1, 6):
        send_to_idlers(hostile, user, KEEPALIVE)
        wait_until(lambda: ctx.engine.stats.keepalives >= sent, timeout_s=5)  # noqa: B023
    time.sleep(0.3)
    assert dict(box.commands) == commands, "a keepalive ran a cycle"
    assert len(box.idle_entered) == idles and len(box.idlers) == 1

    mid = "<with-a-keepalive@example.com>"
    send_to_idlers(hostile, user, KEEPALIVE + b"* 1 EXISTS\r\n", mail=make_mail(message_id=mid))
    wait_until(lambda: mid in message_ids(rig.redis), timeout_s=5)
    assert ctx.engine.stats.keepalives == 5  # that wake was activity, not a keepalive
    assert box.commands["UID"] > commands.get("UID", 0)  # the cycle fetched

    mid2 = "<plain-exists@example.com>"
    hostile.deliver(user, make_mail(message_id=mid2))
    wait_until(lambda: mid2 in message_ids(rig.redis), timeout_s=5)
    assert message_ids(rig.redis) == [mid, mid2]
