"""Pure unit tests of the leader's incremental planner state (``pool.placement``).

The incremental step must decide exactly what the full plan decides for the same
providers, members and owners, whatever sequence of joins, losses, additions and
removals led there; the kept ring order must be the sorted one; and ``drift`` must see
any disagreement with the view, since the leader's reconcile relies on it.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardworker.pool.assign import RING_SIZE, RingOrder, load_bounds, plan_assignment, ring_point
from shardworker.pool.placement import Placement
from tests.test_assign import provider_ids


def test_the_ring_order_stays_sorted_through_additions_and_removals() -> None:
    rng = random.Random(2)
    names = provider_ids(3000, seed=2)
    order = RingOrder.build(names[:2000], [ring_point(p) for p in names[:2000]])
    for name in names[2000:]:
        order.add(name, ring_point(name))
    for name in rng.sample(names, 700):
        order.discard(name, ring_point(name))
        order.discard(name, ring_point(name))  # twice: a no-op
    kept = sorted(order, key=lambda p: (ring_point(p), p))
    assert list(order) == kept and order.size == 2300


@pytest.mark.parametrize("n", [0, 1, 40, 5000])
def test_nearest_walks_each_provider_once_by_distance_to_the_next_own_point(n: int) -> None:
    names = provider_ids(n, seed=n)
    order = RingOrder.build(names, [ring_point(p) for p in names])
    own = sorted(ring_point(f"pod-x/0\0{i}") for i in range(128))

    def distance(name: str) -> int:
        here = ring_point(name)
        return min((p - here) % RING_SIZE for p in own)

    walked = list(order.nearest(own))
    assert sorted(walked) == sorted(names)
    assert [distance(p) for p in walked] == sorted(distance(p) for p in names)


def as_full(placement: Placement, members: list[str], owners: dict[str, str],
            limit: int | None) -> None:  # fmt: skip
    """One incremental step, checked against the full plan, then applied."""
    full = plan_assignment(list(placement.point), members, owners, max_rebalance_moves=limit)
    step = placement.replan(members, max_rebalance_moves=limit)
    assert step.moves == full.moves
    assert (step.loads, step.imbalance) == (full.loads, full.imbalance)
    changes = {move.provider: move.dst for move in step.moves}
    owners.update(changes)
    placement.apply(changes)
    assert owners == full.assignment
    assert placement.drift(full.assignment.keys(), owners) == 0


EVENTS = st.lists(st.sampled_from(["join", "leave", "add", "remove", "round"]), max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 400), st.integers(1, 8), EVENTS, st.sampled_from([None, 0, 7]),
       st.integers(0, 2**32))  # fmt: skip
def test_property_incremental_steps_decide_what_the_full_plan_decides(
    n: int, m: int, events: list[str], limit: int | None, seed: int
) -> None:
    rng = random.Random(seed)
    providers = set(provider_ids(n, seed=seed))
    members = [f"pod-{i}/0" for i in range(m)]
    owners = dict(plan_assignment(providers, members, {}).assignment)
    placement = Placement(providers, owners)
    for number, event in enumerate(events):
        if event == "join":
            members.append(f"pod-new-{number}/0")
        elif event == "leave" and len(members) > 1:
            members.remove(rng.choice(members))
        elif event == "add":
            placement.add(provider_ids(rng.randint(1, 30), seed=seed + number + 1))
        elif event == "remove" and placement.point:
            gone = rng.sample(sorted(placement.point), min(len(placement.point), 25))
            placement.remove(gone)
            for key in gone:
                owners.pop(key, None)
        as_full(placement, members, owners, limit)


def test_no_members_is_an_empty_step_and_a_provider_set_twice_counts_once() -> None:
    placement = Placement(provider_ids(10), {})
    assert placement.replan([]).moves == ()
    placement.add(provider_ids(10))  # already there
    assert len(placement.point) == len(placement.unowned) == 10
    assert placement.drift(provider_ids(10), {}) == 0


def converge(placement: Placement, members: list[str], limit: int | None) -> int:
    """Incremental rounds, applied, until nothing moves; the total moved."""
    total = 0
    for _ in range(100):
        step = placement.replan(members, max_rebalance_moves=limit)
        if not step.moves:
            floor, cap = load_bounds(len(placement.point), len(members), 0.1)
            assert all(floor <= load <= cap for load in step.loads.values())
            return total
        total += len(step.moves)
        placement.apply({move.provider: move.dst for move in step.moves})
    raise AssertionError("did not converge")


@pytest.mark.parametrize("limit", [None, 200])
def test_a_join_or_a_loss_at_10k_moves_within_a_tenth_of_the_optimum(limit: int | None) -> None:
    providers = provider_ids(10_000, seed=10)
    members = [f"pod-{i}/0" for i in range(20)]
    start = plan_assignment(providers, members, {}).assignment
    joined = Placement(providers, start)
    assert converge(joined, [*members, "pod-new/0"], limit) <= 1.1 * 10_000 / 21
    for gone in members[::5]:
        survivors = [m for m in members if m != gone]
        held = sum(1 for m in start.values() if m == gone)
        assert converge(Placement(providers, start), survivors, limit) <= 1.1 * held


def test_a_full_plan_after_incremental_steps_finds_no_drift_and_moves_nothing() -> None:
    providers = provider_ids(4000, seed=3)
    members = [f"pod-{i}/0" for i in range(12)]
    owners = dict(plan_assignment(providers, members, {}).assignment)
    placement = Placement(providers, owners)
    rng = random.Random(3)
    for round_ in range(30):  # a join, losses, additions, removals; 50 moves a round
        if round_ % 10 == 0:
            members.append(f"pod-new-{round_}/0")
        if round_ % 10 == 5:
            members.remove(rng.choice(members))
        placement.add(provider_ids(5, seed=100 + round_))
        gone = rng.sample(sorted(placement.point), 5)
        placement.remove(gone)
        for key in gone:
            owners.pop(key, None)
        step = placement.replan(members, max_rebalance_moves=50)
        changes = {move.provider: move.dst for move in step.moves}
        owners.update(changes)
        placement.apply(changes)
    converge(placement, members, 50)
    owners = dict(placement.owner)
    assert placement.drift(placement.point.keys(), owners) == 0
    full = plan_assignment(placement.point, members, owners, max_rebalance_moves=50)
    assert full.moves == () and full.assignment == owners


def test_drift_sees_a_wrong_owner_a_missing_provider_and_a_stray_one() -> None:
    providers = provider_ids(100)
    owners = dict(plan_assignment(providers, ["a", "b"], {}).assignment)
    placement = Placement(providers, owners)
    assert placement.drift(providers, owners) == 0
    wrong = {**owners, providers[0]: "b" if owners[providers[0]] == "a" else "a"}
    assert placement.drift(providers, wrong) == 1
    assert placement.drift(providers[1:], owners) >= 1
    assert placement.drift([*providers, "stray"], owners) == 1
