"""Lean dedupe state against the real servers (issue 15, docs/DESIGN.md "Lean dedupe state").

Redis keeps dedupe keys only between a batch's XADD and its ledger commit; the ledger
answers afterwards, and a per-process claim closes the race between two folders of one
provider.  Exactly-once is counted by Message-ID on what a consumer group actually read,
while every shardworker dedupe key is evicted, and across a Redis restart that loses
everything (no persistence).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson
import pytest
import redis

from shardworker.sink import SinkFactory
from shardworker.sink.base import Fence, Outbound, PublishResult
from shardworker.sink.housekeeping import Housekeeper
from shardworker.sink.redis_streams import RedisStreamsSink
from tests.harness.net import free_port, wait_for_port
from tests.support import Rig, events, make_mail, message_ids, rig_settings, wait_until

pytestmark = pytest.mark.timeout(180)

STREAM = "workflow:events:global"
GROUP = "workflow-runtime-v2"


def dedupe_keys(client: redis.Redis) -> list[bytes]:
    return [*client.scan_iter("sw:pub:*", count=1000), *client.scan_iter("sw:mid:*", count=1000)]


class Consumer:
    """A consumer group member that reads continuously and survives a Redis restart."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=2)
        self.read: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Consumer:
        self._ensure_group()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.client.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=100, block=200)
            except redis.ResponseError:  # NOGROUP: Redis restarted empty
                self._ensure_group_quietly()
                continue
            except redis.ConnectionError:
                time.sleep(0.1)
                continue
            for _, entries in got or ():
                for entry_id, fields in entries:
                    payload = orjson.loads(fields[b"payload_json"])
                    self.read[payload["emailData"]["id"]] += 1
                    self.client.xack(STREAM, GROUP, entry_id)

    def _ensure_group_quietly(self) -> None:
        try:
            self._ensure_group()
        except redis.RedisError:
            time.sleep(0.1)


class SlowSink(RedisStreamsSink):
    """Widens the gap between a batch's ledger check and its publish, where the race between
    two folders lives: without the claim, the other folder's commit and settle fit in it."""

    def publish_batch(self, batch: Sequence[Outbound], fence: Fence | None) -> list[PublishResult]:
        time.sleep(random.uniform(0.0, 0.15))
        return super().publish_batch(batch, fence)


SLOW: Mapping[str, SinkFactory] = {
    "redis-streams": lambda settings, client: SlowSink(client, settings)
}


@pytest.fixture
def make_rig(migrated_dsn: str, dovecot: Any) -> Iterator[Any]:
    rigs: list[Rig] = []

    def factory(redis_url: str, **overrides: str) -> Rig:
        settings = rig_settings(migrated_dsn, redis_url, str(dovecot.cafile), **overrides)
        r = Rig(settings, dovecot, sinks=SLOW)
        rigs.append(r)
        return r

    yield factory
    for r in rigs:
        r.close()


def two_folder_provider(r: Rig, dovecot: Any) -> tuple[str, str]:
    user, password = dovecot.add_user()
    dovecot.create_folder(user, "Archive")
    pid = r.add_provider(user, password, folders=["INBOX", "Archive"], max_per_sync=5)
    r.start()
    wait_until(lambda: len(r.row(pid)["folder_state"] or {}) == 2, timeout_s=20)
    return user, pid


