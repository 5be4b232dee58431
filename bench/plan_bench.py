"""Planner time at size: a cold plan, a member lost, a member joining, a steady re-plan.

    PYTHONPATH=. .venv/bin/python -m bench.plan_bench --size 100000x100 --size 1000000x500 \\
        --json out.json

Pure CPU, no servers: ``assign.plan_assignment`` called the way the leader calls it
(sorted providers, the previous owners, ``max_rebalance_moves``).  Per size:

* ``cold``: every provider new;
* ``loss``: the cold plan minus one member (its providers orphaned);
* ``join``: the cold plan plus one member (rate-limited to ``--max-moves``, as the leader
  does; the moved figure is that first round's);
* ``steady``: the cold plan again (nothing changed).

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
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

STAGES = ("cold", "loss", "join", "steady")


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


def timed(planner: ModuleType, providers: list[str], members: list[str],
          current: dict[str, str], limit: int) -> tuple[Any, float]:  # fmt: skip
    started = time.process_time()
    plan = planner.plan_assignment(providers, members, current, max_rebalance_moves=limit)
    return plan, time.process_time() - started


def summary(plan: Any, cpu_s: float, optimum: float) -> dict[str, Any]:
    return {"cpu_s": round(cpu_s, 3), "moves": len(plan.moves),
            "moved_vs_optimum": round(len(plan.moves) / optimum, 3) if optimum else None,
            "imbalance": round(plan.imbalance, 4),
            "min_load": min(plan.loads.values()), "max_load": max(plan.loads.values())}  # fmt: skip


def run_size(n: int, m: int, args: argparse.Namespace) -> dict[str, Any]:
    planner = load_planner(args.planner)
    providers, members = provider_keys(n), members_of(m)
    out: dict[str, Any] = {"providers": n, "members": m, "max_rebalance_moves": args.max_moves}
    if "cold" in args.stages:
        cold, cpu = timed(planner, providers, members, {}, args.max_moves)
        out["cold"] = summary(cold, cpu, n)
        start = cold.assignment
    else:
        seed = load_planner(args.seed_planner or args.planner)
        start = seed.plan_assignment(providers, members, {}).assignment
    if "loss" in args.stages:
        lost = members[m // 2]
        survivors = [x for x in members if x != lost]
        held = sum(1 for owner in start.values() if owner == lost)
        plan, cpu = timed(planner, providers, survivors, start, args.max_moves)
        out["loss"] = {**summary(plan, cpu, held), "held": held}
    if "join" in args.stages:
        plan, cpu = timed(planner, providers, [*members, "pod-new/0"], start, args.max_moves)
        out["join"] = summary(plan, cpu, n / (m + 1))
    if "steady" in args.stages:
        plan, cpu = timed(planner, providers, members, start, args.max_moves)
        out["steady"] = summary(plan, cpu, 0)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


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
