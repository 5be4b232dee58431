"""The loop guard's demonstration (issue 20, "Done when"), end to end on the real engine.

Two mailboxes on the real Dovecot auto-reply to each other: the test plays both
auto-responders, answering every event the engine publishes for one of them with a reply
from that mailbox to the other, without any auto-reply header (the loop classification
cannot see; only the per-sender rate guard can stop it).  Meanwhile a colleague of the
same domain keeps writing normal mail.  The guard (limit 5 here) must stop the ping-pong
after 5 messages each way and record the held ones in the ledger, and every colleague's
message must still be published.

Without the guard the responders run into their safety cap (``SAFETY_ROUNDS``) and the
counts below fail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.support import Rig, counter, events, make_mail, rig_settings, wait_until

pytestmark = pytest.mark.timeout(120)

LIMIT = 5
SAFETY_ROUNDS = LIMIT + 3  # per direction; the loop is endless without the guard
QUIET_S = 3.0


@pytest.fixture
def rig(migrated_dsn: str, redis_url: str, dovecot: Any) -> Iterator[Rig]:
    settings = rig_settings(
        migrated_dsn, redis_url, str(dovecot.cafile), loop_rate_limit=str(LIMIT)
    )
    r = Rig(settings, dovecot)
    yield r
    r.close()


def connected(r: Rig, pid: str) -> bool:
    return r.row(pid)["status"] == "connected" and bool(r.row(pid)["folder_state"])


def held_rows(r: Rig, pid: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(r.settings.database_url) as conn:
        return conn.execute(
            "SELECT status, reason FROM shardworker_ledger WHERE provider_id = %s "
            "AND status = 'skipped'",
            (pid,),
        ).fetchall()


def test_two_auto_responders_are_stopped_while_colleagues_get_through(
    rig: Rig, dovecot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    trips_before = counter("shardworker_loop_guard_trips")
    (user_a, pw_a), (user_b, pw_b) = dovecot.add_user(), dovecot.add_user()
    pid = {user_a: rig.add_provider(user_a, pw_a), user_b: rig.add_provider(user_b, pw_b)}
    address = {user: f"{user}@example.com" for user in pid}
    owner = {address[user]: user for user in pid}
    rig.start()
    wait_until(lambda: connected(rig, pid[user_a]) and connected(rig, pid[user_b]), 15)

    def send(sender: str, rcpt_user: str, subject: str) -> None:
        dovecot.append(rcpt_user, "INBOX", make_mail(
            sender=sender, to=address[rcpt_user], subject=subject, text="I am away.\n"
        ))  # fmt: skip

    send(address[user_b], user_a, "Out of office")
    replies = {user_a: 0, user_b: 0}
    colleague_sent = 0
    seen = 0
    last_news = time.monotonic()
    while time.monotonic() - last_news < QUIET_S:
        batch = events(rig.redis)[seen:]
        if not batch:
            time.sleep(0.1)
            continue
        seen += len(batch)
        last_news = time.monotonic()
        for event in batch:
            data = event["payload"]["emailData"]
            sender, rcpt = data["from"]["email"], data["to"][0]["email"]
            if sender not in owner or replies[owner[rcpt]] >= SAFETY_ROUNDS:
                continue
            replies[owner[rcpt]] += 1
            send(rcpt, owner[sender], "Re: " + data["subject"])  # the auto-responder answers
            if replies[owner[rcpt]] % 2 == 0:
                colleague_sent += 1
                send("carol@example.com", user_a, f"Printer question {colleague_sent}")

    published = [
        (e["payload"]["providerId"], e["payload"]["emailData"]["from"]["email"])
        for e in events(rig.redis)
    ]
    assert published.count((pid[user_a], address[user_b])) == LIMIT
    assert published.count((pid[user_b], address[user_a])) == LIMIT
    assert published.count((pid[user_a], "carol@example.com")) == colleague_sent > 0
    assert held_rows(rig, pid[user_a]) == [("skipped", "sender_rate_limited")]
    assert held_rows(rig, pid[user_b]) == []  # the loop ended at the first hold
    # The trip is counted once and logged once, with the sender's domain, not its address.
    assert counter("shardworker_loop_guard_trips") - trips_before == 1
    trips = [r for r in caplog.records if r.getMessage() == "loop_guard_tripped"]
    assert len(trips) == 1
