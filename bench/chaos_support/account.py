"""Accounting: every delivered Message-ID in the stream exactly once, and how late.

The stream is read incrementally (XRANGE after the last id seen), so polling during the
run costs what is new, and a Redis restart in between only makes one poll fail.  A stream
entry id is ``<ms>-<seq>`` where ``ms`` is the time Redis ran the XADD, so the delay of a
message is ``entry ms - APPEND OK ms``, both from this machine's wall clock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

STREAM = "workflow:events:global"
DLQ = "shardworker:dlq"
PAGE = 5000
SLOWEST = 10


class StreamReader:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.entries: list[tuple[int, str]] = []  # (XADD ms, Message-ID without <>)
        self.event_ids: dict[str, set[str]] = {}  # Message-ID -> the event_ids read for it
        self._after = "-"

    def poll(self) -> int:
        """Read what was added since the last poll; new entries, or -1 if Redis failed."""
        added = 0
        try:
            while True:
                chunk: Any = self.client.xrange(STREAM, min=self._after, count=PAGE)
                if not chunk:
                    return added
                for entry_id, fields in chunk:
                    payload = orjson.loads(fields[b"payload_json"])
                    mid = str(payload["emailData"]["id"]).strip("<>")
                    self.entries.append((int(entry_id.split(b"-")[0]), mid))
                    self.event_ids.setdefault(mid, set()).add(fields[b"event_id"].decode())
                self._after = "(" + chunk[-1][0].decode()
                added += len(chunk)
        except redis.RedisError:
            return -1

    def seen(self) -> set[str]:
        return {mid for _, mid in self.entries}

    def dead_letters(self) -> int:
        try:
            return int(self.client.xlen(DLQ))
        except redis.RedisError:
            return -1


@dataclass(frozen=True)
class Accounting:
    delivered: int
    published: int  # stream entries
    lost: int
    duplicated: int  # extra entries of a delivered Message-ID
    unexpected: int  # entries whose Message-ID was never recorded as delivered
    dead_lettered: int
    delays_ms: tuple[int, ...]
    lost_ids: tuple[str, ...]
    duplicated_ids: tuple[str, ...]
    slowest: tuple[tuple[int, int, str], ...]  # (delay ms, APPEND ms, Message-ID), worst first

    @property
    def max_delay_ms(self) -> int:
        return max(self.delays_ms, default=0)

    def delay_pct_ms(self, pct: float) -> int:
        return percentile(self.delays_ms, pct)


def account(sent_ms: dict[str, int], entries: Sequence[tuple[int, str]], dlq: int) -> Accounting:
    counts = Counter(mid for _, mid in entries)
    first: dict[str, int] = {}
    for ms, mid in entries:
        first.setdefault(mid, ms)
    lost = sorted(m for m in sent_ms if m not in counts)
    dups = sorted(m for m in sent_ms if counts.get(m, 0) > 1)
    timed = sorted(((first[m] - sent, sent, m) for m, sent in sent_ms.items() if m in first),
                   reverse=True)  # fmt: skip
    delays = tuple(d for d, _, _ in reversed(timed))
    return Accounting(
        delivered=len(sent_ms),
        published=len(entries),
        lost=len(lost),
        duplicated=sum(counts[m] - 1 for m in dups),
        unexpected=sum(n for m, n in counts.items() if m not in sent_ms),
        dead_lettered=dlq,
        delays_ms=delays,
        lost_ids=tuple(lost),
        duplicated_ids=tuple(dups),
        slowest=tuple(timed[:SLOWEST]),
    )


def percentile(values: Sequence[int], pct: float) -> int:
    """Nearest rank (every figure is a measured sample); ``values`` sorted."""
    if not values:
        return 0
    rank = max(1, math.ceil(pct / 100 * len(values)))
    return values[rank - 1]
