"""Metrics of what shardworker keeps in the Redis it shares with Alga (docs/redis-sizing.md).

The stream lengths (``shardworker_stream_length``, ``shardworker_dead_letter_stream_length``)
are the pod collector's (``metrics/pod.py``), read at scrape time.

The leader's housekeeping round (:mod:`shardworker.sink.housekeeping`) sets the gauges; a
worker counts the dead letters its script trimmed.  ``kind`` is one of :data:`KINDS`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

KINDS = ("stream", "event_bus", "dedupe", "dlq", "pointer_queue")


class _Families:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.bytes = Gauge(
            "shardworker_redis_bytes",
            "Bytes shardworker keeps in Redis, by kind (MEMORY USAGE sampling).",
            ["kind"], multiprocess_mode="max", registry=r,
        )  # fmt: skip
        self.used_memory = Gauge(
            "shardworker_redis_used_memory_bytes", "Redis INFO used_memory (the whole server).",
            multiprocess_mode="max", registry=r,
        )  # fmt: skip
        self.trimmed = Counter(
            "shardworker_stream_trimmed_entries", "Entries trimmed after every group read them.",
            registry=r,
        )  # fmt: skip
        self.dlq_trimmed = Counter(
            "shardworker_dead_letters_trimmed",
            "Oldest dead letters dropped to keep the stream within its count and byte bounds.",
            registry=r,
        )  # fmt: skip
        self.evicted = Counter(
            "shardworker_redis_evicted_keys",
            "Keys Redis evicted (INFO evicted_keys) while shardworker watched.",
            registry=r,
        )  # fmt: skip
        self.restarts = Counter(
            "shardworker_redis_restarts", "Redis restarts or failovers seen (run_id changed).",
            registry=r,
        )  # fmt: skip
        for kind in KINDS:
            self.bytes.labels(kind)


_lock = threading.Lock()
_families: _Families | None = None


def families() -> _Families:
    global _families
    if _families is None:
        with _lock:
            if _families is None:
                _families = _Families()
    return _families


def reset() -> None:
    """Forget the metric objects (the value class changed: multiprocess mode began)."""
    global _families
    with _lock:
        _families = None


def redis_bytes(by_kind: Mapping[str, int]) -> None:
    m = families()
    for kind, size in by_kind.items():
        m.bytes.labels(kind).set(size)


def redis_used_memory(size: int) -> None:
    families().used_memory.set(size)


def stream_trimmed(count: int) -> None:
    if count > 0:
        families().trimmed.inc(count)


def dead_letters_trimmed(count: int) -> None:
    if count > 0:
        families().dlq_trimmed.inc(count)


def redis_evicted(count: int) -> None:
    if count > 0:
        families().evicted.inc(count)


def redis_restarted() -> None:
    families().restarts.inc()
