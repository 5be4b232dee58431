"""What shardworker keeps in Alga's shared Redis, kept small: run by the pool leader only.

Once per ``SHARDWORKER_HOUSEKEEPING_S`` the leader's round calls :meth:`Housekeeper.run_due`:

* **Trim by consumption.**  The workflow stream (and the event-bus stream when written)
  keeps an entry only while a group that matters has not read it: the backpressure group
  and ``SHARDWORKER_TRIM_GROUPS``.  ``XTRIM MINID`` up to the oldest ``last-delivered-id``
  among them, and never past the oldest entry still pending (delivered, not acknowledged)
  in any of them.  Nothing unread by those groups is ever trimmed here.  A stream with none
  of them (Alga not deployed yet) keeps ``SHARDWORKER_STREAM_KEEP_WITHOUT_GROUP`` entries.
* **Byte cap, last resort.**  When the workflow stream's memory passes
  ``SHARDWORKER_STREAM_MAX_BYTES``, the ``sw:footprint:full`` flag is set (expiring by
  itself); every worker's backpressure check reads it and stops fetching.  The stream is
  never trimmed below what the groups have read: the cap stops intake, it loses nothing.
* **Eviction and restart watch.**  ``INFO`` ``evicted_keys`` growth and a changed
  ``run_id`` are counted and logged: the ledger keeps exactly-once through both
  (docs/DESIGN.md, "Lean dedupe state").
* **Memory by kind** (stream, event bus, dedupe, DLQ, pointer queue): ``MEMORY USAGE`` of
  the few keys shardworker writes, and for the dedupe keys an estimate from a bounded
  ``SCAN MATCH`` sample (never a full scan of a Redis that holds Alga's whole platform,
  and no other key's name on the wire).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from shardworker.config import Settings
from shardworker.logs import get_logger
from shardworker.metrics import footprint as metrics
from shardworker.sink.redis_streams import (
    EVENT_BUS_GROUP,
    FULL_FLAG,
    POINTER_QUEUE,
    WORKFLOW_STREAM,
    dlq_bytes_key,
    event_bus_stream,
)

log = get_logger(__name__)

TRIM_LIMIT = 50_000  # entries one XTRIM may drop per round
SCAN_SAMPLE_STEPS = 5  # SCAN calls per round for the dedupe estimate
SCAN_STEP_COUNT = 1000
SIZE_SAMPLES = 5  # MEMORY USAGE of that many dedupe keys, averaged
DEDUPE_PREFIXES = ("sw:pub:", "sw:mid:")
DEDUPE_MATCH = "sw:[mp][iu][bd]:*"  # both prefixes (and a few names nobody writes)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class TrimResult:
    stream: str
    trimmed: int
    floor: str | None  # the MINID used; None when no group mattered (count bound)


class Housekeeper:
    """One per coordinator; only the leader's round calls it."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.settings = settings
        self.clock = clock
        self._last_run: float | None = None
        self._run_id: str | None = None
        self._evicted: int | None = None

    def run_due(self) -> None:
        """Run when the interval has passed; never raises (a failure is logged, retried)."""
        now = self.clock()
        if self._last_run is not None and now - self._last_run < self.settings.housekeeping_s:
            return
        self._last_run = now
        try:
            self.run()
        except redis.RedisError as exc:
            log.warning("housekeeping_failed", error_type=type(exc).__name__, error=str(exc))

    def run(self) -> None:
        self.watch_server()
        for result in self.trim():
            metrics.stream_trimmed(result.trimmed)
            if result.trimmed:
                log.info("stream_trimmed", stream=result.stream, count=result.trimmed,
                         floor=result.floor)  # fmt: skip
        self.apply_byte_cap()
        self.sample_memory()

    # -- trim by consumption ----------------------------------------------------------

    def honoured_groups(self) -> frozenset[str]:
        return frozenset({self.settings.backpressure_group, *self.settings.trim_groups})

    def trim(self) -> list[TrimResult]:
        results = [self.trim_stream(WORKFLOW_STREAM, self.honoured_groups())]
        if self.settings.publish_event_bus:
            bus = event_bus_stream(self.settings)
            results.append(self.trim_stream(bus, self.honoured_groups() | {EVENT_BUS_GROUP}))
        return results

    def trim_stream(self, stream: str, honoured: Iterable[str]) -> TrimResult:
        floor = self.read_floor(stream, frozenset(honoured))
        if floor is None:
            keep = self.settings.stream_keep_without_group
            return TrimResult(stream, self._xtrim(stream, maxlen=keep), None)
        return TrimResult(stream, self._xtrim(stream, minid=floor), floor)

    def _xtrim(self, stream: str, **bound: Any) -> int:
        """Whole nodes first, at most TRIM_LIMIT entries a round (the Redis is shared: no
        long command after an upgrade finds a million read entries); then, once caught up,
        the few read entries left in the oldest node exactly."""
        trimmed = int(self.client.xtrim(stream, approximate=True, limit=TRIM_LIMIT, **bound))
        if trimmed < TRIM_LIMIT:
            trimmed += int(self.client.xtrim(stream, approximate=False, **bound))
        return trimmed

    def read_floor(self, stream: str, honoured: frozenset[str]) -> str | None:
        """The lowest id some honoured group still needs; None when none of them exists.

        For each group: its ``last-delivered-id`` (everything after it is unread), or the
        oldest id it has pending if lower (delivered, not acknowledged: a consumer that
        crashed must be able to claim it again).
        """
        try:
            groups = self.client.xinfo_groups(stream)
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        needed: list[str] = []
        for group in groups:
            name = _text(group["name"])
            if name not in honoured:
                continue
            needed.append(_text(group["last-delivered-id"]))
            if int(group.get("pending") or 0):
                pending = self.client.xpending(stream, name)
                if pending.get("min") is not None:
                    needed.append(_text(pending["min"]))
        if not needed:
            return None
        return min(needed, key=_id)

    # -- byte cap ------------------------------------------------------------------------

    def apply_byte_cap(self) -> bool:
        """Set (or let lapse) the flag that stops fetching; True when the cap binds."""
        cap = self.settings.stream_max_bytes
        if cap == 0:
            return False
        used = int(self.client.memory_usage(WORKFLOW_STREAM) or 0)
        if used <= cap:
            return False
        ttl_ms = int(max(3 * self.settings.housekeeping_s, 5.0) * 1000)
        self.client.set(FULL_FLAG, str(used), px=ttl_ms)
        log.warning("stream_byte_cap_reached", bytes=used, cap=cap)
        return True

    # -- eviction and restart ------------------------------------------------------------

    def watch_server(self) -> None:
        info = self.client.info()
        run_id, evicted = str(info.get("run_id", "")), int(info.get("evicted_keys", 0))
        metrics.redis_used_memory(int(info.get("used_memory", 0)))
        if self._run_id is not None and run_id != self._run_id:
            metrics.redis_restarted()
            log.warning("redis_restarted", old_run_id=self._run_id, run_id=run_id,
                        note="dedupe keys lost; the ledger keeps exactly-once")  # fmt: skip
            self._evicted = None  # the counter started again
        if self._evicted is not None and evicted > self._evicted:
            metrics.redis_evicted(evicted - self._evicted)
            log.warning("redis_evicted_keys", count=evicted - self._evicted,
                        policy=_text(info.get("maxmemory_policy", "")))  # fmt: skip
        self._run_id, self._evicted = run_id, evicted

    # -- memory by kind ------------------------------------------------------------------

    def sample_memory(self) -> dict[str, int]:
        s = self.settings
        by_kind = {
            "stream": self._usage(WORKFLOW_STREAM),
            "event_bus": self._usage(event_bus_stream(s)) if s.publish_event_bus else 0,
            "dlq": self._usage(s.dlq_stream) + self._usage(dlq_bytes_key(s.dlq_stream)),
            "pointer_queue": self._usage(POINTER_QUEUE) if s.publish_pointer_queue else 0,
            "dedupe": self.estimate_dedupe_bytes(),
        }
        metrics.redis_bytes(by_kind)
        return by_kind

    def _usage(self, key: str) -> int:
        return int(self.client.memory_usage(key) or 0)

    def estimate_dedupe_bytes(self) -> int:
        """Dedupe keys' bytes from a bounded SCAN sample, scaled by how much of the
        keyspace the sample covered (:func:`scan_coverage`).

        The SCAN matches the dedupe prefixes on the server, so its replies carry only
        dedupe keys: an unfiltered sample returned ``SCAN_SAMPLE_STEPS * SCAN_STEP_COUNT``
        key names of whatever the Redis holds (in a pool, every provider's lease: ≈ 45 KB/s
        at one sample per 10 s, most of the pool's steady Redis traffic).  Exact when the
        sample covers the whole keyspace (small Redis, tests).
        """
        matched, cursor = [], 0
        for _ in range(SCAN_SAMPLE_STEPS):
            cursor, keys = self.client.scan(cursor, match=DEDUPE_MATCH, count=SCAN_STEP_COUNT)
            matched += [k for k in keys if _text(k).startswith(DEDUPE_PREFIXES)]
            if cursor == 0:
                break
        if not matched:
            return 0
        sizes = [self._usage(_text(k)) for k in matched[:SIZE_SAMPLES]]
        mean = sum(sizes) / len(sizes)
        return int(mean * len(matched) / scan_coverage(int(cursor)))


def scan_coverage(cursor: int) -> float:
    """The fraction of the keyspace a SCAN has visited when it returned ``cursor``.

    Redis walks its hash table in reverse-binary bucket order: the cursor's bits read
    from the lowest up are the binary digits of the fraction of buckets done, whatever
    the table's size (0 means the walk is complete)."""
    if cursor == 0:
        return 1.0
    fraction, weight = 0.0, 0.5
    while cursor:
        fraction += weight * (cursor & 1)
        cursor >>= 1
        weight /= 2
    return max(fraction, 2.0**-64)
