"""Gmail and Microsoft 365 behaviour through the real engine (issue 20, items 1, 2 and 4).

Each test runs an in-process worker engine against the scripted providers of
tests/dialect_imap.py and, beside them, a healthy mailbox on the real Dovecot, whose mail
must keep flowing whatever the scripted provider does.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from shardworker.budget import budget_key
from shardworker.engine.resync import ResyncRequest
from tests.dialect_imap import GMAIL_MSGID_BASE, DialectImap
from tests.support import Rig, counter, events, make_mail, rig_settings, wait_until

pytestmark = pytest.mark.timeout(90)

_users = itertools.count(1)


def user(role: str, suffix: str = "") -> str:
    return f"{role}-{next(_users)}-{time.monotonic_ns()}{suffix}"


@pytest.fixture(scope="module")
def server() -> Iterator[DialectImap]:
    srv = DialectImap().start()
    srv.gmail_port = srv.listen("gmail")  # type: ignore[attr-defined]
    srv.exchange_port = srv.listen("exchange")  # type: ignore[attr-defined]
    yield srv
    srv.close()


@pytest.fixture
def make_rig(migrated_dsn: str, redis_url: str, dovecot: Any) -> Iterator[Any]:
    rigs: list[Rig] = []

    def factory(**overrides: str) -> Rig:
        settings = rig_settings(migrated_dsn, redis_url, str(dovecot.cafile), **overrides)
        r = Rig(settings, dovecot)
        rigs.append(r)
        return r

    yield factory
    for r in rigs:
        r.close()


def connected(r: Rig, pid: str, folders: int = 1) -> bool:
    row = r.row(pid)
    return row["status"] == "connected" and len(row["folder_state"] or {}) >= folders


def published_subjects(r: Rig, pid: str) -> list[str]:
    return [
        e["payload"]["emailData"]["subject"]
        for e in events(r.redis)
        if e["payload"]["providerId"] == pid
    ]


def ledger_rows(r: Rig, pid: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(r.settings.database_url) as conn:
        return conn.execute(
            "SELECT folder, uid, message_id, status, reason FROM shardworker_ledger "
            "WHERE provider_id = %s ORDER BY folder, uid",
            (pid,),
        ).fetchall()


def healthy_dovecot(r: Rig, dovecot: Any) -> tuple[str, str]:
    name, password = dovecot.add_user()
    return name, r.add_provider(name, password)


# -- Microsoft 365 / Exchange -------------------------------------------------------------------


def test_exchange_throttling_is_honoured_as_a_backoff(
    make_rig: Any, server: Any, dovecot: Any
) -> None:
    r = make_rig()
    name = user("exchange")
    q = server.quirks_of(name)
    q.throttle_logins, q.throttle_ms = 1, 1500  # far above the 0.2 s reconnect backoff
    pid = r.add_provider(name, "pw", port=server.exchange_port)
    dname, dpid = healthy_dovecot(r, dovecot)
    throttled_before = counter("shardworker_imap_throttled")
    r.start()
    wait_until(lambda: connected(r, pid) and connected(r, dpid), 20)
    accepts = server.accepts[server.exchange_port]
    assert len(accepts) >= 2 and accepts[1] - accepts[0] >= 1.4  # waited as asked
    # Mid-session, with BAD and a hang-up as Exchange Online does under heavy load.
    q.throttle_commands, q.throttle_ms, q.throttle_bye = 1, 1000, True
    server.deliver(name, make_mail(subject="after the throttle"))
    dovecot.append(dname, "INBOX", make_mail(subject="dovecot meanwhile"))
    wait_until(lambda: published_subjects(r, pid) == ["after the throttle"], 20)
    wait_until(lambda: published_subjects(r, dpid) == ["dovecot meanwhile"], 10)
    assert q.throttled == 2
    row = r.row(pid)
    # Neither an error on the row nor a step towards the auth-failure pause.
    assert row["status"] == "connected" and row["inbound_auth_failure_count"] == 0
    assert row["inbound_paused_at"] is None
    assert counter("shardworker_imap_throttled") - throttled_before == 2


def test_exchange_not_connected_names_its_causes(make_rig: Any, server: Any, dovecot: Any) -> None:
    r = make_rig()
    name = user("exchange", "/shared@contoso.example")
    server.quirks_of(name).not_connected = True
    pid = r.add_provider(name, "pw", port=server.exchange_port)
    dname, dpid = healthy_dovecot(r, dovecot)
    r.start()
    wait_until(lambda: "not connected" in (r.row(pid)["error_message"] or ""), 20)
    message = r.row(pid)["error_message"]
    assert r.row(pid)["status"] == "error" and "Usual causes" in message
    assert "shared-mailbox login is wrong" in message and "connection cap" in message
    assert "pw" not in message.split(":")[-1].split()  # no secret, only causes
    wait_until(lambda: r.row(pid)["inbound_auth_failure_count"] >= 1, 10)
    wait_until(lambda: connected(r, dpid), 10)
    dovecot.append(dname, "INBOX", make_mail(subject="still flowing"))
    wait_until(lambda: published_subjects(r, dpid) == ["still flowing"], 10)


def test_exchange_shared_mailbox_logs_in_with_login(make_rig: Any, server: Any) -> None:
    r = make_rig()
    name = user("exchange", "/support@contoso.example")
    pid = r.add_provider(name, "pw", port=server.exchange_port)
    r.start()
    wait_until(lambda: connected(r, pid), 20)
    server.deliver(name, make_mail(subject="to the shared mailbox"))
    wait_until(lambda: published_subjects(r, pid) == ["to the shared mailbox"], 10)
    assert server.plain_refused[name] == 0


# -- Gmail ------------------------------------------------------------------------------------


def test_gmail_identity_threads_and_labels(make_rig: Any, server: Any, dovecot: Any) -> None:
    r = make_rig()
    name = user("gmail")
    q = server.quirks_of(name)
    q.labels = {0: ("\\Inbox", "\\Important"), 1: ("\\Inbox", "&AMQ-nderungen")}
    q.thread_of = {1: 0}
    # One message seen in two label folders: the same X-GM-MSGID, published once.
    pid = r.add_provider(name, "pw", port=server.gmail_port, folders=("INBOX", "Important"))
    dname, dpid = healthy_dovecot(r, dovecot)
    r.start()
    wait_until(lambda: connected(r, pid, folders=2) and connected(r, dpid), 20)
    server.deliver(name, make_mail(subject="first"))
    server.deliver(name, make_mail(subject="second", headers={"References": "<root@x>"}))
    dovecot.append(dname, "INBOX", make_mail(subject="dovecot"))
    wait_until(lambda: len(ledger_rows(r, pid)) == 4, 15)
    mine = [e["payload"]["emailData"] for e in events(r.redis) if e["payload"]["providerId"] == pid]
    assert sorted(d["subject"] for d in mine) == ["first", "second"]
    by_subject = {d["subject"]: d for d in mine}
    first, second = by_subject["first"], by_subject["second"]
    assert first["threadId"] == str(GMAIL_MSGID_BASE)  # X-GM-THRID: no References
    assert second["threadId"] != str(GMAIL_MSGID_BASE)  # its References win
    assert first["headers"]["x-shardworker-gmail-msgid"] == str(GMAIL_MSGID_BASE)
    assert json.loads(first["headers"]["x-shardworker-gmail-labels"]) == ["\\Inbox", "\\Important"]
    assert json.loads(second["headers"]["x-shardworker-gmail-labels"]) == ["\\Inbox", "Änderungen"]
    rows = ledger_rows(r, pid)
    assert {row[2] for row in rows} == {f"gm:{GMAIL_MSGID_BASE}", f"gm:{GMAIL_MSGID_BASE + 1}"}
    for ident in {row[2] for row in rows}:
        assert sorted(row[3] for row in rows if row[2] == ident) == ["duplicate", "published"]
    wait_until(lambda: published_subjects(r, dpid) == ["dovecot"], 10)


def test_gmail_all_mail_one_connection_for_the_asked_labels(make_rig: Any, server: Any) -> None:
    r = make_rig(gmail_all_mail="true")
    name = user("gmail")
    q = server.quirks_of(name)
    q.labels = {0: ("\\Inbox",), 1: ("\\Sent",), 2: ("Kunden/&AMQ-nderungen",)}
    pid = r.add_provider(name, "pw", port=server.gmail_port, folders=("INBOX", "Kunden/Änderungen"))
    r.start()
    wait_until(lambda: connected(r, pid), 20)
    assert list(r.row(pid)["folder_state"]) == ["[Gmail]/Alle Nachrichten"]
    assert server.logged_in[name] == 1  # one connection for two folders
    for subject in ("inbox", "sent by the helpdesk", "labelled"):
        server.deliver(name, make_mail(subject=subject))
    wait_until(lambda: len(ledger_rows(r, pid)) == 3, 15)
    assert sorted(published_subjects(r, pid)) == ["inbox", "labelled"]
    skipped = [row for row in ledger_rows(r, pid) if row[3] == "skipped"]
    assert [(row[1], row[4]) for row in skipped] == [(2, "gmail_label_not_watched")]


def test_gmail_backfill_respects_the_daily_budget(
    make_rig: Any, server: Any, redis_client: Any
) -> None:
    name = user("gmail")
    raws = [make_mail(subject=f"old {i}") for i in range(6)]
    for raw in raws:
        server.deliver(name, raw)  # before the first sync: old mail, only a backfill reads it
    limit = sum(len(raw) for raw in raws[:4])  # two batches of two fit, the third does not
    r = make_rig(gmail_daily_bytes=str(limit), gmail_live_reserve_bytes="0")
    pid = r.add_provider(name, "pw", port=server.gmail_port, max_per_sync=2)
    ctx = r.start()
    wait_until(lambda: connected(r, pid), 20)
    reports: list[tuple[str, dict[str, Any]]] = []
    request = ResyncRequest(
        None, datetime(2020, 1, 1, tzinfo=UTC), lambda s, f: reports.append((s, dict(f)))
    )
    ctx.engine.resync_provider(f"{r.tenant}:{pid}", request)
    wait_until(lambda: any(f["folders"].get("INBOX") == "waiting_budget" for _, f in reports), 15)
    state, fields = next((s, f) for s, f in reports if f["folders"]["INBOX"] == "waiting_budget")
    assert state == "running" and fields["published"] == 4
    budget = fields["gmail_budget"]
    assert budget["used_bytes"] == limit and budget["backfill_remaining_bytes"] == 0
    assert budget["limit_bytes"] == limit and budget["resets_at"].endswith("T00:00:00Z")
    time.sleep(0.5)
    assert sorted(published_subjects(r, pid)) == [f"old {i}" for i in range(4)]
    # The day resets: the next cycle (woken here by new mail) finishes the backfill.
    redis_client.delete(budget_key(name, datetime.now(UTC).strftime("%Y-%m-%d")))
    server.deliver(name, make_mail(subject="live"))
    wait_until(lambda: reports[-1][0] == "done", 15)
    expected = ["live"] + [f"old {i}" for i in range(6)]
    wait_until(lambda: sorted(published_subjects(r, pid)) == expected, 10)


# -- loop policies, per provider, on the real Dovecot ------------------------------------------


def test_loop_policies_per_provider(make_rig: Any, dovecot: Any) -> None:
    (strict_user, pw1), (open_user, pw2) = dovecot.add_user(), dovecot.add_user()
    r = make_rig(loop_policy="auto_reply=skip,bulk=flag,*=publish")
    strict = r.add_provider(strict_user, pw1)
    lenient = r.add_provider(open_user, pw2)
    overrides = json.dumps({lenient: "publish"})
    r.settings = rig_settings(
        r.settings.database_url, r.settings.redis_url, str(dovecot.cafile),
        loop_policy="auto_reply=skip,bulk=flag,*=publish", loop_policy_overrides=overrides,
    )  # fmt: skip
    skipped_before = counter("shardworker_loop_messages", {"class": "auto_reply", "action": "skip"})
    r.start()
    wait_until(lambda: connected(r, strict) and connected(r, lenient), 15)
    for name in (strict_user, open_user):
        dovecot.append(name, "INBOX", make_mail(subject="ooo", headers={
            "Auto-Submitted": "auto-replied", "X-Shardworker-Class": "normal",  # forged
        }))  # fmt: skip
        dovecot.append(name, "INBOX", make_mail(subject="news", headers={"List-Id": "<n.x>"}))
        dovecot.append(name, "INBOX", make_mail(subject="question"))
    wait_until(lambda: len(ledger_rows(r, strict)) == 3 and len(ledger_rows(r, lenient)) == 3, 15)
    data = {
        (e["payload"]["providerId"], e["payload"]["emailData"]["subject"]): e["payload"][
            "emailData"
        ]["headers"]
        for e in events(r.redis)
    }
    assert sorted(s for p, s in data if p == strict) == ["news", "question"]
    assert data[(strict, "news")]["x-shardworker-flag"] == "bulk"
    assert data[(strict, "question")]["x-shardworker-class"] == "normal"
    assert [row[3:] for row in ledger_rows(r, strict) if row[3] == "skipped"] == [
        ("skipped", "loop_policy: auto_reply")
    ]
    # The override publishes everything, classified, with the forged class replaced.
    assert data[(lenient, "ooo")]["x-shardworker-class"] == "auto_reply"
    assert "x-shardworker-flag" not in data[(lenient, "news")]
    after = counter("shardworker_loop_messages", {"class": "auto_reply", "action": "skip"})
    assert after - skipped_before == 1
