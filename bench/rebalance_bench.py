"""Rebalance on join: moved fraction vs the optimum, balance, and planning time.

    .venv/bin/python bench/rebalance_bench.py [--providers 3000 10000] [--workers 3]

Pure CPU, no servers.  For each size: a cold start over 3 pods, a 4th pod joining (moved
fraction against the optimum new/total, max/mean before and after), a re-plan of the
balanced state (the leader's steady-state cost), and the rate-limited rounds a join takes
with --max-moves.  Times are CPU milliseconds of this process (best of --repeat runs):
planning is single-threaded pure Python, and CPU time stays honest on a shared machine.
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from collections.abc import Callable

from shardworker.pool.assign import Plan, plan_assignment


def provider_ids(n: int) -> list[str]:
    rng = random.Random(n)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def pods(names: str, workers: int) -> list[str]:
    return [f"pod-{pod}/{i}" for pod in names for i in range(workers)]


def timed(repeat: int, plan: Callable[[], Plan]) -> tuple[Plan, float]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.process_time()
        result = plan()
        best = min(best, time.process_time() - started)
    assert result is not None
    return result, best * 1000


def rate_limited_rounds(providers: list[str], members: list[str], start: Plan, limit: int) -> int:
    assignment, rounds = start.assignment, 0
    while True:
        plan = plan_assignment(providers, members, assignment, max_rebalance_moves=limit)
        if not plan.moves:
            return rounds
        assignment, rounds = plan.assignment, rounds + 1


def run(n_providers: int, workers: int, repeat: int, limit: int) -> None:
    providers = provider_ids(n_providers)
    old, new = pods("abc", workers), pods("abcd", workers)
    cold, cold_ms = timed(repeat, lambda: plan_assignment(providers, old, {}))
    joined, join_ms = timed(repeat, lambda: plan_assignment(providers, new, cold.assignment))
    _, steady_ms = timed(repeat, lambda: plan_assignment(providers, new, joined.assignment))
    optimum = workers / len(new)
    moved = len(joined.moves) / n_providers
    print(
        f"{n_providers:>6} providers, 3->4 pods x {workers} workers: "
        f"moved {moved:.4f} vs optimum {optimum:.4f} (ratio {moved / optimum:.3f}); "
        f"max/mean {cold.imbalance:.3f} -> {joined.imbalance:.3f}; "
        f"plan cpu ms: cold {cold_ms:.0f}, join {join_ms:.0f}, steady {steady_ms:.1f}; "
        f"rounds at {limit} moves/round: {rate_limited_rounds(providers, new, cold, limit)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", type=int, nargs="+", default=[3000, 10000])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-moves", type=int, default=200)
    args = parser.parse_args()
    for n in args.providers:
        run(n, args.workers, args.repeat, args.max_moves)


if __name__ == "__main__":
    main()
