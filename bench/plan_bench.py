"""Planner time at size: the full plan and the leader's incremental steps.

    PYTHONPATH=. .venv/bin/python -m bench.plan_bench --size 100000x100 --size 1000000x500 \\
        --json out.json

Pure CPU, no servers: ``assign.plan_assignment`` called the way the leader calls it
(sorted providers, the previous owners, ``max_rebalance_moves``).  Per size:

* ``cold``: every provider new;
* ``loss``: the cold plan minus one member (its providers orphaned);
* ``join``: the cold plan plus one member (rate-limited to ``--max-moves``, as the leader
  does; the moved figure is that first round's);
* ``steady``: the cold plan again (nothing changed).

The leader runs a full plan only on its first round and at the periodic reconcile; a
member change between them is an incremental step over the state it keeps
(``pool.placement``).  Those stages (skipped with ``--planner``):

* ``keep``: building that state from the cold plan (a new leader's takeover);
* ``reconcile``: the full plan as the leader calls it then (the providers as a set,
  the kept ring points);
* ``inc_loss``, ``inc_join``, ``inc_steady``: the incremental step for the same loss,
  join and nothing changed;
* ``inc_join_all``: the join's rate-limited rounds applied until nothing moves (the
  moved total against the optimum, the dearest round).

Every stage also reports ``max_hold_s``, the longest stretch a watchdog thread waited
for the GIL: the bound on how late the leader's lease thread can renew.

Times are CPU seconds of this process (``time.process_time``), honest on a shared
machine; ``peak_rss_mb`` is the process's high-water mark after the size.  ``--planner
FILE`` times another copy of the planner module (e.g. an older ``assign.py``) and
``--stages`` limits what runs; stages after ``cold`` start from a plan by ``--seed-planner``
(default: the planner under test) when ``cold`` is not among them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import resource
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

STAGES = ("cold", "loss", "join", "steady", "keep", "reconcile", "inc_loss", "inc_join",
          "inc_steady", "inc_join_all")  # fmt: skip
TICK_S = 0.002


@contextmanager
def gil_watch() -> Iterator[list[float]]:
    """Yields a one-item list that holds, after the block, the longest time a thread
    sleeping ``TICK_S`` at a time waited beyond its sleep (for the GIL)."""
    worst = [0.0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            started = time.perf_counter()
            time.sleep(TICK_S)
            worst[0] = max(worst[0], time.perf_counter() - started - TICK_S)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield worst
    finally:
        done.set()
        thread.join()


def load_planner(path: str | None) -> ModuleType:
    if path is None:
        from shardworker.pool import assign

        return assign
    spec = importlib.util.spec_from_file_location(f"planner_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def provider_keys(n: int) -> list[str]:
    """``tenant:provider_id`` keys, 100 providers per tenant, like the simulator's."""
    rng = random.Random(n)
    tenants = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(max(1, n // 100))]
    return sorted(
        f"{tenants[i % len(tenants)]}:{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        for i in range(n)
    )


def members_of(m: int) -> list[str]:
    return [f"pod-{i // 2}/{i % 2}" for i in range(m)]


def measured(call: Callable[[], Any]) -> tuple[Any, float, float]:
    """``call()``, its CPU seconds and the longest GIL wait seen meanwhile."""
    with gil_watch() as worst:
        started = time.process_time()
        result = call()
        cpu = time.process_time() - started
    return result, cpu, worst[0]


def timed(planner: ModuleType, providers: list[str], members: list[str],
          current: dict[str, str], limit: int) -> tuple[Any, float, float]:  # fmt: skip
    return measured(
        lambda: planner.plan_assignment(providers, members, current, max_rebalance_moves=limit)
    )


def summary(plan: Any, cpu_s: float, optimum: float, hold_s: float = 0.0) -> dict[str, Any]:
    return {"cpu_s": round(cpu_s, 3), "max_hold_s": round(hold_s, 3), "moves": len(plan.moves),
            "moved_vs_optimum": round(len(plan.moves) / optimum, 3) if optimum else None,
            "imbalance": round(plan.imbalance, 4),
            "min_load": min(plan.loads.values()), "max_load": max(plan.loads.values())}  # fmt: skip


def run_size(n: int, m: int, args: argparse.Namespace) -> dict[str, Any]:
    planner = load_planner(args.planner)
    providers, members = provider_keys(n), members_of(m)
    out: dict[str, Any] = {"providers": n, "members": m, "max_rebalance_moves": args.max_moves}
    if "cold" in args.stages:
        cold, cpu, hold = timed(planner, providers, members, {}, args.max_moves)
        out["cold"] = summary(cold, cpu, n, hold)
        start = cold.assignment
    else:
        seed = load_planner(args.seed_planner or args.planner)
        start = seed.plan_assignment(providers, members, {}).assignment
    lost = members[m // 2]
    survivors = [x for x in members if x != lost]
    held = sum(1 for owner in start.values() if owner == lost)
    joined = [*members, "pod-new/0"]
    if "loss" in args.stages:
        plan, cpu, hold = timed(planner, providers, survivors, start, args.max_moves)
        out["loss"] = {**summary(plan, cpu, held, hold), "held": held}
    if "join" in args.stages:
        plan, cpu, hold = timed(planner, providers, joined, start, args.max_moves)
        out["join"] = summary(plan, cpu, n / (m + 1), hold)
    if "steady" in args.stages:
        plan, cpu, hold = timed(planner, providers, members, start, args.max_moves)
        out["steady"] = summary(plan, cpu, 0, hold)
    if args.planner is None:
        out.update(incremental(providers, members, start, args, lost=lost, held=held))
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def incremental(providers: list[str], members: list[str], start: dict[str, str],
                args: argparse.Namespace, *, lost: str, held: int) -> dict[str, Any]:  # fmt: skip
    """The leader's own paths: the kept state, the full reconcile, the incremental steps."""
    from shardworker.pool.assign import plan_assignment
    from shardworker.pool.placement import Placement

    out: dict[str, Any] = {}
    limit, n, m = args.max_moves, len(providers), len(members)
    placement, cpu, hold = measured(lambda: Placement(providers, start))
    out["keep"] = {"cpu_s": round(cpu, 3), "max_hold_s": round(hold, 3)}
    survivors = [x for x in members if x != lost]
    joined = [*members, "pod-new/0"]
    if "reconcile" in args.stages:
        every = set(providers)
        plan, cpu, hold = measured(lambda: plan_assignment(
            every, members, start, max_rebalance_moves=limit, points=placement.point))  # fmt: skip
        out["reconcile"] = summary(plan, cpu, 0, hold)
    steps = {"inc_loss": (survivors, held), "inc_join": (joined, n / (m + 1)),
             "inc_steady": (members, 0)}  # fmt: skip
    for stage, (live, optimum) in steps.items():
        if stage in args.stages:
            step, cpu, hold = measured(lambda live=live: placement.replan(  # type: ignore[misc]
                live, max_rebalance_moves=limit))  # fmt: skip
            out[stage] = summary(step, cpu, optimum, hold)
    if "inc_join_all" in args.stages:
        out["inc_join_all"] = join_to_the_end(placement, joined, limit)
    return out


def join_to_the_end(placement: Any, joined: list[str], limit: int) -> dict[str, Any]:
    """Rate-limited incremental rounds, applied, until nothing moves."""
    total = rounds = 0
    worst_cpu = worst_hold = 0.0
    while rounds < 1000:
        step, cpu, hold = measured(lambda: placement.replan(joined, max_rebalance_moves=limit))
        worst_cpu, worst_hold = max(worst_cpu, cpu), max(worst_hold, hold)
        if not step.moves:
            break
        placement.apply({move.provider: move.dst for move in step.moves})
        total, rounds = total + len(step.moves), rounds + 1
    optimum = len(placement.point) / len(joined)
    return {"rounds": rounds, "moves": total, "moved_vs_optimum": round(total / optimum, 3),
            "max_round_cpu_s": round(worst_cpu, 3), "max_hold_s": round(worst_hold, 3),
            "min_load": min(step.loads.values()), "max_load": max(step.loads.values())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", action="append", default=[], help="NxM, e.g. 100000x100")
    parser.add_argument("--planner", help="a planner module file to time instead of assign.py")
    parser.add_argument("--seed-planner", help="planner file for the start state without cold")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--max-moves", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.stages = set(args.stages.split(","))
    results = []
    for size in args.size or ["100000x100"]:
        n, m = (int(x) for x in size.lower().split("x"))
        started = time.monotonic()
        result = run_size(n, m, args)
        result["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps({"planner": args.planner or "assign.py",
                                         "results": results}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
