"""Pool benchmarks (issue 4): failover, graceful handoff, cold start, rebalance on join.

    PYTHONPATH=. .venv/bin/python bench/pool_bench.py [--quick] [--only NAME] [--json PATH]

Each scenario runs real `shardworker run` pods against a private Dovecot, a private Redis
and a throwaway PostgreSQL database, with the default lease timings (TTL 8 s, grace
8 s) unless a scenario says otherwise, and prints its figures.  Each scenario has a
database and a Redis DB of its own.  ``--json PATH`` writes cold_start_all_idle_s,
failover_all_idle_s, failover_lost, failover_duplicated, handoff_p99_s (null for a
scenario not run) and load1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from shardworker.db.migrate import migrate
from tests.harness.dovecot import Dovecot
from tests.harness.net import free_port, wait_for_port
from tests.harness.pg import PG_ADMIN_DSN, create_database, drop_database, dsn_for
from tests.pool_support import Cluster, Pod
from tests.support import make_mail, message_ids

PRODUCTION = {"lease_ttl_s": "8", "lease_renew_s": "2.5", "member_grace_s": "6",
              "leader_ttl_s": "6", "leader_round_s": "1", "assignment_poll_s": "0.5",
              "join_debounce_s": "1", "drain_deadline_s": "20", "provider_refresh_s": "5",
              "worker_ping_timeout_s": "10", "sync_threads": "8"}  # fmt: skip


class Env:
    """The servers every scenario shares: one Redis, one Dovecot.  Each scenario gets a
    database and a Redis DB of its own (:meth:`cluster`)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
        wait_for_port(self.port)
        self.tmp = Path(tempfile.mkdtemp(prefix="sw-poolbench-"))
        self.runs = 0
        self.dovecot = Dovecot()
        self.dovecot.start()

    @contextlib.contextmanager
    def cluster(self, providers: int, pods: tuple[str, ...], **overrides: str) -> Iterator[Cluster]:
        """A cluster on a fresh database.  A shared one kept the previous scenario's
        providers active, so this scenario's leader served them too, their leases never
        matched this cluster's users, and ``all_served`` waited out its 300 s."""
        self.runs += 1
        dbname = create_database(prefix="sw_bench_")
        try:
            dsn = dsn_for(PG_ADMIN_DSN, dbname)
            migrate(dsn)
            logs = self.tmp / f"run{self.runs}"
            logs.mkdir()
            c = Cluster(dsn, f"redis://127.0.0.1:{self.port}/{self.runs % 15 + 1}", self.dovecot,
                        logs, providers, **{**PRODUCTION, **overrides})  # fmt: skip
            try:
                c.redis.flushdb()
                for name in pods:
                    c.start_pod(name)
                yield c
            finally:
                c.close()
        finally:
            drop_database(dbname)

    def close(self, *, keep_logs: bool) -> None:
        self.dovecot.close()
        self.redis.terminate()
        self.redis.wait(10)
        if keep_logs:
            print(f"pod logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def time_until(pred: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if pred():
            return time.monotonic() - start
        time.sleep(every_s)
    raise SystemExit(f"not reached within {timeout_s}s")


Figures = dict[str, float | int | None]


def scenario_failover(env: Env, providers: int) -> Figures:
    with env.cluster(providers, ("pod-a", "pod-b", "pod-c")) as c:
        time_until(c.all_served, 300)
        victims = [p for p, m in c.leases().items() if m.startswith("pod-c/")]
        c.pods["pod-c"].kill()
        killed = time.monotonic()
        sent = []
        for i, pid in enumerate(victims[:200]):
            mid = f"<failover{i}@bench>"
            c.dovecot.append(c.users[pid], "INBOX", make_mail(message_id=mid))
            sent.append(mid)
        time_until(lambda: c.all_served({"pod-a", "pod-b"}), 120)
        took = time.monotonic() - killed
        time_until(lambda: set(sent) <= set(message_ids(c.redis)), 60)
        got = Counter(m for m in message_ids(c.redis) if m.startswith("<failover"))
        lost = len(set(sent) - set(got))
        dup = sum(n - 1 for n in got.values())
        print(
            f"failover after SIGKILL: {providers} providers over 3 pods, {len(victims)} moved: "
            f"all IDLE again after {took:.1f}s; mail during failover {len(sent)}, "
            f"lost {lost}, duplicated {dup}"
        )
    return {"failover_all_idle_s": round(took, 2), "failover_lost": lost,
            "failover_duplicated": dup}  # fmt: skip


def scenario_handoff(env: Env, providers: int) -> Figures:
    with env.cluster(providers, ("pod-a", "pod-b", "pod-c")) as c:
        time_until(c.all_served, 300)
        victims = {p for p, m in c.leases().items() if m.startswith("pod-b/")}
        started, wall = time.monotonic(), time.time()
        c.pods["pod-b"].terminate()
        exited = time.monotonic() - started
        time_until(lambda: c.all_served({"pod-a", "pod-c"}), 120, every_s=0.05)
        total = time.monotonic() - started
        released = _first_event(c.pods["pod-b"], "provider_released", wall)
        idle: dict[str, float] = {}
        for name in ("pod-a", "pod-c"):
            for pid, ts in _first_event(c.pods[name], "idle_started", wall).items():
                idle[pid] = min(ts, idle.get(pid, ts))
        gaps = sorted(idle[p] - released[p] for p in victims if p in idle and p in released)
        print(f"graceful handoff (SIGTERM): {len(victims)} providers IDLE elsewhere after "
              f"{total:.2f}s (pod exited after {exited:.2f}s); per provider, released -> IDLE "
              f"at the new owner: p50 {_pct(gaps, 50):.2f}s p99 {_pct(gaps, 99):.2f}s "
              f"({len(gaps)} measured)")  # fmt: skip
    return {"handoff_p99_s": round(_pct(gaps, 99), 3) if gaps else None}


def scenario_cold_start(env: Env, providers: int) -> Figures:
    with env.cluster(providers, (), sync_threads="16") as c:  # providers and users first
        started = time.monotonic()
        c.start_pod("pod-a")
        try:
            time_until(lambda: len(c.leases()) == providers, 300, every_s=0.5)
            leased = time.monotonic() - started
            time_until(c.all_served, 300, every_s=1.0)
        except SystemExit:
            print(
                f"cold start: {providers} providers NOT all IDLE within the limit; {c.diagnose()}"
            )
            raise
        all_idle = time.monotonic() - started
        print(
            f"cold start: {providers} providers on one pod (2 workers): all leased after "
            f"{leased:.1f}s, all IDLE after {all_idle:.1f}s"
        )
    return {"cold_start_all_idle_s": round(all_idle, 2)}


def scenario_join(env: Env, providers: int) -> Figures:
    with env.cluster(providers, ("pod-a", "pod-b", "pod-c")) as c:
        time_until(c.all_served, 300)
        before = c.owners()
        c.start_pod("pod-d")
        started = time.monotonic()
        time_until(lambda: any(m.startswith("pod-d/") for m in c.owners().values()), 60)
        time_until(lambda: c.all_served() and _balance(c.owners()) <= 1.25, 120)
        after = c.owners()
        moved = sum(1 for p in before if after.get(p) != before[p])
        optimum = providers * 2 / 8
        print(
            f"rebalance on join: moved {moved}/{providers} = {moved / providers:.3f} "
            f"(optimum {optimum / providers:.3f}, ratio {moved / optimum:.2f}); max/mean "
            f"{_balance(before):.3f} -> {_balance(after):.3f}; settled in "
            f"{time.monotonic() - started:.1f}s"
        )
    return {}


def _first_event(pod: Pod, event: str, since: float) -> dict[str, float]:
    """provider_id -> wall time of the first `event` line at or after `since`."""
    out: dict[str, float] = {}
    for line in pod.log_lines():
        if line.get("event") == event and "provider_id" in line:
            ts = datetime.fromisoformat(str(line["ts"]).replace("Z", "+00:00")).timestamp()
            if ts >= since:
                out.setdefault(line["provider_id"], ts)
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * q / 100))]


