"""Which member serves which provider: consistent hashing with bounded loads, sticky rounds.

``plan_assignment`` is pure and deterministic: the leader calls it with the previous
assignment and publishes the result.  Every member has ``VNODES`` points on a 64-bit ring
and every provider one point (blake2b, identical in every process and Python version).  A
provider prefers the member whose point follows its own soonest clockwise: its
*distance* to a member is how far it has to walk to that member's next point.  A member
joining or leaving therefore concerns only the providers on the arcs next to its points,
and placing a provider looks at a handful of points, not at every member (Mirrokni,
Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018).

A round runs four phases over an in-memory state:

1. keep: a provider whose owner is still a member stays put (moving costs a drain);
2. shed: members above ``cap`` give up the providers farthest from them;
3. place: new, orphaned and shed providers walk clockwise from their point and take the
   first member below ``cap``;
4. fill: members below ``floor`` pull the providers nearest to their own points (walking
   counter-clockwise from each point), first those moving this round anyway (free),
   then sticky ones, only ever from members above ``floor``.

Only sticky providers moved by phases 2 and 4 count against ``max_rebalance_moves``, so new
and orphaned providers are always served while a flapping pod cannot cause a move storm;
later rounds finish the rebalancing.  Each rebalance move lowers the total distance of the
loads from ``[floor, cap]`` by at least one, so repeated rounds converge, then move nothing.

Cost: a cold start hashes each provider once and walks a few ring points for it; a lost
member costs its providers; a taker in phase 4 visits about as many providers as it takes.
``plan_assignment`` still touches every provider (the keep pass, the result); the leader
runs it only on its first round and at each reconcile.  Between those a member change is
``pool.placement.Placement.replan``: the same phases (``Round``) over state kept between
rounds, so it costs only what moves.  No step sorts a million items in one call (the
input is sorted in runs, the ring order kept in buckets), so the leader's lease thread
gets the GIL within a fraction of a second even during a full plan.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import heapq
import math
import sys
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, NamedTuple, Protocol

Reason = Literal["new", "orphaned", "rebalance"]

# Points per member: a member's share of the ring varies by about 1 / sqrt(VNODES) (9 %),
# which the bounded loads absorb; more points cost ring memory and join time only.
VNODES = 128
RING_SIZE = 1 << 64


class Move(NamedTuple):
    """One provider changing hands; ``src`` is None for a provider nobody served."""

    provider: str
    src: str | None
    dst: str
    reason: Reason


@dataclass(frozen=True)
class Plan:
    """The outcome of one round: who serves what, what moved, and how even it is."""

    assignment: dict[str, str]
    moves: tuple[Move, ...]
    imbalance: float
    loads: dict[str, int]


def ring_point(text: str) -> int:
    """The point of a provider (its ``tenant:provider_id``) on the ring."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def member_points(member: str) -> list[int]:
    """The ``VNODES`` points of ``member``, sorted."""
    return sorted(ring_point(f"{member}\0{i}") for i in range(VNODES))


class Ring:
    """The points of a set of members (sorted by name, handled by index), in ring order."""

    def __init__(self, members: Sequence[str]) -> None:
        self.members = list(members)
        self.own = [member_points(m) for m in self.members]
        placed = sorted((p, i) for i, points in enumerate(self.own) for p in points)
        self.points = [p for p, _ in placed]
        self.owners = [i for _, i in placed]
        self.slots: list[list[int]] = [[] for _ in self.members]
        for slot, member in enumerate(self.owners):
            self.slots[member].append(slot)

    def slot_of(self, point: int) -> int:
        """The first ring slot at or after ``point`` (clockwise, wrapping)."""
        slot = bisect_left(self.points, point)
        return 0 if slot == len(self.points) else slot

    def distance(self, point: int, member: int) -> int:
        """How far ``point`` walks clockwise to the next point of ``member``."""
        own = self.own[member]
        at = bisect_left(own, point)
        return (own[at] if at < len(own) else own[0] + RING_SIZE) - point


