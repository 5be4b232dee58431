"""Ingestion against the real Dovecot, PostgreSQL and Redis: IDLE → fetch → parse → publish."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardworker.db.models import provider_key
from shardworker.db.ownership import OwnershipStore
from shardworker.pool.leases import lease_key
from shardworker.sink.base import Fence
from shardworker.sink.redis_streams import uid_key
from tests.support import (
    Rig,
    WorkerProcess,
    events,
    make_mail,
    message_ids,
    rig_settings,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def make_rig(
    migrated_dsn: str, redis_url: str, dovecot: Any, dovecot_factory: Any
) -> Iterator[Any]:
    # Depending on dovecot_factory makes pytest stop the rigs before any extra server.
    rigs: list[Rig] = []

    def factory(server: Any = None, **overrides: str) -> Rig:
        server = server or dovecot
        r = Rig(rig_settings(migrated_dsn, redis_url, str(server.cafile), **overrides), server)
        rigs.append(r)
        return r

    yield factory
    for r in rigs:
        r.close()


def connected(r: Rig, pid: str) -> bool:
    return r.row(pid)["status"] == "connected" and bool(r.row(pid)["folder_state"])


def test_new_mail_becomes_exactly_one_event_with_every_field(make_rig: Any, dovecot: Any) -> None:
    user, password = dovecot.add_user()
    r = make_rig()
    pid = r.add_provider(user, password)
    r.start()
    wait_until(lambda: connected(r, pid))
    raw = make_mail(
        subject="Printer on fire: Ünïcode ✓",
        sender="Alice Sender <alice@example.com>",
        to="Bob <bob@example.com>, carol@example.com",
        cc="Dan <dan@example.com>",
        text="plain body\n",
        html="<p>html body</p>",
        message_id="<m1@example.com>",
        attachments=[("report.pdf", "application/pdf", b"%PDF-1.4 fake" * 10)],
        headers={
            "In-Reply-To": "<parent@example.com>",
            "References": "<root@example.com> <parent@example.com>",
        },
    )
    dovecot.append(user, "INBOX", raw)
    wait_until(lambda: events(r.redis), timeout_s=5)
    time.sleep(0.5)
    [event] = events(r.redis)
    fields = event["fields"]
    assert list(fields) == [
        "event_id",
        "execution_id",
        "event_name",
        "event_type",
        "tenant",
        "timestamp",
        "user_id",
        "from_state",
        "to_state",
        "payload_json",
    ]
    assert fields["event_type"] == fields["event_name"] == "INBOUND_EMAIL_RECEIVED"
    assert fields["tenant"] == r.tenant and fields["timestamp"].endswith("Z")
    payload = event["payload"]
    assert payload["tenantId"] == payload["tenant"] == r.tenant
    assert payload["providerId"] == pid and payload["occurredAt"].endswith("Z")
    data = payload["emailData"]
    assert data["id"] == "<m1@example.com>"
    assert data["subject"] == "Printer on fire: Ünïcode ✓"
    assert data["from"] == {"email": "alice@example.com", "name": "Alice Sender"}
    assert [a["email"] for a in data["to"]] == ["bob@example.com", "carol@example.com"]
    assert data["cc"][0]["email"] == "dan@example.com"
    assert data["body"]["text"].strip() == "plain body"
    assert "<p>html body</p>" in data["body"]["html"]
    [att] = data["attachments"]
    assert (att["name"], att["contentType"], att["size"]) == ("report.pdf", "application/pdf", 130)
    assert data["threadId"] == "<root@example.com>"
    assert data["inReplyTo"] == "<parent@example.com>"
    assert data["references"] == ["<root@example.com>", "<parent@example.com>"]
    assert data["headers"]["subject"] == "Printer on fire: Ünïcode ✓"
    assert data["receivedAt"].endswith("Z")
    assert None not in data.values()
    [row] = r.ledger(pid)
    assert row[3:] == ("<m1@example.com>", event["id"], "published")
    from tests.zodcheck import validate_payloads

    [verdict] = validate_payloads([payload])
    assert verdict["shapeA"] is True and verdict["shapeB"] is True, verdict


def test_first_sync_starts_from_now(make_rig: Any, dovecot: Any) -> None:
    user, password = dovecot.add_user()
    dovecot.append(user, "INBOX", make_mail(subject="old mail"))
    r = make_rig()
    pid = r.add_provider(user, password)
    r.start()
    wait_until(lambda: connected(r, pid))
    dovecot.append(user, "INBOX", make_mail(subject="new mail"))
    wait_until(lambda: events(r.redis), timeout_s=5)
    time.sleep(0.3)
    assert [e["payload"]["emailData"]["subject"] for e in events(r.redis)] == ["new mail"]


def test_mail_that_arrived_while_down_is_published_once(make_rig: Any, dovecot: Any) -> None:
    user, password = dovecot.add_user()
    r = make_rig()
    pid = r.add_provider(user, password)
    r.start()
    wait_until(lambda: connected(r, pid))
    r.stop()
    sent = [f"<down{i}@example.com>" for i in range(5)]
    for mid in sent:
        dovecot.append(user, "INBOX", make_mail(message_id=mid))
    r.start()
    wait_until(lambda: len(events(r.redis)) >= 5, timeout_s=10)
    r.stop()
    r.start()  # a second restart must find nothing new to publish
    time.sleep(1.0)
    assert sorted(message_ids(r.redis)) == sorted(sent)
    assert [row[5] for row in r.ledger(pid)] == ["published"] * 5


def test_published_but_not_checkpointed_is_not_published_again(make_rig: Any, dovecot: Any) -> None:
    """A worker killed between XADD and the checkpoint: the redo finds the dedupe key."""
    user, password = dovecot.add_user()
    r = make_rig()
    pid = r.add_provider(user, password)
    r.start()
    wait_until(lambda: connected(r, pid))
    r.stop()
    uid = dovecot.append(user, "INBOX", make_mail(message_id="<crash@example.com>"))
    validity = dovecot.folder_status(user, "INBOX")["UIDVALIDITY"]
    r.redis.set(uid_key(r.tenant, pid, "INBOX", validity, uid), "1700000000000-0")
    r.start()
    wait_until(lambda: r.ledger(pid), timeout_s=10)
    assert events(r.redis) == []
    [row] = r.ledger(pid)
    assert row[2:] == (uid, "<crash@example.com>", "1700000000000-0", "duplicate")


def test_the_engine_publishes_under_the_fence_it_is_handed(make_rig: Any, dovecot: Any) -> None:
    """Fences arrive keyed by ``tenant:provider_id`` (as the pool agent holds leases): a
    provider whose lease someone else holds publishes nothing, its neighbour with its own
    lease publishes.  (Looked up by the bare provider id, every provider ran unfenced.)"""
    r = make_rig()
    users = [dovecot.add_user() for _ in range(2)]
    mine, theirs = (r.add_provider(u, p) for u, p in users)
    ownership = OwnershipStore(r.pool)
    epochs = ownership.acquire_epochs([(r.tenant, mine), (r.tenant, theirs)], "test")
    fences = {}
    for pid, holder in ((mine, "me"), (theirs, "someone-else")):
        key = lease_key(r.tenant, pid)
        r.redis.set(key, f"{holder}|{epochs[r.tenant, pid]}", px=60_000)
        fences[provider_key(r.tenant, pid)] = Fence(key, f"me|{epochs[r.tenant, pid]}",
                                                    epochs[r.tenant, pid])  # fmt: skip
    r.start(fences)
    wait_until(lambda: connected(r, mine) and connected(r, theirs))
    for (user, _), mid in zip(users, ("<fenced-mine@example.com>", "<fenced-theirs@example.com>"),
                              strict=True):  # fmt: skip
        dovecot.append(user, "INBOX", make_mail(message_id=mid))
    wait_until(lambda: r.ledger(mine), timeout_s=10)
    time.sleep(1.5)  # the fenced neighbour had as long
    assert message_ids(r.redis) == ["<fenced-mine@example.com>"]
    assert r.ledger(theirs) == []


def test_uidvalidity_change_does_not_flood_old_mail(make_rig: Any, dovecot: Any) -> None:
    user, password = dovecot.add_user()
    r = make_rig()
    pid = r.add_provider(user, password)
    r.start()
    wait_until(lambda: connected(r, pid))
    for i in range(3):
        dovecot.append(user, "INBOX", make_mail(message_id=f"<before{i}@example.com>"))
    wait_until(lambda: len(events(r.redis)) == 3, timeout_s=5)
    r.stop()
    old = dovecot.folder_status(user, "INBOX")["UIDVALIDITY"]
    dovecot.set_uidvalidity(user, "INBOX", old + 1000)
    r.start()
    wait_until(lambda: r.row(pid)["uid_validity"] == str(old + 1000), timeout_s=10)
    dovecot.append(user, "INBOX", make_mail(message_id="<after@example.com>"))
    wait_until(lambda: len(events(r.redis)) == 4, timeout_s=5)
    time.sleep(0.5)
    assert message_ids(r.redis)[-1] == "<after@example.com>"
    assert len(events(r.redis)) == 4


def test_folder_filters_non_ascii_and_missing(make_rig: Any, dovecot: Any) -> None:
    user, password = dovecot.add_user()
    dovecot.create_folder(user, "Entwürfe")
    r = make_rig()
    pid = r.add_provider(user, password, folders=["inbox", "Entwürfe", "Later"])
    r.start()
    wait_until(lambda: set(r.row(pid)["folder_state"]) == {"INBOX", "Entwürfe"}, timeout_s=10)
    # Status is written back in batches, a moment after the folders resolve.
    wait_until(lambda: "Later" in (r.row(pid)["error_message"] or ""), timeout_s=5)
    dovecot.append(user, "Entwürfe", make_mail(message_id="<draft@example.com>"))
    dovecot.append(user, "INBOX", make_mail(message_id="<inbox@example.com>"))
    wait_until(lambda: len(events(r.redis)) == 2, timeout_s=5)
    dovecot.create_folder(user, "Later")
    wait_until(lambda: "Later" in r.row(pid)["folder_state"], timeout_s=10)
    dovecot.append(user, "Later", make_mail(message_id="<later@example.com>"))
    wait_until(lambda: len(events(r.redis)) == 3, timeout_s=5)
    assert sorted(message_ids(r.redis)) == [
        "<draft@example.com>",
        "<inbox@example.com>",
        "<later@example.com>",
    ]


def test_polling_fallback_when_the_server_hides_idle(make_rig: Any, dovecot_factory: Any) -> None:
    server = dovecot_factory(hide_idle=True)
    user, password = server.add_user()
    r = make_rig(server)
    pid = r.add_provider(user, password)
    r.start()
    wait_until(lambda: connected(r, pid))
    assert "IDLE" not in r.row(pid)["server_capabilities"]
    server.append(user, "INBOX", make_mail(message_id="<polled@example.com>"))
    wait_until(lambda: events(r.redis), timeout_s=5)
    assert message_ids(r.redis) == ["<polled@example.com>"]


def test_wrong_password_backs_off_then_pauses(make_rig: Any, dovecot: Any) -> None:
    user, _ = dovecot.add_user()
    r = make_rig(auth_failure_pause_threshold="3")
    pid = r.add_provider(user, "wrong-password-123")
    r.start()
    wait_until(lambda: r.row(pid)["inbound_paused_at"] is not None, timeout_s=15)
    row = r.row(pid)
    assert row["inbound_pause_reason"] == "auth_failure"
    assert row["inbound_auth_failure_count"] == 3
    assert row["status"] == "error"
    failures = dovecot.log_text().count(f"user=<{user}>")
    time.sleep(2.0)  # well past the auth backoff: a paused provider makes no further attempts
    assert 3 <= failures <= 4  # bounded: one login per backoff step, none after the pause
    assert dovecot.log_text().count(f"user=<{user}>") == failures


def test_dovecot_restart_reconnects_and_loses_nothing(make_rig: Any, dovecot_factory: Any) -> None:
    server = dovecot_factory()
    user, password = server.add_user()
    r = make_rig(server)
    pid = r.add_provider(user, password)
    r.start()
    wait_until(lambda: connected(r, pid))
    server.append(user, "INBOX", make_mail(message_id="<pre@example.com>"))
    wait_until(lambda: len(events(r.redis)) == 1, timeout_s=5)
    server.restart()
    server.append(user, "INBOX", make_mail(message_id="<post1@example.com>"))
    server.append(user, "INBOX", make_mail(message_id="<post2@example.com>"))
    wait_until(lambda: len(events(r.redis)) == 3, timeout_s=15)
    time.sleep(0.5)
    assert sorted(message_ids(r.redis)) == [
        "<post1@example.com>",
        "<post2@example.com>",
        "<pre@example.com>",
    ]


def test_backpressure_stops_fetching_instead_of_trimming(make_rig: Any, dovecot: Any) -> None:
    user, password = dovecot.add_user()
    r = make_rig(stream_maxlen="1000", backpressure_max_lag="5", backpressure_check_s="0")
    pid = r.add_provider(user, password, max_per_sync=2)
    r.redis.xgroup_create("workflow:events:global", "workflow-runtime-v2", id="$", mkstream=True)
    r.start()
    wait_until(lambda: connected(r, pid))
    for i in range(20):
        dovecot.append(user, "INBOX", make_mail(message_id=f"<bp{i}@example.com>"))
    time.sleep(3.0)
    held = len(events(r.redis))
    assert 5 <= held <= 6  # the bound plus at most one batch in flight
    consumed = 0
    while consumed < 20:
        got = r.redis.xreadgroup(
            "workflow-runtime-v2", "c1", {"workflow:events:global": ">"}, count=100, block=3000
        )
        for _, entries in got:
            consumed += len(entries)
            r.redis.xack("workflow:events:global", "workflow-runtime-v2", *[e[0] for e in entries])
        if not got:
            break
    assert consumed == 20
    assert sorted(message_ids(r.redis)) == sorted(f"<bp{i}@example.com>" for i in range(20))


def test_bad_mail_becomes_an_event_or_a_dead_letter(make_rig: Any, dovecot: Any) -> None:
    from pathlib import Path

    corpus = sorted((Path(__file__).parent / "corpus" / "malformed").glob("*.eml"))
    assert len(corpus) >= 8
    user, password = dovecot.add_user()
    r = make_rig()
    pid = r.add_provider(user, password)
    r.start()
    wait_until(lambda: connected(r, pid))
    for path in corpus:
        dovecot.append(user, "INBOX", path.read_bytes())
    dovecot.append(user, "INBOX", make_mail(message_id="<after-bad@example.com>"))
    wait_until(lambda: len(r.ledger(pid)) == len(corpus) + 1, timeout_s=15)
    statuses = [row[5] for row in r.ledger(pid)]
    dlq = r.redis.xlen("shardworker:dlq")
    assert statuses.count("published") + statuses.count("dead_lettered") == len(corpus) + 1
    assert len(events(r.redis)) == statuses.count("published")
    assert dlq == statuses.count("dead_lettered")
    assert "<after-bad@example.com>" in message_ids(r.redis)
    from tests.zodcheck import validate_payloads

    verdicts = validate_payloads([e["payload"] for e in events(r.redis)])
    assert all(v["union"] for v in verdicts), verdicts


@pytest.mark.timeout(240)
def test_sigkill_mid_batch_leaves_no_duplicate_and_no_gap(
    make_rig: Any, dovecot: Any, tmp_dir: Any
) -> None:
    user, password = dovecot.add_user()
    r = make_rig(sync_threads="2")
    pid = r.add_provider(user, password, max_per_sync=50)
    worker = WorkerProcess(r.settings, str(tmp_dir / "worker.log"))
    worker.start()
    try:
        try:
            wait_until(lambda: connected(r, pid), timeout_s=60)
        except AssertionError:
            print(Path(worker.log_path).read_text()[-6000:])  # the pool's own account
            raise
        worker.stop()
        sent = [f"<kill{i}@example.com>" for i in range(3000)]
        dovecot.append_many(user, "INBOX", [make_mail(message_id=m) for m in sent])
        worker.start()
        wait_until(lambda: r.redis.xlen("workflow:events:global") >= 400, timeout_s=60)
        worker.signal(signal.SIGKILL)
        worker.wait()
        killed_at = r.redis.xlen("workflow:events:global")
        assert killed_at < 3000, "the drain finished before the kill; raise the backlog"
        worker.start()
        wait_until(lambda: r.redis.xlen("workflow:events:global") >= 3000, timeout_s=90)
        time.sleep(1.0)
    finally:
        worker.stop()
    got = message_ids(r.redis)
    assert len(got) == 3000, f"{len(got) - len(set(got))} duplicate(s)"
    assert sorted(got) == sorted(sent)
    ledger = r.ledger(pid)
    assert len(ledger) == 3000
    assert {row[5] for row in ledger} <= {"published", "duplicate"}


@pytest.mark.timeout(240)
def test_40mb_message_is_published_within_the_caps(
    make_rig: Any, dovecot: Any, tmp_dir: Any
) -> None:
    import os as _os

    user, password = dovecot.add_user()
    r = make_rig()
    pid = r.add_provider(user, password)
    worker = WorkerProcess(r.settings, str(tmp_dir / "worker.log"))
    worker.start()
    try:
        wait_until(lambda: connected(r, pid), timeout_s=20)
        big = [
            (f"scan{i}.bin", "application/octet-stream", _os.urandom(7_500_000)) for i in range(4)
        ]
        raw = make_mail(message_id="<huge@example.com>", text="see attachments\n", attachments=big)
        assert len(raw) > 40_000_000
        dovecot.append(user, "INBOX", raw)
        del raw, big
        wait_until(lambda: events(r.redis), timeout_s=60)
        peak_mib = worker.peak_rss_kib() / 1024
    finally:
        worker.stop()
    [event] = events(r.redis)
    data = event["payload"]["emailData"]
    assert data["id"] == "<huge@example.com>"
    assert data["body"]["text"].strip() == "see attachments"
    assert [a["name"] for a in data["attachments"]] == [f"scan{i}.bin" for i in range(4)]
    assert all("content" not in a for a in data["attachments"])
    reasons = {(s["type"], s["reason"]) for s in data["ingressSkipReasons"]}
    assert ("raw_mime", "raw_mime_over_max_bytes") in reasons
    print(f"40 MB message: worker peak RSS {peak_mib:.0f} MiB")
    # The raw message is ~41 MB; fetching only headers and text parts keeps the worker small.
    assert peak_mib < 200, f"worker peak RSS {peak_mib:.0f} MiB"
    from tests.zodcheck import validate_payloads

    [verdict] = validate_payloads([event["payload"]])
    assert verdict["shapeA"] and verdict["shapeB"], verdict


def test_connection_attempts_per_host_are_capped(make_rig: Any, dovecot: Any) -> None:
    r = make_rig(connect_concurrency_per_host="2", sync_threads="6")
    pids = [r.add_provider(*dovecot.add_user()) for _ in range(12)]
    ctx = r.start()
    wait_until(lambda: all(connected(r, p) for p in pids), timeout_s=20)
    # Six threads could connect six at once; the per-host cap holds it at two.
    assert ctx.engine.stats.peak_host_connecting == 2
    assert ctx.engine.stats.connects == 12


def test_idle_is_reissued_on_a_timer(make_rig: Any, dovecot: Any) -> None:
    user, password = dovecot.add_user()
    r = make_rig(idle_refresh_s="0.5")
    pid = r.add_provider(user, password)
    ctx = r.start()
    wait_until(lambda: connected(r, pid))
    wait_until(lambda: ctx.engine.stats.idle_refreshes >= 3, timeout_s=5)
    dovecot.append(user, "INBOX", make_mail(message_id="<after-refresh@example.com>"))
    wait_until(lambda: events(r.redis), timeout_s=5)
    assert message_ids(r.redis) == ["<after-refresh@example.com>"]
