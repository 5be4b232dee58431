"""The reference pipeline (imapflow + mailparser on Node) next to shardworker, fairly.

    PYTHONPATH=. .venv/bin/python bench/reference_compare.py [--sessions 500] [--samples 300]
        [--drain 5000] [--size 12000] [--order both|node-first|sw-first] [--tls] [--quick]
        [--node-only] [--json PATH]

Needs `npm ci` in bench/reference once.  Four phases, each against its own fresh private
Dovecot (and, for shardworker, its own Redis and database), so that no phase inherits
the sessions, caches or mail of another:

1. push latency at ``--sessions`` IDLE sessions, fetch + parse only: Node's
   bench/reference/reference.mjs holds the sessions and prints when each new message is
   parsed; the same bare-IDLE probe as bench/ingest_latency.py measures the floor, and
   overhead = t_parsed - t_exists(bare) for the same message (both CLOCK_MONOTONIC);
2. the same for shardworker's engine (publishing included) at the same session count;
3. drain of ``--drain`` messages from one mailbox: Node fetch + parse only, then
   shardworker with publishing and ledger (bench/backlog_drain.py's single phase).

``--order both`` (the default) runs the whole set twice, Node first and then shardworker
first, and reports each order and both pooled: when the order still shows in the
figures, the comparison measures the order, not the stacks.  ``--json PATH`` writes the
pooled figures: node./sw.overhead_p50_ms, overhead_p99_ms, drain_msgs_per_s,
drain_cpu_ms_per_msg, and load1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.backlog_drain import Phase, load_mail, run_phase
from bench.common import (
    SAMPLE_TIMEOUT_S,
    Figure,
    PushTarget,
    Sample,
    add_json_option,
    bench_logs,
    fail,
    load1,
    machine_note,
    ms,
    percentile,
    print_table,
    private_dovecot,
    private_redis,
    push_sample,
    run_with_progress,
    throwaway_database,
    write_figures,
)
from bench.ingest_latency import measure
from tests.harness.dovecot import Dovecot, ImapUser

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
SCRIPT = REFERENCE_DIR / "reference.mjs"


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        fail("node is not installed")
    if not (REFERENCE_DIR / "node_modules" / "imapflow").is_dir():
        fail(f"run `npm ci` in {REFERENCE_DIR} first")
    assert node is not None
    return node


def node_args(target: PushTarget) -> list[str]:
    args = ["--host", target.host, "--port", str(target.port)]
    if target.tls:
        args += ["--tls", "--ca", target.cafile]
    return args


class NodeEvents:
    """Reads the reference's JSON lines; answers "when was message X parsed?"."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.parsed: dict[str, float] = {}
        self.errors: list[str] = []
        self.ready: dict[str, Any] | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            with self._cond:
                if event["event"] == "parsed" and event["mid"]:
                    self.parsed[str(event["mid"]).strip("<>")] = int(event["t_ns"]) / 1e9
                elif event["event"] == "ready":
                    self.ready = event
                elif event["event"] == "error":
                    self.errors.append(f"{event['user']}: {event['error']}")
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        with self._cond:
            if not self._cond.wait_for(
                lambda: self.ready is not None or self.proc.poll() is not None, timeout_s
            ):
                fail(f"the reference did not get ready within {timeout_s:.0f}s")
        if self.ready is None:
            fail(f"the reference exited with {self.proc.poll()}")
        assert self.ready is not None
        return self.ready

    def arm(self, mid: str) -> Callable[[], float]:
        wanted = mid.strip("<>")

        def wait() -> float:
            with self._cond:
                if not self._cond.wait_for(lambda: wanted in self.parsed, SAMPLE_TIMEOUT_S):
                    raise TimeoutError(f"the reference did not parse {mid}: {self.errors[-3:]}")
                return self.parsed[wanted]

        return wait


