"""The leader's planner state between rounds, and the incremental step over it.

``assign.plan_assignment`` starts from nothing each time: it sorts, hashes and scans every
provider, which at a million costs seconds for a member change that moves a few
thousand.  A ``Placement`` keeps what those phases need between the leader's rounds:

* each provider's ring point, hashed once when it appears;
* the providers in ring order (``assign.RingOrder``), for a joiner walking its arcs;
* each provider's owner, each member's providers, and the providers nobody owns.

``replan`` runs the planner's phases (``assign.Round``) over that state, with an overlay
that records only what this round changes, so a member lost costs its providers and a
member joining about what it takes.  It returns exactly the moves ``plan_assignment``
would return for the same providers, members and owners (``tests/test_placement.py``
checks this over random sequences of joins, losses, additions and removals), and does
not change the state: the leader publishes the moves, then ``apply``\\ s what it
published.  So the state follows the published owners, never the reverse, and the
leader's periodic full plan (``drift`` first) proves it did.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from shardworker.pool.assign import (
    Move,
    RingOrder,
    Round,
    check_arguments,
    collector_paused,
    load_bounds,
    ring_of,
    ring_point,
)

_SHED = -1  # an overlay entry for a provider taken from its owner and not yet placed


@dataclass(frozen=True)
class Step:
    """What one incremental round decided: only the moves, and the loads after them."""

    moves: tuple[Move, ...]
    loads: dict[str, int]
    imbalance: float


class _Overlay:
    """The owners one round sees: the placement's, with this round's changes on top.

    A provider whose owner is not a live member has none (``KeyError``), as in the full
    plan's keep pass."""

    def __init__(self, base: Mapping[str, str], index: Mapping[str | None, int]) -> None:
        self.base = base
        self.index = index
        self.changed: dict[str, int] = {}

    def __getitem__(self, provider: str) -> int:
        member = self.changed.get(provider)
        if member is None:
            member = self.index.get(self.base.get(provider))
        if member is None or member == _SHED:
            raise KeyError(provider)
        return member

    def __setitem__(self, provider: str, member: int) -> None:
        self.changed[provider] = member

    def __delitem__(self, provider: str) -> None:
        self.changed[provider] = _SHED


class Placement:
    """Providers, their ring points and ring order, and who owns them (as published)."""

    def __init__(self, providers: Iterable[str], owners: Mapping[str, str]) -> None:
        with collector_paused():  # a million new objects, none of them in a cycle
            self.point: dict[str, int] = {p: ring_point(p) for p in providers}
            self.order = RingOrder.build(self.point, self.point.values())
            self.owner: dict[str, str] = {}
            self.held: dict[str, set[str]] = {}
            self.unowned: set[str] = set()
            self.reset(owners)

    # -- keeping the state -----------------------------------------------------------------

    def reset(self, owners: Mapping[str, str]) -> None:
        """Owners from scratch (after the leader repaired what Redis holds)."""
        point = self.point
        self.owner = {p: m for p, m in owners.items() if p in point}
        self.held = {m: set() for m in set(self.owner.values())}
        for provider, member in self.owner.items():
            self.held[member].add(provider)
        self.unowned = {p for p in point if p not in self.owner}

    def _own(self, provider: str, member: str) -> None:
        self.owner[provider] = member
        self.held.setdefault(member, set()).add(provider)
        self.unowned.discard(provider)

    def _disown(self, provider: str) -> None:
        member = self.owner.pop(provider, None)
        if member is not None:
            held = self.held[member]
            held.discard(provider)
            if not held:
                del self.held[member]

    def add(self, providers: Iterable[str]) -> None:
        """Providers that became servable: hashed once, owned by nobody yet."""
        for provider in providers:
            if provider not in self.point:
                point = self.point[provider] = ring_point(provider)
                self.order.add(provider, point)
                self.unowned.add(provider)

    def remove(self, providers: Iterable[str]) -> None:
        """Providers that are no longer servable, with their ownership."""
        for provider in providers:
            point = self.point.pop(provider, None)
            if point is not None:
                self.order.discard(provider, point)
                self.unowned.discard(provider)
                self._disown(provider)

    def apply(self, changes: Mapping[str, str | None]) -> None:
        """Owners as published (``None``: nobody); providers not held are ignored."""
        for provider, member in changes.items():
            if provider not in self.point:
                continue
            self._disown(provider)
            if member is None:
                self.unowned.add(provider)
            else:
                self._own(provider, member)

    def drift(self, providers: Collection[str], owners: Mapping[str, str]) -> int:
        """How many providers this state has wrong against ``providers`` and their
        ``owners`` (the leader's view), plus any inconsistency inside it: 0 unless a bug."""
        wrong = len(set(providers) ^ self.point.keys())
        wrong += sum(1 for p, m in owners.items() if p in self.point and self.owner.get(p) != m)
        wrong += sum(1 for p in self.owner if p not in owners)
        wrong += abs(sum(map(len, self.held.values())) - len(self.owner))
        wrong += abs(len(self.owner) + len(self.unowned) - len(self.point))
        return wrong + abs(self.order.size - len(self.point))

    # -- the incremental round -------------------------------------------------------------

    def replan(
        self, members: Sequence[str], *, slack: float = 0.1, max_rebalance_moves: int | None = None
    ) -> Step:
        """The moves ``plan_assignment(providers, members, owners)`` would make, at a cost
        in proportion to what moves: orphaned, new and shed providers, and the arcs a
        member below the floor walks."""
        check_arguments(slack, max_rebalance_moves)
        live = tuple(sorted(set(members)))
        if not live:
            return Step(moves=(), loads={}, imbalance=1.0)
        index: dict[str | None, int] = {m: i for i, m in enumerate(live)}
        overlay = _Overlay(self.owner, index)
        size = len(self.point)
        bounds = load_bounds(size, len(live), slack)
        with collector_paused():
            state = Round(
                ring_of(live),
                bounds,
                max_rebalance_moves,
                points=self.point,
                owner=overlay,
                size=size,
            )
            state.every = lambda: self.order
            for member, held in self.held.items():
                if member in index:
                    state.loads[index[member]] = len(held)
            pending = [*self.unowned]
            for member, held in self.held.items():
                if member not in index:
                    pending += held
            state.free.update(pending)
            pending += state.shed_overloaded(lambda over: self._holdings(over, live, overlay))
            state.place(sorted(pending))
            state.fill_underloaded()
            return Step(self._moves(overlay, state), dict(zip(live, state.loads, strict=True)),
                        state.imbalance())  # fmt: skip

    def _holdings(
        self, over: Collection[int], live: Sequence[str], overlay: _Overlay
    ) -> dict[int, list[str]]:
        return {m: [p for p in self.held.get(live[m], ()) if p not in overlay.changed]
                for m in over}  # fmt: skip

    def _moves(self, overlay: _Overlay, state: Round) -> tuple[Move, ...]:
        moves = []
        for provider in sorted(overlay.changed):  # provider order, like the full plan's
            dst = state.members[overlay.changed[provider]]
            if (src := self.owner.get(provider)) != dst:
                moves.append(Move(provider, src, dst, state.reason(src)))
        return tuple(moves)