@functools.lru_cache(maxsize=4)
def ring_of(members: tuple[str, ...]) -> Ring:
    """The ring of these (sorted, unique) members; cached, since members rarely change."""
    return Ring(members)


def load_bounds(n_providers: int, n_members: int, slack: float) -> tuple[int, int]:
    """``(floor, cap)`` for the given sizes; exact arithmetic, so 100 * 1.1 caps at 110."""
    mean = Fraction(n_providers, n_members)
    tolerance = Fraction(slack).limit_denominator(1_000_000)
    return max(0, math.floor(mean * (1 - tolerance))), math.ceil(mean * (1 + tolerance))


def plan_assignment(
    providers: Iterable[str],
    members: Sequence[str],
    current: Mapping[str, str],
    *,
    slack: float = 0.1,
    max_rebalance_moves: int | None = None,
    points: Mapping[str, int] | None = None,
) -> Plan:
    """Assign every provider to a live member, moving as few as balance allows.

    ``current`` is the previous round's provider → member map; it may name dead members
    and removed providers.  Input order never matters.  ``points`` may hold providers'
    ring points computed before (``ring_point``), so they are not hashed again.
    """
    check_arguments(slack, max_rebalance_moves)
    ordered = sorted_unique(providers)
    live = tuple(sorted(set(members)))
    if not live:
        return Plan(assignment={}, moves=(), imbalance=1.0, loads={})
    bounds = load_bounds(len(ordered), len(live), slack)
    with collector_paused():
        owner = keep_live_owners(ordered, current, live)
        state = Round(
            ring_of(live),
            bounds,
            max_rebalance_moves,
            points=points,
            owner=owner,
            size=len(ordered),
        )
        state.every = lambda: RingOrder.build(ordered, state.points_of(ordered))
        pending = [p for p in ordered if p not in owner]
        state.free.update(pending)
        pending += state.shed_overloaded(state.holdings_scan)
        state.place(sorted(pending))
        state.fill_underloaded()
        return state.result(ordered, current)


def check_arguments(slack: float, max_rebalance_moves: int | None) -> None:
    if not (math.isfinite(slack) and slack >= 0):
        raise ValueError(f"slack must be a finite number >= 0, got {slack!r}")
    if max_rebalance_moves is not None and max_rebalance_moves < 0:
        raise ValueError(f"max_rebalance_moves must be >= 0, got {max_rebalance_moves}")


# Sorting this many strings in one call holds the GIL for about 20 ms.
SORT_RUN = 50_000


def sorted_unique(names: Iterable[str]) -> list[str]:
    """``names`` sorted, each once, without one long sort that holds the GIL.

    A million strings sorted in one call hold it for about a second, starving the
    leader's lease thread (and merging sorted runs in one ``sort``, or deduplicating a
    million with ``dict.fromkeys``, still for about half a second); so runs are sorted
    in C and merged and deduplicated by a loop that returns to the interpreter."""
    items = list(names)
    if len(items) <= SORT_RUN:
        return list(dict.fromkeys(sorted(items)))
    runs = [sorted(items[i : i + SORT_RUN]) for i in range(0, len(items), SORT_RUN)]
    unique: list[str] = []
    last: str | None = None
    for name in heapq.merge(*runs):
        if name != last:
            unique.append(name)
            last = name
    return unique


def keep_live_owners(
    providers: list[str], current: Mapping[str, str], live: Sequence[str]
) -> dict[str, int]:
    """Phase 1: the providers whose owner is still a member, by member index."""
    index: dict[str | None, int] = {m: i for i, m in enumerate(live)}
    return {p: i for p in providers if (i := index.get(current.get(p))) is not None}


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one plan.

    A plan allocates a few objects per provider and no reference cycles, yet every few
    hundred allocations the collector would walk the growing heap: at a million
    providers that is three quarters of the time.  Reference counting still frees
    everything; the collector resumes (if it ran before) when the plan is done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def place_new(
    providers: Iterable[str], members: Sequence[str], loads: Mapping[str, int], cap: int
) -> dict[str, str]:
    """Place only these providers, each on its first member clockwise below ``cap``
    (counting the ones placed before it), or where it points if every member is full.

    The leader's path when providers came or went and the members did not."""
    live = tuple(sorted(set(members)))
    if not live:
        return {}
    ring = ring_of(live)
    counts = [loads.get(m, 0) for m in live]
    walk = _OpenWalk(ring, [c >= cap for c in counts])
    placed: dict[str, str] = {}
    for provider in sorted(set(providers)):
        member = walk.first_open(ring.slot_of(ring_point(provider)))
        counts[member] += 1
        if counts[member] >= cap:
            walk.close(member)
        placed[provider] = live[member]
    return placed


