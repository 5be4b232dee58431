"""Provider leases: Redis ``SET NX PX`` with a token, fencing epochs from PostgreSQL.

A lease key ``sw:lease:<tenant>:<provider_id>`` holds the owner's token
``<member>|<epoch>``.  The publish script compares that token atomically with every XADD,
and the checkpoint compares the epoch in PostgreSQL, so an owner that lost its lease
(paused by SIGSTOP past the TTL, cut off from Redis) can neither publish nor checkpoint.

Acquisition is three batched steps, so a pod taking thousands of providers pays three
round trips, not thousands:

1. ``SET NX PX`` with a provisional token: only the winner goes on, and no other
   token can publish meanwhile.
2. Increment the epochs in PostgreSQL: this fences every earlier owner's checkpoints.
3. Swap the provisional token for ``<member>|<epoch>`` if it is still ours.

Validity is tracked locally from the moment a call was *sent*: if renewals stop
succeeding, the lease is treated as lost when its TTL could have run out, whatever Redis
says later.  Time comes from an injectable monotonic clock.

A renewal never waits past the first validity it could save.  When Redis is silent (a
partition drops packets; nothing is refused) a call blocks for the client's socket
timeout and its retries, which can be several times the TTL: the owner would go on
serving, with its IMAP sessions open, long after a successor took over.  So the call runs
on a short-lived daemon thread and is waited for only until the earliest ``valid_until``;
while it is still stuck, later rounds only expire leases locally.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from shardworker.db.models import provider_key
from shardworker.db.ownership import OwnershipStore
from shardworker.errors import LeaseError
from shardworker.luasource import lua_source
from shardworker.sink.base import Fence

HELD_PREFIX = "sw:held:"


def lease_key(tenant: str, provider_id: str) -> str:
    return f"sw:lease:{tenant}:{provider_id}"


@dataclass
class Lease:
    tenant: str
    provider_id: str
    token: str
    epoch: int
    valid_until: float

    @property
    def key(self) -> str:
        return lease_key(self.tenant, self.provider_id)

    @property
    def provider(self) -> str:
        """The provider's identity, ``<tenant>:<provider_id>``: the held map's key."""
        return provider_key(self.tenant, self.provider_id)

    @property
    def fence(self) -> Fence:
        return Fence(self.key, self.token, self.epoch)


class LeaseManager:
    """The leases one worker (member) holds: the only owner of the held-lease map.

    The assigner thread acquires and releases, the keeper thread renews, command and
    drain paths read; every access to the map takes ``_lock``, and no Redis or
    PostgreSQL call is made while holding it (a slow acquisition must never delay the
    renewals).  A lease released or lost while a renewal was in flight is simply gone
    from the map when the renewal comes back.
    """

    def __init__(
        self, client: redis.Redis, ownership: OwnershipStore, member: str, ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.client = client
        self.ownership = ownership
        self.member = member
        self.ttl_ms = int(ttl_s * 1000)
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, Lease] = {}
        self._acquire = client.register_script(lua_source("lease_acquire.lua"))
        self._swap = client.register_script(lua_source("lease_swap.lua"))
        self._renew = client.register_script(lua_source("lease_renew.lua"))
        self._renew_held = client.register_script(lua_source("lease_renew_held.lua"))
        # The held leases recorded in Redis (lease key -> token), so that a renewal is one
        # small call however many leases the member holds.  A previous incarnation's
        # record (same member id) is dropped before the first acquisition.
        self.held_key = HELD_PREFIX + member
        self._record_fresh = False
        self._record_dirty = False
        self._release = client.register_script(lua_source("lease_release.lua"))
        self._renewing: threading.Thread | None = None  # a renewal call Redis has not answered

    # -- reading the map -----------------------------------------------------------------

    def holds(self, provider: str) -> bool:
        """Whether the lease of ``provider`` (``tenant:provider_id``) is held."""
        with self._lock:
            return provider in self._held

    def held(self) -> dict[str, Lease]:
        """A copy of the map: ``tenant:provider_id`` -> lease."""
        with self._lock:
            return dict(self._held)

    def count(self) -> int:
        with self._lock:
            return len(self._held)

    # -- changing it ---------------------------------------------------------------------

    def acquire(self, wanted: Sequence[tuple[str, str]]) -> list[Lease]:
        """Try to take these (tenant, provider_id) leases; returns the ones now held."""
        with self._lock:
            todo = [(t, p) for t, p in wanted if provider_key(t, p) not in self._held]
        if not todo:
            return []
        if not self._record_fresh:
            self.client.delete(self.held_key)
            self._record_fresh = True
        provisional = [f"{self.member}|p|{uuid.uuid4().hex}" for _ in todo]
        won = self._acquire(keys=[lease_key(t, p) for t, p in todo],
                            args=[self.ttl_ms, *provisional])  # fmt: skip
        mine = [(item, tok) for item, tok, ok in zip(todo, provisional, won, strict=True) if ok]
        if not mine:
            return []
        try:
            epochs = self.ownership.acquire_epochs([item for item, _ in mine], self.member)
            final = [(t, p, tok, f"{self.member}|{epochs[t, p]}") for (t, p), tok in mine]
            # The swap restarts each key's TTL when it runs, never before it is sent: the
            # lease counts from here, so a slow epoch step does not eat its validity.
            sent = self.clock()
            swapped = self._swap(
                keys=[lease_key(t, p) for t, p, _, _ in final],
                args=[self.ttl_ms, *[x for _, _, old, new in final for x in (old, new)]],
            )
        except BaseException:
            # Left in place, the provisional tokens would keep every member (this one
            # too) off these providers for a whole TTL.
            self._drop_provisional(mine)
            raise
        out = [
            Lease(t, p, token, epochs[t, p], sent + self.ttl_s)
            for (t, p, _, token), ok in zip(final, swapped, strict=True)
            if ok
        ]
        if out:
            try:
                self.client.hset(self.held_key, mapping={x.key: x.token for x in out})
            except redis.RedisError:
                self._record_dirty = True
        with self._lock:
            for lease in out:
                self._held[lease.provider] = lease
        return out

    def renew(self) -> list[Lease]:
        """Extend every held lease in one call; returns (and forgets) the ones lost."""
        with self._lock:
            leases = list(self._held.values())
        if not leases:
            return []
        if self._renewing is not None and self._renewing.is_alive():
            return self.expire_local()  # the last call is still stuck in a silent Redis
        sent = self.clock()
        budget_s = min(x.valid_until for x in leases) - sent
        if budget_s <= 0:
            return self.expire_local()
        try:
            kept = self._call_within(lambda: self._renew_recorded(leases), budget_s)
        except (redis.RedisError, TimeoutError):
            self._record_dirty = True  # whatever the script did, rewrite the record
            return self.expire_local()
        lost = []
        with self._lock:
            for lease, ok in zip(leases, kept, strict=True):
                if self._held.get(lease.provider) is not lease:
                    continue  # released (or replaced) while the renewal was in flight
                if ok:
                    lease.valid_until = sent + self.ttl_s
                else:
                    lost.append(self._held.pop(lease.provider))
        gone = lost + self.expire_local()
        self._forget_recorded(gone)
        return gone

    def _renew_recorded(self, leases: list[Lease]) -> list[bool]:
        """Renew through the record in Redis.  If a write of the record failed, or the
        record and our map disagree, renew these leases by name this once and rewrite
        the record from them (a stray entry was extended by one TTL at most)."""
        if not self._record_dirty:
            got = self._renew_held(keys=[self.held_key], args=[self.ttl_ms])
            lost = {k.decode() if isinstance(k, bytes) else str(k) for k in got[1:]}
            if int(got[0]) == sum(1 for x in leases if x.key not in lost):
                return [x.key not in lost for x in leases]
        kept = self._renew(keys=[x.key for x in leases],
                           args=[self.ttl_ms, *[x.token for x in leases]])  # fmt: skip
        ok = [bool(k) for k in kept]
        record = {x.key: x.token for x, y in zip(leases, ok, strict=True) if y}
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.held_key)
            if record:
                pipe.hset(self.held_key, mapping=record)  # type: ignore[arg-type]
            pipe.execute()
        self._record_dirty = False
        return ok

    def _forget_recorded(self, leases: list[Lease]) -> None:
        """Leases that left the map leave the record (else it would renew them)."""
        if not leases:
            return
        try:
            self.client.hdel(self.held_key, *[x.key for x in leases])
        except redis.RedisError:
            self._record_dirty = True

    def _call_within(self, call: Callable[[], Any], timeout_s: float) -> Any:
        """``call()`` on a daemon thread; TimeoutError if it has not returned in ``timeout_s``.

        The thread ends by itself when the client's own socket timeout fires; a reply that
        comes after we gave up is ignored (the leases it extended run out in Redis).
        """
        outcome: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                outcome.append((True, call()))
            except Exception as exc:  # handed to the caller below
                outcome.append((False, exc))

        thread = threading.Thread(target=run, name="lease-renewal", daemon=True)
        self._renewing = thread
        thread.start()
        thread.join(timeout_s)
        if not outcome:
            raise TimeoutError(f"lease renewal unanswered after {timeout_s:.1f}s")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def expire_local(self) -> list[Lease]:
        """Leases whose TTL may have run out since the last successful renewal."""
        now = self.clock()
        with self._lock:
            gone = [p for p, lease in self._held.items() if lease.valid_until <= now]
            return [self._held.pop(p) for p in gone]

    def release(self, providers: Sequence[str]) -> int:
        """Give up the leases of these ``tenant:provider_id`` keys (those held)."""
        with self._lock:
            leases = [self._held.pop(p) for p in providers if p in self._held]
        if not leases:
            return 0
        try:
            self.client.hdel(self.held_key, *[x.key for x in leases])
            return int(self._release(keys=[x.key for x in leases], args=[x.token for x in leases]))
        except redis.RedisError as exc:
            # The TTL frees them anyway; successors only wait longer.
            self._record_dirty = True
            raise LeaseError(
                f"releasing {len(leases)} lease(s) failed: {type(exc).__name__}"
            ) from None

    def _drop_provisional(self, mine: list[tuple[tuple[str, str], str]]) -> None:
        """Delete the provisional tokens of a failed acquisition (those still ours)."""
        with contextlib.suppress(redis.RedisError):  # else the TTL frees them
            self._release(keys=[lease_key(t, p) for (t, p), _ in mine],
                          args=[tok for _, tok in mine])  # fmt: skip

    def release_all(self) -> int:
        with self._lock:
            every = list(self._held)
        return self.release(every)
