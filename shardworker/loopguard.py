"""The per-sender rate guard that stops a ping-pong loop (Odoo's rule: 20 in 120 minutes).

Two automatons that answer each other (two auto-responders, a helpdesk and an
out-of-office that forgets ``Auto-Submitted``) produce an endless stream from one sender
address.  Classification (:mod:`shardworker.loops`) catches the polite ones; this guard
catches the rest: once a sender has sent more than ``limit`` messages to one provider
within ``window_s``, the next ones are held back (the provider's rate action: skip or
flag) until the window slides past.  Mail from other senders, the same domain included,
is untouched.

State lives in Redis, one small sorted set per (tenant, provider, sender), scored by
arrival time, with the message's identity as member: a batch retried after a crash
counts each message once and gets the same answer.  Memory is bounded: held messages are
not stored, so the set never holds more than ``limit`` members, and it expires with the
window.  A sender that keeps sending gets ``limit`` messages through per window (Odoo's
rule); a ping-pong stops for good, because a held message is never answered.  Keys carry the
tenant and provider in a hash tag, and a SHA-1 of the address, never the address:
``sw:loop:{<tenant>:<provider_id>}:<sha1(sender)>``.

The check is :data:`HIT`, one script call per message (:meth:`SenderRateGuard.check`).  A
sink that writes to the same Redis makes the same check inside its publish script instead
(``lua/publish.lua``, KEYS[7..8]): :meth:`SenderRateGuard.plan` gives it the question as a
:class:`~shardworker.sink.base.RateCheck` and :meth:`SenderRateGuard.record` takes its
answer, so counters, hooks and the trip log are the same either way.

Core code never imports prometheus_client: :class:`GuardStats` holds plain counters and
``on_trip`` / ``on_held`` hooks let the metrics module count.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import redis
from redis.exceptions import RedisError

from shardworker.errors import PublishError
from shardworker.logs import get_logger
from shardworker.sink.base import RateCheck

log = get_logger(__name__)

# KEYS[1] the sender's sorted set, KEYS[2] its "tripped" marker (same hash slot).
# ARGV[1] now (ms), ARGV[2] window (ms), ARGV[3] limit, ARGV[4] the message's identity.
# Returns {rank, first_trip (0/1)}: the message's rank among the admitted ones (0 =
# oldest), or the limit when it is held.  Only admitted messages are stored, so the set
# never exceeds the limit, and a message seen before gets the answer it got then.
# lua/publish.lua repeats these lines for its own rate check; tests/test_publish_rate.py
# holds the two to the same answers.
HIT = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local rank = redis.call('ZRANK', KEYS[1], ARGV[4])
if rank then
  return {rank, 0}
end
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return {count, 0}
end
local first = 0
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', window) then
  first = 1
end
return {limit, first}
"""


def sender_key(tenant: str, provider_id: str, sender: str) -> str:
    digest = hashlib.sha1(sender.strip().lower().encode()).hexdigest()
    return f"sw:loop:{{{tenant}:{provider_id}}}:{digest}"


class RateStore(Protocol):
    """Where arrivals are counted; :class:`RedisRateStore` in production."""

    def hit(
        self, key: str, member: str, *, now_ms: int, window_ms: int, limit: int
    ) -> tuple[int, bool]:
        """Record ``member`` under ``key``; its rank in the window and whether this is
        the first hold of the window."""
        ...


class RedisRateStore:
    def __init__(self, client: redis.Redis) -> None:
        self._hit = client.register_script(HIT)

    def hit(
        self, key: str, member: str, *, now_ms: int, window_ms: int, limit: int
    ) -> tuple[int, bool]:
        try:
            rank, first = self._hit(keys=[key, key + ":tripped"],
                                    args=[now_ms, window_ms, limit, member])  # fmt: skip
        except RedisError as exc:
            # Like a failed publish: the batch is retried, nothing is lost or let through.
            raise PublishError(f"Redis loop guard failed ({type(exc).__name__})") from exc
        return int(rank), bool(first)


@dataclass
class GuardStats:
    """Plain counters for whoever exports them (the metrics module)."""

    checked: int = 0
    held: int = 0
    trips: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, held: bool, tripped: bool) -> None:
        with self._lock:
            self.checked += 1
            self.held += held
            self.trips += tripped


@dataclass(frozen=True)
class GuardAnswer:
    held: bool
    rank: int = 0
    first_trip: bool = False


class SenderRateGuard:
    """``check(tenant, provider_id, sender, message_key)`` before a message is published.

    ``limit`` 0 disables the guard.  ``exempt`` holds addresses (``alerts@example.com``)
    or domains (``@example.com``) never held back, such as a monitoring system that
    legitimately sends hundreds of mails.
    """

    def __init__(
        self, store: RateStore, *, limit: int, window_s: float, exempt: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        on_trip: Callable[[], None] | None = None,
        on_held: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.limit = limit
        self.window_ms = max(1, int(window_s * 1000))
        self.exempt = frozenset(e.strip().lower() for e in exempt if e.strip())
        self.clock = clock
        self.on_trip = on_trip
        self.on_held = on_held
        self.stats = GuardStats()

    def is_exempt(self, sender: str) -> bool:
        address = sender.strip().lower()
        domain = "@" + address.rsplit("@", 1)[-1] if "@" in address else ""
        return not address or address in self.exempt or domain in self.exempt

    def plan(
        self, tenant: str, provider_id: str, sender: str, message_key: str
    ) -> RateCheck | None:
        """The question to ask for this message now; None when the guard lets it through
        unasked (off, or an exempt sender)."""
        if self.limit <= 0 or self.is_exempt(sender):
            return None
        key = sender_key(tenant, provider_id, sender)
        return RateCheck(
            key=key, marker_key=key + ":tripped", member=message_key,
            now_ms=int(self.clock() * 1000), window_ms=self.window_ms, limit=self.limit,
        )  # fmt: skip

    def check(self, tenant: str, provider_id: str, sender: str, message_key: str) -> GuardAnswer:
        rate = self.plan(tenant, provider_id, sender, message_key)
        if rate is None:
            return GuardAnswer(held=False)
        return self.ask(tenant, provider_id, sender, rate)

    def ask(self, tenant: str, provider_id: str, sender: str, rate: RateCheck) -> GuardAnswer:
        """:meth:`plan`'s question, asked in a round trip of its own."""
        rank, first = self.store.hit(
            rate.key, rate.member, now_ms=rate.now_ms, window_ms=rate.window_ms,
            limit=rate.limit,
        )  # fmt: skip
        return self.record(tenant, provider_id, sender, rate, rank=rank, first=first)

    def record(
        self, tenant: str, provider_id: str, sender: str, rate: RateCheck, *, rank: int,
        first: bool,
    ) -> GuardAnswer:  # fmt: skip
        """Count an answer to ``rate`` (from :meth:`ask` or a sink's publish)."""
        held = rank >= rate.limit
        self.stats.add(held=held, tripped=first)
        if held and self.on_held is not None:
            self.on_held()
        if first:
            self._tripped(tenant, provider_id, sender, rate.key)
        return GuardAnswer(held=held, rank=rank, first_trip=first)

    def _tripped(self, tenant: str, provider_id: str, sender: str, key: str) -> None:
        # The address is personal data: the log names its domain and the key's hash.
        log.warning(
            "loop_guard_tripped", tenant=tenant, provider_id=provider_id,
            sender_domain=sender.rsplit("@", 1)[-1].lower(), sender_hash=key.rsplit(":", 1)[-1],
            limit=self.limit, window_s=self.window_ms / 1000,
        )  # fmt: skip
        if self.on_trip is not None:
            self.on_trip()
