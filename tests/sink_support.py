"""A throwaway second sink behind the same interface, and a harness per sink.

``MemorySink`` keeps events in lists, checks the fence against its own lease table, and
dedupes by UID and Message-ID exactly as the interface requires.  It exists to prove the
seam: the engine runs on it with nothing but ``SHARDWORKER_SINK=memory`` and one entry in
the factory map (``build_worker(sinks=...)``); ``tests/test_sink.py`` runs the
exactly-once tests against it and against the Redis Streams sink.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from shardworker.config import Settings
from shardworker.errors import FencedError
from shardworker.sink import SINKS, SinkFactory
from shardworker.sink.base import DeadLetter, Fence, Outbound, PublishResult, Settled
from shardworker.sink.redis_streams import (
    POINTER_QUEUE,
    WORKFLOW_STREAM,
    RedisStreamsSink,
    message_id_key,
    uid_key,
)


class MemorySink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.leases: dict[str, str] = {}
        self.events: list[tuple[str, Outbound]] = []
        self.dead: list[tuple[str, DeadLetter]] = []
        self.by_uid: dict[tuple[str, str, int, int], tuple[str, bool]] = {}
        self.by_message_id: dict[tuple[str, str], str] = {}
        self._ids = itertools.count(1)
        self.prepared = False
        self.lagging = False

    def prepare(self) -> None:
        self.prepared = True

    def backpressured(self) -> bool:
        return self.lagging

    def last_backpressure(self) -> bool:
        return self.lagging

    def checks_rates(self) -> bool:
        return False  # the engine asks the loop guard itself

    def settle(self, settled: Sequence[Settled]) -> None:
        with self.lock:
            for s in settled:
                self.by_uid.pop((s.provider_id, s.folder, s.uid_validity, s.uid), None)
                if s.message_id:
                    self.by_message_id.pop((s.provider_id, s.message_id), None)

    def _check(self, fence: Fence | None, count: int) -> None:
        if fence is not None and self.leases.get(fence.lease_key) != fence.token:
            raise FencedError(f"lease {fence.lease_key} is not held: {count} of {count} writes")

    def publish_batch(self, batch: Sequence[Outbound], fence: Fence | None) -> list[PublishResult]:
        with self.lock:
            self._check(fence, len(batch))
            return [self._publish(out) for out in batch]

    def _publish(self, out: Outbound) -> PublishResult:
        own = (out.provider_id, out.folder, out.uid_validity, out.uid)
        if own in self.by_uid:
            entry, dead = self.by_uid[own]
            return PublishResult(out.uid, entry, duplicate=True, dead_lettered=dead)
        mid = (out.provider_id, out.message_id)
        if out.message_id and mid in self.by_message_id:
            self.by_uid[own] = (self.by_message_id[mid], False)
            return PublishResult(out.uid, self.by_message_id[mid], duplicate=True)
        entry = f"{next(self._ids)}-0"
        self.events.append((entry, out))
        self.by_uid[own] = (entry, False)
        if out.message_id:
            self.by_message_id[mid] = entry
        return PublishResult(out.uid, entry, duplicate=False)

    def dead_letter(self, letter: DeadLetter, fence: Fence | None) -> str:
        with self.lock:
            self._check(fence, 1)
            own = (letter.provider_id, letter.folder, letter.uid_validity, letter.uid)
            if own in self.by_uid:
                return self.by_uid[own][0]
            entry = f"{next(self._ids)}-0"
            self.dead.append((entry, letter))
            self.by_uid[own] = (entry, True)
            return entry


def with_memory_sink(sink: MemorySink) -> Mapping[str, SinkFactory]:
    """The factory map plus one line: what adding a sink to ``SINKS`` amounts to."""
    return {**SINKS, "memory": lambda settings, client: sink}


class RedisHarness:
    """Drives and observes the Redis Streams sink for the interface tests."""

    def __init__(self, client: redis.Redis, settings: Settings, tenant: str) -> None:
        self.client = client
        self.tenant = tenant
        self.sink = RedisStreamsSink(client, settings)

    def hold(self, fence: Fence, token: str | None = None) -> None:
        self.client.set(fence.lease_key, token or fence.token, px=10_000)

    def event_count(self) -> int:
        return int(self.client.xlen(WORKFLOW_STREAM))

    def dead_count(self) -> int:
        return int(self.client.xlen("shardworker:dlq"))

    def footprint(self) -> Any:
        return (
            self.client.xlen(WORKFLOW_STREAM),
            sorted(self.client.keys("sw:*")),
            self.client.lrange(POINTER_QUEUE, 0, -1),
            self.client.exists("shardworker:dlq"),
        )

    def known(self, provider_id: str, folder: str, uid_validity: int, uid: int) -> str | None:
        raw = self.client.get(uid_key(self.tenant, provider_id, folder, uid_validity, uid))
        return None if raw is None else raw.decode()

    def message_id_known(self, provider_id: str, message_id: str) -> bool:
        return bool(self.client.exists(message_id_key(self.tenant, provider_id, message_id)))


class MemoryHarness:
    def __init__(self) -> None:
        self.sink = MemorySink()

    def hold(self, fence: Fence, token: str | None = None) -> None:
        self.sink.leases[fence.lease_key] = token or fence.token

    def event_count(self) -> int:
        return len(self.sink.events)

    def dead_count(self) -> int:
        return len(self.sink.dead)

    def footprint(self) -> Any:
        return (list(self.sink.events), dict(self.sink.by_uid), list(self.sink.dead))

    def known(self, provider_id: str, folder: str, uid_validity: int, uid: int) -> str | None:
        hit = self.sink.by_uid.get((provider_id, folder, uid_validity, uid))
        return None if hit is None else hit[0]

    def message_id_known(self, provider_id: str, message_id: str) -> bool:
        return (provider_id, message_id) in self.sink.by_message_id