class _OpenWalk:
    """The clockwise walk to the first open member, skipping full members' points.

    A slot of a full member points past itself; the pointers are compressed as they are
    followed, so a walk costs nearly nothing however many members are full.  Members
    only ever close during a walk's life."""

    def __init__(self, ring: Ring, full: Sequence[bool]) -> None:
        self.ring = ring
        self.next = list(range(len(ring.points)))
        self.open = len(full)
        for member, closed in enumerate(full):
            if closed:
                self.close(member)

    def close(self, member: int) -> None:
        size = len(self.next)
        for slot in self.ring.slots[member]:
            self.next[slot] = (slot + 1) % size
        self.open -= 1

    def first_open(self, slot: int) -> int:
        """The member of the first open slot from ``slot``; with none open, ``slot``'s."""
        if self.open <= 0:
            return self.ring.owners[slot]
        root = slot
        while self.next[root] != root:
            root = self.next[root]
        while self.next[slot] != root:
            self.next[slot], slot = root, self.next[slot]
        return self.ring.owners[root]


class RingOrder:
    """Providers in ring order, for walking counter-clockwise from a member's points.

    Kept in buckets by the points' top bits, each sorted by (point, name): building it
    sorts small buckets (never everything in one call), and adding or removing one
    provider shifts one bucket, so the leader can keep it between rounds."""

    def __init__(self, bits: int) -> None:
        self.shift = 64 - bits
        self.points: list[list[int]] = [[] for _ in range(1 << bits)]
        self.names: list[list[str]] = [[] for _ in range(1 << bits)]
        self.size = 0

    @classmethod
    def build(cls, names: Iterable[str], points: Iterable[int]) -> RingOrder:
        """The order of ``names`` at ``points`` (equal lengths); about 128 a bucket."""
        pairs = list(zip(points, names, strict=True))
        order = cls(min(16, (len(pairs) // 128).bit_length()))
        buckets: list[list[tuple[int, str]]] = [[] for _ in order.points]
        shift = order.shift
        for pair in pairs:
            buckets[pair[0] >> shift].append(pair)
        for bucket, held in enumerate(buckets):
            held.sort()
            order.points[bucket] = [x for x, _ in held]
            order.names[bucket] = [name for _, name in held]
        order.size = len(pairs)
        return order

    def _find(self, name: str, point: int) -> tuple[int, int]:
        """Bucket and index where ``name`` at ``point`` is, or would be inserted."""
        bucket = point >> self.shift
        points, names = self.points[bucket], self.names[bucket]
        at = bisect_left(points, point)
        while at < len(points) and points[at] == point and names[at] < name:
            at += 1
        return bucket, at

    def add(self, name: str, point: int) -> None:
        bucket, at = self._find(name, point)
        self.points[bucket].insert(at, point)
        self.names[bucket].insert(at, name)
        self.size += 1

    def discard(self, name: str, point: int) -> None:
        bucket, at = self._find(name, point)
        if at < len(self.names[bucket]) and self.names[bucket][at] == name:
            del self.points[bucket][at], self.names[bucket][at]
            self.size -= 1

    def __iter__(self) -> Iterator[str]:
        for names in self.names:
            yield from names

    def nearest(self, own: list[int]) -> Iterator[str]:
        """The providers by their distance to the next of ``own`` (sorted points): first
        the ones just before each point, each provider once.  Ties in distance go in
        ring order from zero, a walk wrapped past zero first."""
        heap: list[tuple[int, int, int, int, int]] = []
        for arc, point in enumerate(own):
            bucket = point >> self.shift
            self._push(heap, own, arc, (0, bucket, bisect_right(self.points[bucket], point) - 1))
        while heap:
            _, wrap, bucket, at, arc = heapq.heappop(heap)
            yield self.names[bucket][at]
            self._push(heap, own, arc, (wrap, bucket, at - 1))

    def _push(self, heap: list[tuple[int, int, int, int, int]], own: list[int], arc: int,
              where: tuple[int, int, int]) -> None:  # fmt: skip
        """Queue the provider at ``where`` (wrapped past zero, bucket, index), or the
        first one counter-clockwise from it, if it still lies on ``arc``: the span after
        the previous point up to ``own[arc]``."""
        wrap, bucket, at = where
        start = own[arc - 1] if arc else own[-1] - RING_SIZE
        while at < 0:  # into the previous bucket
            bucket -= 1
            if bucket < 0:
                if wrap:
                    return
                wrap, bucket = -1, len(self.points) - 1
            if ((bucket + 1) << self.shift) - 1 + wrap * RING_SIZE <= start:
                return  # the whole bucket lies before the arc
            at = len(self.points[bucket]) - 1
        point = self.points[bucket][at] + wrap * RING_SIZE
        if point > start:
            heapq.heappush(heap, (own[arc] - point, wrap, bucket, at, arc))


class Owners(Protocol):
    """Provider → member index, as a round sees it: a dict, or an overlay on one."""

    def __getitem__(self, provider: str, /) -> int: ...
    def __setitem__(self, provider: str, member: int, /) -> None: ...
    def __delitem__(self, provider: str, /) -> None: ...


class Round:
    """Mutable state of one planning round; members are handled by index.

    Loads are counts; a member's providers are collected only when it must shed.  The
    full plan and the leader's incremental step (``pool.placement``) run the same phases
    on it: they differ only in ``owner`` (a dict of every provider, or an overlay on the
    kept state), in where a shedding member's providers come from, and in ``every``
    (the providers in ring order, built or kept)."""

    def __init__(
        self, ring: Ring, bounds: tuple[int, int], budget: int | None, *,
        points: Mapping[str, int] | None, owner: Owners | dict[str, int], size: int,
    ) -> None:  # fmt: skip
        self.ring = ring
        self.members = ring.members
        self.index: dict[str | None, int] = {m: i for i, m in enumerate(self.members)}
        self.floor, self.cap = bounds
        self.budget = budget
        self.owner = owner
        self.size = size
        self.loads = [0] * len(self.members)
        if isinstance(owner, dict):
            for member, load in Counter(owner.values()).items():
                self.loads[member] = load
        self.free: set[str] = set()  # moving this round anyway: re-routing them costs nothing
        self.known = points if points is not None else {}
        self.points: dict[str, int] = {}
        self.every: Callable[[], RingOrder] = lambda: RingOrder(0)

    def points_of(self, providers: Iterable[str]) -> list[int]:
        known, seen = self.known, self.points
        return [known[p] if p in known else seen[p] if p in seen else ring_point(p)
                for p in providers]  # fmt: skip

    def _remember(self, providers: Sequence[str], points: Sequence[int]) -> None:
        if not self.known:
            self.points.update(zip(providers, points, strict=True))

    def _allowance(self) -> int:
        return sys.maxsize if self.budget is None else self.budget

    def _spend(self, moves: int) -> None:
        if self.budget is not None:
            self.budget -= moves

    def holdings_scan(self, over: Collection[int]) -> dict[int, list[str]]:
        """The providers of the members in ``over``, found by scanning every owner."""
        assert isinstance(self.owner, dict)
        held: dict[int, list[str]] = {m: [] for m in over}
        for provider, member in self.owner.items():
            if member in held:
                held[member].append(provider)
        return held

    def shed_overloaded(
        self, holdings: Callable[[Collection[int]], dict[int, list[str]]]
    ) -> list[str]:
        """Phase 2: take from members above cap the providers farthest from them."""
        over = [m for m, load in enumerate(self.loads) if load > self.cap]
        if not over or self._allowance() <= 0:
            return []
        held = holdings(over)
        shed: list[str] = []
        for member in over:
            excess = min(self.loads[member] - self.cap, self._allowance())
            unwanted = self._least_wanted(member, held[member])[:excess]
            for provider in unwanted:
                del self.owner[provider]
            self.loads[member] -= len(unwanted)
            self.free.update(unwanted)
            self._spend(len(unwanted))
            shed += unwanted
        return shed

    def _least_wanted(self, member: int, held: list[str]) -> list[str]:
        """``held`` (``member``'s), farthest first: the likeliest to prefer another."""
        distance = self.ring.distance
        points = self.points_of(held)
        self._remember(held, points)
        ranked = sorted((-distance(x, member), p) for p, x in zip(held, points, strict=True))
        return [p for _, p in ranked]

    def place(self, providers: list[str]) -> None:
        """Phase 3: each provider walks clockwise to the first member below cap."""
        loads, cap, owner = self.loads, self.cap, self.owner
        walk = _OpenWalk(self.ring, [load >= cap for load in loads])
        ring_points, first_open = self.ring.points, walk.first_open
        points = self.points_of(providers)
        self._remember(providers, points)
        for provider, point in zip(providers, points, strict=True):
            slot = bisect_left(ring_points, point)
            member = first_open(slot if slot < len(ring_points) else 0)
            owner[provider] = member
            loads[member] += 1
            if loads[member] >= cap:
                walk.close(member)

    def fill_underloaded(self) -> None:
        """Phase 4: raise every member below floor to floor, least-loaded first."""
        loads = self.loads
        takers = [m for m in sorted(range(len(loads)), key=loads.__getitem__)
                  if loads[m] < self.floor]  # fmt: skip
        if not takers:
            return
        every: RingOrder | None = None
        if 2 * len(self.free) >= self.size:  # walking them all skips few sticky ones
            free = every = self.every()
        else:
            moving = sorted(self.free)
            free = RingOrder.build(moving, self.points_of(moving))
        for taker in takers:
            if self._pull(taker, free.nearest(self.ring.own[taker]), sticky=False):
                continue
            if self._allowance() <= 0:
                continue
            if every is None:
                every = self.every()
            self._pull(taker, every.nearest(self.ring.own[taker]), sticky=True)

    def _pull(self, taker: int, candidates: Iterator[str], *, sticky: bool) -> bool:
        """Take ``candidates`` held above floor until ``taker`` reaches floor (True) or
        they run out; sticky ones only while the budget lasts."""
        loads, owner, floor = self.loads, self.owner, self.floor
        for provider in candidates:
            if loads[taker] >= floor:
                return True
            donor = owner[provider]
            if donor == taker or loads[donor] <= floor:
                continue
            if provider not in self.free:
                if not sticky:
                    continue
                if self._allowance() <= 0:
                    return False
                self._spend(1)
                self.free.add(provider)
            owner[provider] = taker
            loads[donor] -= 1
            loads[taker] += 1
        return loads[taker] >= floor

    def reason(self, src: str | None) -> Reason:
        if src is None:
            return "new"
        return "rebalance" if src in self.index else "orphaned"

    def imbalance(self) -> float:
        return max(self.loads) / (self.size / len(self.members)) if self.size else 1.0

    def result(self, providers: list[str], current: Mapping[str, str]) -> Plan:
        members, owner = self.members, self.owner
        assert isinstance(owner, dict)
        assignment = {p: members[owner[p]] for p in providers}
        moves = tuple(
            Move(p, src, dst, self.reason(src))
            for p, dst in assignment.items()
            if (src := current.get(p)) != dst
        )
        loads = dict(zip(members, self.loads, strict=True))
        return Plan(assignment=assignment, moves=moves, imbalance=self.imbalance(), loads=loads)