@contextlib.contextmanager
def users_file(users: list[ImapUser]) -> Iterator[str]:
    """The sessions' credentials for the Node process, readable by us only."""
    fd, path = tempfile.mkstemp(prefix="sw-bench-users-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump([[u.name, u.password] for u in users], out)
        yield path
    finally:
        os.unlink(path)


def node_latency(
    args: argparse.Namespace, server: Dovecot, users: list[ImapUser]
) -> tuple[list[Sample], dict[str, Any]]:
    target = PushTarget.of(server, args.tls)
    rng = random.Random(args.seed)
    with users_file(users) as path:
        proc = subprocess.Popen(
            [node_binary(), str(SCRIPT), "latency", *node_args(target), "--users", path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            events = NodeEvents(proc)
            ready = events.wait_ready(timeout_s=max(120.0, len(users) * 0.1))
            print(f"  node: {ready['sessions']} sessions IDLE after {ready['connect_s']:.1f}s")
            samples = []
            for seq in range(args.samples):
                user = rng.choice(users)
                samples.append(push_sample(target, user, seq, args.size, events.arm))
                time.sleep(args.gap)
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if events.errors:
        fail(f"the reference reported errors: {events.errors[:3]}")
    return samples, ready


def node_drain(args: argparse.Namespace, server: Dovecot) -> dict[str, Any]:
    [user] = server.add_users(1, prefix="refdrain")
    run_with_progress(
        f"loading {args.drain} messages for the reference drain",
        lambda: load_mail(server, [user], args.drain, args.size, "ref"),
    )
    target = PushTarget.of(server, args.tls)
    done = subprocess.run(
        [node_binary(), str(SCRIPT), "drain", *node_args(target), "--user", user.name,
         "--pass", user.password],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        fail(f"reference drain exited {done.returncode}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["messages"] != args.drain:
        fail(f"the reference parsed {result['messages']} of {args.drain} messages")
    return result


STACKS = ("node", "sw")
ORDERS = {"both": [("node", "sw"), ("sw", "node")],
          "node-first": [("node", "sw")], "sw-first": [("sw", "node")]}  # fmt: skip


@dataclass
class StackRun:
    """One stack's samples and drains (one order, or several pooled)."""

    samples: list[Sample] = field(default_factory=list)
    drain_msgs: int = 0
    drain_wall_s: float = 0.0
    drain_cpu_s: float = 0.0

    def merge(self, other: StackRun) -> None:
        self.samples += other.samples
        self.drain_msgs += other.drain_msgs
        self.drain_wall_s += other.drain_wall_s
        self.drain_cpu_s += other.drain_cpu_s

    def overhead(self, pct: float) -> float:
        return percentile([s.overhead_s for s in self.samples], pct)

    def floor(self, pct: float) -> float:
        return percentile([s.floor_s for s in self.samples], pct)

    @property
    def drain_rate(self) -> float:
        return self.drain_msgs / self.drain_wall_s if self.drain_wall_s else math.nan

    @property
    def drain_cpu_ms(self) -> float:
        return 1000 * self.drain_cpu_s / self.drain_msgs if self.drain_msgs else math.nan


def latency_phase(stack: str, args: argparse.Namespace) -> list[Sample]:
    """One stack's push latency against a Dovecot of its own."""
    print(f"[{stack}] latency: {args.sessions} sessions, {args.samples} samples", flush=True)
    with contextlib.ExitStack() as es:
        server = es.enter_context(private_dovecot())
        if stack == "node":
            return node_latency(args, server, server.add_users(args.sessions, prefix="ref"))[0]
        redis_base = es.enter_context(private_redis())
        dsn = es.enter_context(throwaway_database())
        es.enter_context(bench_logs("reference", args.log_level))
        result = measure(args, dsn, redis_base, server)
        if result.missed:
            fail(f"{len(result.missed)} shardworker sample(s) saw no event: {result.missed[:3]}")
        return result.samples


def drain_phase(stack: str, args: argparse.Namespace, run: StackRun) -> None:
    """One stack's single-mailbox drain against a Dovecot of its own."""
    with contextlib.ExitStack() as es:
        server = es.enter_context(private_dovecot())
        if stack == "node":
            done = node_drain(args, server)
            run.drain_msgs += int(done["messages"])
            run.drain_wall_s += float(done["seconds"])
            run.drain_cpu_s += float(done["cpu_ms_per_msg"]) * int(done["messages"]) / 1000
            return
        redis_base = es.enter_context(private_redis())
        dsn = es.enter_context(throwaway_database())
        res = run_phase(args, Phase("single", 1, args.drain, 2), server, dsn, redis_base)
        run.drain_msgs += res.phase.total
        run.drain_wall_s += res.wall_s
        run.drain_cpu_s += res.cpu_s
    print(f"[{stack}] drain: {run.drain_rate:,.0f} msg/s", flush=True)


def run_order(order: tuple[str, ...], args: argparse.Namespace) -> dict[str, StackRun]:
    """Latency of each stack in this order, then the drains in the same order."""
    runs = {stack: StackRun() for stack in order}
    for stack in order:
        runs[stack].samples = latency_phase(stack, args)
    for stack in order:
        drain_phase(stack, args, runs[stack])
    return runs


def _pair(label: str, runs: dict[str, StackRun], value: Callable[[StackRun], float],
          fmt: Callable[[float], str]) -> tuple[str, str]:  # fmt: skip
    node = value(runs["node"])
    if "sw" not in runs:
        return label, f"node {fmt(node)}"
    ours = value(runs["sw"])
    return label, f"node {fmt(node)}  |  shardworker {fmt(ours)}  ({ours / node:.2f}x)"


def _rate(v: float) -> str:
    return f"{v:,.0f} msg/s"


def _cpu(v: float) -> str:
    return f"{v:.2f} ms"


def order_rows(label: str, runs: dict[str, StackRun]) -> list[tuple[str, str]]:
    return [
        (f"{label}: floor p50", _pair("", runs, lambda r: r.floor(50), ms)[1]),
        (f"{label}: overhead p50", _pair("", runs, lambda r: r.overhead(50), ms)[1]),
        (f"{label}: overhead p99", _pair("", runs, lambda r: r.overhead(99), ms)[1]),
        (f"{label}: overhead max", _pair("", runs, lambda r: r.overhead(100), ms)[1]),
        (f"{label}: drain rate", _pair("", runs, lambda r: r.drain_rate, _rate)[1]),
        (f"{label}: drain CPU/msg", _pair("", runs, lambda r: r.drain_cpu_ms, _cpu)[1]),
    ]


def report(args: argparse.Namespace, per_order: list[tuple[str, dict[str, StackRun]]],
           pooled: dict[str, StackRun]) -> None:  # fmt: skip
    rows = [
        ("sessions / samples", f"{args.sessions} IDLE ({'TLS' if args.tls else 'plain'}) / "
                               f"{args.samples} x ~{args.size} B per order and stack"),
        ("drain", f"1 mailbox x {args.drain}, per order and stack"),
        ("phases", "each against its own fresh Dovecot"),
    ]  # fmt: skip
    for label, runs in per_order:
        rows += order_rows(label, runs)
    if len(per_order) > 1:
        rows += order_rows("pooled", pooled)
    rows += [
        ("", "node: fetch + parse; shardworker: fetch + parse + publish + ledger"),
        ("", "drain CPU: the process(es) doing the work, all threads"),
        ("machine", machine_note()),
    ]
    print_table("reference (imapflow + mailparser) vs shardworker", rows)


def figures(pooled: dict[str, StackRun]) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    for stack in STACKS:
        run = pooled.get(stack)
        out[f"{stack}.overhead_p50_ms"] = None if run is None else 1000 * run.overhead(50)
        out[f"{stack}.overhead_p99_ms"] = None if run is None else 1000 * run.overhead(99)
        out[f"{stack}.drain_msgs_per_s"] = None if run is None else run.drain_rate
        out[f"{stack}.drain_cpu_ms_per_msg"] = None if run is None else run.drain_cpu_ms
    out = {k: v if v is None else round(v, 3) for k, v in out.items()}
    out["load1"] = load1()
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--drain", type=int, default=5000)
    parser.add_argument("--size", type=int, default=12_000)
    parser.add_argument("--batch", type=int, default=50, help="shardworker max_emails_per_sync")
    parser.add_argument("--gap", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--order", choices=sorted(ORDERS), default="both")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--node-only", action="store_true", help="skip the shardworker runs")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 x 20, drain 500")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.samples, args.drain = 50, 20, 500
    # What bench.ingest_latency.measure reads besides the shared options:
    args.folders, args.breakdown, args.set = args.sessions, False, None
    return args


def main() -> None:
    args = parse_args()
    node_binary()
    print(f"reference_compare: {args.sessions} sessions, drain {args.drain}, order "
          f"{args.order}; {machine_note()}")  # fmt: skip
    per_order: list[tuple[str, dict[str, StackRun]]] = []
    pooled: dict[str, StackRun] = {}
    for order in ORDERS[args.order]:
        stacks = tuple(s for s in order if s == "node" or not args.node_only)
        runs = run_order(stacks, args)
        per_order.append((f"{order[0]} first", runs))
        for stack, run in runs.items():
            pooled.setdefault(stack, StackRun()).merge(run)
    report(args, per_order, pooled)
    write_figures(args.json, figures(pooled))


if __name__ == "__main__":
    main()
