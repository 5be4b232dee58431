"""Which member serves which provider: rendezvous hashing with bounded loads, sticky rounds.

``plan_assignment`` is pure and deterministic: the leader calls it every round with the
previous assignment and publishes the result.  Every provider ranks the members by a stable
64-bit score (blake2b of ``member \\0 provider``, identical in every process and Python
version), so a member that joins or leaves changes only the providers that rank it first.

A round runs four phases over an in-memory state:

1. keep: a provider whose owner is still a member stays put (moving costs a drain);
2. shed: members above ``cap`` give up the providers that score them lowest;
3. place: new, orphaned and shed providers go to their best-ranked member below ``cap``;
4. fill: members below ``floor`` pull, first from providers that are moving this round
   anyway (free), then from the most-loaded members' sticky providers.

Only sticky providers moved by phases 2 and 4 count against ``max_rebalance_moves``, so new
and orphaned providers are always served while a flapping pod cannot cause a move storm;
later rounds finish the rebalancing.  Each rebalance move lowers the total distance of the
loads from ``[floor, cap]`` by at least one, so repeated rounds converge, then move nothing.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

Reason = Literal["new", "orphaned", "rebalance"]


@dataclass(frozen=True, slots=True)
class Move:
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


def score(member: str, provider: str) -> int:
    """The rendezvous weight of ``member`` for ``provider``: higher is preferred."""
    digest = hashlib.blake2b(f"{member}\0{provider}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def load_bounds(n_providers: int, n_members: int, slack: float) -> tuple[int, int]:
    """``(floor, cap)`` for the given sizes; exact arithmetic, so 100 * 1.1 caps at 110."""
    mean = Fraction(n_providers, n_members)
    tolerance = Fraction(slack).limit_denominator(1_000_000)
    return max(0, math.floor(mean * (1 - tolerance))), math.ceil(mean * (1 + tolerance))


def plan_assignment(
    providers: Sequence[str],
    members: Sequence[str],
    current: Mapping[str, str],
    *,
    slack: float = 0.1,
    max_rebalance_moves: int | None = None,
) -> Plan:
    """Assign every provider to a live member, moving as few as balance allows.

    ``current`` is the previous round's provider → member map; it may name dead members
    and removed providers.  Input order never matters.
    """
    if not (math.isfinite(slack) and slack >= 0):
        raise ValueError(f"slack must be a finite number >= 0, got {slack!r}")
    if max_rebalance_moves is not None and max_rebalance_moves < 0:
        raise ValueError(f"max_rebalance_moves must be >= 0, got {max_rebalance_moves}")
    ordered = sorted(set(providers))
    live = sorted(set(members))
    if not live:
        return Plan(assignment={}, moves=(), imbalance=1.0, loads={})
    state = _Round(live, load_bounds(len(ordered), len(live), slack), max_rebalance_moves)
    pending = state.keep_live_owners(ordered, current)
    pending += state.shed_overloaded()
    state.place(sorted(pending))
    state.fill_underloaded()
    return state.result(ordered, current)


class _Preferences:
    """Per-round cache of rendezvous scores, each computed at most once and only when asked.

    A steady round scores nothing; a join scores moving providers against the members below
    cap and the rest against their owner and the joining members: far fewer than P x M.
    """

    def __init__(self, members: list[str]) -> None:
        # Hashing "member\0" once and copying the state gives the same digest as hashing
        # the whole string, at about two thirds of the cost.
        self._prefixes = [hashlib.blake2b(f"{m}\0".encode(), digest_size=8) for m in members]
        self._scores: dict[str, list[int]] = {}  # -1: not computed yet

    def _row(self, provider: str) -> list[int]:
        row = self._scores.get(provider)
        if row is None:
            row = self._scores[provider] = [-1] * len(self._prefixes)
        return row

    def _hash(self, provider: str, member: int) -> int:
        hasher = self._prefixes[member].copy()
        hasher.update(provider.encode())
        return int.from_bytes(hasher.digest(), "big")

    def score(self, provider: str, member: int) -> int:
        row = self._row(provider)
        if row[member] < 0:
            row[member] = self._hash(provider, member)
        return row[member]

    def best(self, provider: str, members: list[int]) -> int:
        """The one of ``members`` that ``provider`` prefers."""
        row = self._row(provider)
        for member in members:
            if row[member] < 0:
                row[member] = self._hash(provider, member)
        return max(members, key=row.__getitem__)


class _Round:
    """Mutable state of one planning round; members are handled by index."""

    def __init__(self, members: list[str], bounds: tuple[int, int], budget: int | None) -> None:
        self.members = members
        self.index = {m: i for i, m in enumerate(members)}
        self.prefs = _Preferences(members)
        self.floor, self.cap = bounds
        self.budget = budget
        self.owner: dict[str, int] = {}
        self.held: list[set[str]] = [set() for _ in members]
        self.free: set[str] = set()  # moving this round anyway: re-routing them costs nothing

    def _load(self, member: int) -> int:
        return len(self.held[member])

    def _put(self, provider: str, member: int) -> None:
        previous = self.owner.get(provider)
        if previous is not None:
            self.held[previous].discard(provider)
        self.owner[provider] = member
        self.held[member].add(provider)

    def _allowance(self) -> int:
        return sys.maxsize if self.budget is None else self.budget

    def _spend(self, moves: int) -> None:
        if self.budget is not None:
            self.budget -= moves

    def keep_live_owners(self, providers: list[str], current: Mapping[str, str]) -> list[str]:
        """Phase 1: keep providers with a live owner; return the ones needing a member."""
        pending = []
        for provider in providers:
            owner = current.get(provider)
            member = None if owner is None else self.index.get(owner)
            if member is None:
                pending.append(provider)
                self.free.add(provider)
            else:
                self._put(provider, member)
        return pending

    def shed_overloaded(self) -> list[str]:
        """Phase 2: take from members above cap the providers that score them lowest."""
        shed: list[str] = []
        for member in range(len(self.members)):
            excess = min(self._load(member) - self.cap, self._allowance())
            if excess <= 0:
                continue
            unwanted = self._least_wanted(member)[:excess]
            for provider in unwanted:
                self.held[member].discard(provider)
                del self.owner[provider]
            self.free.update(unwanted)
            self._spend(len(unwanted))
            shed += unwanted
        return shed

    def place(self, providers: list[str]) -> None:
        """Phase 3: each provider goes to its best-ranked member still below cap."""
        open_members = [m for m in range(len(self.members)) if self._load(m) < self.cap]
        for provider in providers:
            best = self.prefs.best(provider, open_members)
            self._put(provider, best)
            if self._load(best) >= self.cap:
                open_members.remove(best)

    def fill_underloaded(self) -> None:
        """Phase 4: raise every member below floor to floor, least-loaded first."""
        for member in sorted(range(len(self.members)), key=self._load):
            if self._load(member) < self.floor:
                self._pull_into(member)

    def _pull_into(self, taker: int) -> None:
        donors = [m for m in range(len(self.members)) if self._load(m) > self.floor]
        pools = [self._candidates(donors, taker, free=True)]
        while self._load(taker) < self.floor:
            provider = self._pop_from_most_loaded(pools[0])
            if provider is None and self._allowance() > 0:
                if len(pools) == 1:
                    pools.append(self._candidates(donors, taker, free=False))
                provider = self._pop_from_most_loaded(pools[1])
                if provider is not None:
                    self._spend(1)
            if provider is None:
                return
            self._put(provider, taker)
            self.free.add(provider)

    def _least_wanted(self, member: int) -> list[str]:
        """``member``'s providers, lowest score first: the likeliest to rank it below others."""
        return sorted(self.held[member], key=lambda p: (self.prefs.score(p, member), p))

    def _candidates(self, donors: list[int], taker: int, *, free: bool) -> dict[int, list[str]]:
        """Per donor, its free (or sticky) providers, the one wanting ``taker`` most last.

        Wanting means first preferring ``taker`` to the donor, then scoring ``taker`` high:
        the providers that rendezvous hashing would hand to ``taker`` anyway.
        """
        return {
            d: sorted(
                (p for p in self.held[d] if (p in self.free) == free),
                key=lambda p: self._want(p, taker, d),
            )
            for d in donors
        }

    def _want(self, provider: str, taker: int, donor: int) -> tuple[bool, int, str]:
        weight = self.prefs.score(provider, taker)
        return weight > self.prefs.score(provider, donor), weight, provider

    def _pop_from_most_loaded(self, pool: dict[int, list[str]]) -> str | None:
        donors = [d for d, left in pool.items() if left and self._load(d) > self.floor]
        if not donors:
            return None
        return pool[max(donors, key=lambda d: (self._load(d), -d))].pop()

    def result(self, providers: list[str], current: Mapping[str, str]) -> Plan:
        assignment = {p: self.members[self.owner[p]] for p in providers}
        moves = tuple(
            _move(p, current.get(p), dst, self.index)
            for p, dst in assignment.items()
            if current.get(p) != dst
        )
        loads = {m: self._load(i) for i, m in enumerate(self.members)}
        mean = len(providers) / len(self.members)
        imbalance = max(loads.values()) / mean if providers else 1.0
        return Plan(assignment=assignment, moves=moves, imbalance=imbalance, loads=loads)


def _move(provider: str, src: str | None, dst: str, live: Mapping[str, int]) -> Move:
    if src is None:
        return Move(provider, None, dst, "new")
    return Move(provider, src, dst, "rebalance" if src in live else "orphaned")