def _balance(owners: dict[str, str]) -> float:
    loads = Counter(owners.values())
    return max(loads.values()) / statistics.mean(loads.values())


FIGURES = ("cold_start_all_idle_s", "failover_all_idle_s", "failover_lost",
           "failover_duplicated", "handoff_p99_s")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--only", choices=["failover", "handoff", "cold", "join"])
    ap.add_argument("--providers", type=int, help="override the scenario's provider count")
    ap.add_argument("--json", metavar="PATH", help="also write the figures to PATH (JSON)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the pod logs on success")
    args = ap.parse_args()
    sizes = {
        "failover": 300 if args.quick else 3000,
        "handoff": 300 if args.quick else 3000,
        "cold": 500 if args.quick else 10_000,
        "join": 300 if args.quick else 3000,
    }
    runs = {"failover": scenario_failover, "handoff": scenario_handoff,
            "cold": scenario_cold_start, "join": scenario_join}  # fmt: skip
    figures: Figures = dict.fromkeys(FIGURES)
    env = Env()
    ok = False
    try:
        for name, run in runs.items():
            if args.only in (None, name):
                figures.update(run(env, args.providers or sizes[name]))
        ok = True
    finally:
        env.close(keep_logs=args.keep_logs or not ok)
    figures["load1"] = round(os.getloadavg()[0], 2)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
