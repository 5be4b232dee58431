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

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from shardworker.db.ownership import OwnershipStore
from shardworker.errors import LeaseError
from shardworker.publish import Fence

# KEYS: lease keys.  ARGV[1]: ttl in ms; ARGV[2..]: one provisional token per key.
# Returns one 1/0 per key: 1 when the key was free and is now ours.
ACQUIRE = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[i + 1], 'NX', 'PX', ARGV[1]) then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: lease keys.  ARGV[1]: ttl in ms; then pairs (expected token, new token) per key.
# Swaps the token (and restarts the TTL) only where the expected token is still there.
SWAP = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[2 * i] then
    redis.call('SET', key, ARGV[2 * i + 1], 'PX', ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: lease keys.  ARGV[1]: ttl in ms; ARGV[2..]: the token we believe we hold.
# Extends the leases still ours; returns 1/0 per key (0 = lost).
RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: lease keys.  ARGV: the token per key.  Deletes only the leases still ours.
RELEASE = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""


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
    def fence(self) -> Fence:
        return Fence(self.key, self.token)


class LeaseManager:
    """The leases one worker (member) holds."""

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
        self.held: dict[str, Lease] = {}
        self._acquire = client.register_script(ACQUIRE)
        self._swap = client.register_script(SWAP)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._renewing: threading.Thread | None = None  # a renewal call Redis has not answered

    def acquire(self, wanted: Sequence[tuple[str, str]]) -> list[Lease]:
        """Try to take these (tenant, provider_id) leases; returns the ones now held."""
        todo = [(t, p) for t, p in wanted if p not in self.held]
        if not todo:
            return []
        sent = self.clock()
        provisional = [f"{self.member}|p|{uuid.uuid4().hex}" for _ in todo]
        won = self._acquire(keys=[lease_key(t, p) for t, p in todo],
                            args=[self.ttl_ms, *provisional])  # fmt: skip
        mine = [(item, tok) for item, tok, ok in zip(todo, provisional, won, strict=True) if ok]
        if not mine:
            return []
        epochs = self.ownership.acquire_epochs([item for item, _ in mine], self.member)
        final = [(t, p, tok, f"{self.member}|{epochs[p]}") for (t, p), tok in mine]
        swapped = self._swap(
            keys=[lease_key(t, p) for t, p, _, _ in final],
            args=[self.ttl_ms, *[x for _, _, old, new in final for x in (old, new)]],
        )
        out = []
        for (t, p, _, token), ok in zip(final, swapped, strict=True):
            if ok:
                lease = Lease(t, p, token, epochs[p], sent + self.ttl_s)
                self.held[p] = lease
                out.append(lease)
        return out

    def renew(self) -> list[Lease]:
        """Extend every held lease in one call; returns (and forgets) the ones lost."""
        if not self.held:
            return []
        if self._renewing is not None and self._renewing.is_alive():
            return self.expire_local()  # the last call is still stuck in a silent Redis
        leases = list(self.held.values())
        sent = self.clock()
        budget_s = min(x.valid_until for x in leases) - sent
        if budget_s <= 0:
            return self.expire_local()
        try:
            kept = self._call_within(
                lambda: self._renew(keys=[x.key for x in leases],
                                    args=[self.ttl_ms, *[x.token for x in leases]]),
                budget_s,
            )  # fmt: skip
        except (redis.RedisError, TimeoutError):
            return self.expire_local()
        lost = []
        for lease, ok in zip(leases, kept, strict=True):
            if ok:
                lease.valid_until = sent + self.ttl_s
            elif lease.provider_id in self.held:
                lost.append(self.held.pop(lease.provider_id))
        return lost + self.expire_local()

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
        gone = [p for p, lease in self.held.items() if lease.valid_until <= now]
        return [self.held.pop(p) for p in gone]

    def release(self, provider_ids: Sequence[str]) -> int:
        leases = [self.held.pop(p) for p in provider_ids if p in self.held]
        if not leases:
            return 0
        try:
            return int(self._release(keys=[x.key for x in leases], args=[x.token for x in leases]))
        except redis.RedisError as exc:
            # The TTL frees them anyway; successors only wait longer.
            raise LeaseError(
                f"releasing {len(leases)} lease(s) failed: {type(exc).__name__}"
            ) from None

    def release_all(self) -> int:
        return self.release(list(self.held))