def file_in_both(dovecot: Any, user: str, mids: list[str]) -> None:
    """The same messages appended to both folders at once, as a copy rule would."""
    raws = [make_mail(message_id=mid) for mid in mids]
    threads = [
        threading.Thread(target=dovecot.append_many, args=(user, folder, raws))
        for folder in ("INBOX", "Archive")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def test_two_folders_one_message_one_event_and_no_keys_left(
    make_rig: Any, dovecot: Any, redis_url: str
) -> None:
    r = make_rig(redis_url)
    user, pid = two_folder_provider(r, dovecot)
    mids = [f"<both{i}@example.com>" for i in range(40)]
    for start in range(0, 40, 10):
        file_in_both(dovecot, user, mids[start : start + 10])
    wait_until(lambda: len(r.ledger(pid)) == 80, timeout_s=60)
    assert Counter(message_ids(r.redis)) == Counter(dict.fromkeys(mids, 1))
    statuses = Counter(row[5] for row in r.ledger(pid))
    assert statuses == {"published": 40, "duplicate": 40}
    # Committed means settled: the ledger answers, Redis keeps no dedupe key for them.
    assert dedupe_keys(r.redis) == []


def test_every_dedupe_key_evicted_mid_run_keeps_exactly_once(
    make_rig: Any, dovecot: Any, redis_url: str
) -> None:
    r = make_rig(redis_url)
    user, pid = two_folder_provider(r, dovecot)
    stop, evicted = threading.Event(), [0]

    def evict() -> None:
        client = redis.Redis.from_url(redis_url)
        while not stop.is_set():
            keys = dedupe_keys(client)
            if keys:
                evicted[0] += client.unlink(*keys)
            time.sleep(0.002)
        client.close()

    mids = [f"<evict{i}@example.com>" for i in range(60)]
    with Consumer(redis_url) as consumer:
        evictor = threading.Thread(target=evict, daemon=True)
        evictor.start()
        for start in range(0, 60, 10):
            file_in_both(dovecot, user, mids[start : start + 10])
            r.stop()  # a restart mid-run: the new engine sees only the ledger
            r.start()
        wait_until(lambda: len(r.ledger(pid)) == 120, timeout_s=90)
        stop.set()
        evictor.join(5)
        wait_until(lambda: sum(consumer.read.values()) >= 60, timeout_s=20)
        time.sleep(0.5)
        assert consumer.read == Counter(dict.fromkeys(mids, 1))
    assert evicted[0] > 0, "the evictor never found a key: the test proved nothing"
    assert Counter(message_ids(r.redis)) == Counter(dict.fromkeys(mids, 1))


@pytest.fixture
def volatile_redis() -> Iterator[tuple[str, Any]]:
    """A redis-server without persistence that the test can kill and start again."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed")
    port, workdir = free_port(), tempfile.mkdtemp(prefix="sw-redis-volatile-")
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", workdir]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_port(port)

    def kill() -> None:
        procs[-1].kill()
        procs[-1].wait(10)

    start()
    try:
        yield f"redis://127.0.0.1:{port}/0", type("Server", (), {"start": start, "kill": kill})
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_redis_restart_without_persistence_keeps_exactly_once(
    make_rig: Any, dovecot: Any, volatile_redis: tuple[str, Any]
) -> None:
    url, server = volatile_redis
    r = make_rig(url)
    user, pid = two_folder_provider(r, dovecot)
    before = [f"<pre{i}@example.com>" for i in range(20)]
    during = [f"<down{i}@example.com>" for i in range(20)]
    after = [f"<post{i}@example.com>" for i in range(20)]
    with Consumer(url) as consumer:
        file_in_both(dovecot, user, before)
        wait_until(lambda: len(consumer.read) == 20, timeout_s=30)
        server.kill()  # every key, stream and lease gone with it
        file_in_both(dovecot, user, during)
        time.sleep(1.0)
        server.start()
        file_in_both(dovecot, user, after)
        wait_until(lambda: len(r.ledger(pid)) == 120, timeout_s=90)
        wait_until(lambda: len(consumer.read) == 60, timeout_s=30)
        time.sleep(0.5)
        assert consumer.read == Counter(dict.fromkeys(before + during + after, 1))
    assert len(events(r.redis)) == 40  # what the new, empty Redis received


def test_a_stopped_consumer_group_stops_fetching_and_loses_nothing(
    make_rig: Any, dovecot: Any, redis_url: str
) -> None:
    r = make_rig(redis_url, backpressure_max_lag="5", backpressure_check_s="0")
    house = Housekeeper(r.redis, r.settings)
    user, password = dovecot.add_user()
    pid = r.add_provider(user, password, max_per_sync=2)
    r.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)  # nobody reads it yet
    r.start()
    wait_until(lambda: bool(r.row(pid)["folder_state"]), timeout_s=20)
    mids = [f"<stalled{i}@example.com>" for i in range(20)]
    dovecot.append_many(user, "INBOX", [make_mail(message_id=m) for m in mids])
    wait_until(lambda: len(events(r.redis)) >= 5, timeout_s=30)
    time.sleep(2.0)  # time to overshoot, if it would
    held = len(events(r.redis))
    assert 5 <= held <= 6  # the bound plus at most one batch in flight
    for _ in range(3):
        house.run()
    assert len(events(r.redis)) == held  # unread: never trimmed
    with Consumer(redis_url) as consumer:
        wait_until(lambda: len(consumer.read) == 20, timeout_s=30)
        assert consumer.read == Counter(dict.fromkeys(mids, 1))
    house.run()
    assert r.redis.xlen(STREAM) <= 1  # everything read is gone (MINID keeps the last one)
    assert dedupe_keys(r.redis) == []
