"""Entering IDLE never forgets an EXISTS the server announced just before.

Found by the chaos run (bench/chaos.py): a message that lands after Dovecot evaluated the
last ``UID FETCH n:*`` of a drain is announced once, as ``* n EXISTS`` in that command's
answer, and never again in IDLE.  ``enter_idle`` used to clear that answer, so the message
waited for the next event in the mailbox or the IDLE refresh (240 s by default); the
chaos run measured 24 s.  The race window is microseconds wide, so these tests put the
announcement in the answer of a NOOP instead, which is the same thing to the session.
"""

from __future__ import annotations

import random
from typing import Any

from shardworker.engine.state import idle_refresh_delay
from shardworker.imap.session import FolderSession
from tests.support import make_mail


def _session(dovecot: Any) -> tuple[FolderSession, Any, str, int]:
    user, _ = dovecot.add_user()
    dovecot.append(user, "INBOX", make_mail())
    client = dovecot.connect(user)
    session = FolderSession("INBOX")
    session.attach(client, [c.decode() for c in client.capabilities()])
    status = session.examine()
    return session, client, user, status.uid_next - 1


def test_an_exists_announced_before_idle_makes_enter_idle_report_data(dovecot: Any) -> None:
    session, client, user, top = _session(dovecot)
    try:
        assert session.new_messages(top) == []
        dovecot.append(user, "INBOX", make_mail(message_id="<late@example.com>"))
        client.noop()  # its answer carries "* 2 EXISTS", as the last UID FETCH's would
        assert session.enter_idle() is True
        session.leave_idle()
        assert [m.uid for m in session.new_messages(top)] == [top + 1]
    finally:
        session.close(logout=True)


def test_nothing_announced_means_nothing_buffered(dovecot: Any) -> None:
    """EXAMINE's own EXISTS is not news: a fresh session goes straight to IDLE."""
    session, _, _, top = _session(dovecot)
    try:
        assert session.new_messages(top) == []
        assert session.enter_idle() is False
    finally:
        session.close(logout=True)


def test_idle_refreshes_of_slots_that_connected_together_spread_out() -> None:
    """The soak's 10,000 folders connected within 70 s and then refreshed IDLE in the same
    70 s every 240 s; pushes queued behind those waves (up to 47 s late)."""
    rng = random.Random(1)
    first = [idle_refresh_delay(240.0, True, rng) for _ in range(10_000)]
    later = [idle_refresh_delay(240.0, False, rng) for _ in range(10_000)]
    assert max(first) <= 240.0 and max(later) <= 240.0  # never past the interval
    assert min(first) >= 120.0 and max(first) - min(first) > 110.0
    assert min(later) >= 192.0
