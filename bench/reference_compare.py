"""The reference pipeline (imapflow + mailparser on Node) next to shardworker, one run.

    PYTHONPATH=. .venv/bin/python bench/reference_compare.py [--sessions 500] [--samples 300]
        [--drain 5000] [--size 12000] [--tls] [--quick] [--node-only]

Needs `npm ci` in bench/reference once.  Against one private Dovecot, in turn:

1. push latency at ``--sessions`` IDLE sessions, fetch + parse only: Node's
   bench/reference/reference.mjs holds the sessions and prints when each new message is
   parsed; the same bare-IDLE probe as bench/ingest_latency.py measures the floor, and
   overhead = t_parsed - t_exists(bare) for the same message (both CLOCK_MONOTONIC);
2. the same for shardworker's engine (publishing included) at the same session count;
3. drain of ``--drain`` messages from one mailbox: Node fetch + parse only, then
   shardworker with publishing and ledger (bench/backlog_drain.py's single phase).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.backlog_drain import DrainResult, Phase, load_mail, run_phase
from bench.common import (
    SAMPLE_TIMEOUT_S,
    PushTarget,
    Sample,
    bench_logs,
    fail,
    machine_note,
    ms,
    percentile,
    print_table,
    private_dovecot,
    private_redis,
    push_sample,
    run_with_progress,
    throwaway_database,
)
from bench.ingest_latency import LatencyResult, measure
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


def _pair(
    label: str, node: float, ours: float | None, fmt: Callable[[float], str]
) -> tuple[str, str]:
    if ours is None:
        return label, f"node {fmt(node)}"
    return label, f"node {fmt(node)}  |  shardworker {fmt(ours)}  ({ours / node:.2f}x)"


def report(
    args: argparse.Namespace,
    node_samples: list[Sample],
    ours_latency: LatencyResult | None,
    node_drained: dict[str, Any],
    ours_drain: DrainResult | None,
) -> None:
    def over(samples: list[Sample], pct: float) -> float:
        return percentile([s.overhead_s for s in samples], pct)

    def floor(samples: list[Sample], pct: float) -> float:
        return percentile([s.floor_s for s in samples], pct)

    ours = ours_latency.samples if ours_latency is not None else None

    def mine(fn: Callable[[list[Sample], float], float], pct: float) -> float | None:
        return None if ours is None else fn(ours, pct)

    rows = [
        ("sessions / samples", f"{args.sessions} IDLE ({'TLS' if args.tls else 'plain'}) / "
                               f"{args.samples} x ~{args.size} B"),
        _pair("floor p50", floor(node_samples, 50), mine(floor, 50), ms),
        _pair("overhead p50", over(node_samples, 50), mine(over, 50), ms),
        _pair("overhead p99", over(node_samples, 99), mine(over, 99), ms),
        _pair("overhead max", over(node_samples, 100), mine(over, 100), ms),
        ("", "node: fetch + parse; shardworker: fetch + parse + publish + ledger"),
        _pair(f"drain, 1 mailbox x {args.drain}", node_drained["rate"],
              None if ours_drain is None else ours_drain.phase.total / ours_drain.wall_s,
              lambda v: f"{v:,.0f} msg/s"),
        _pair("drain CPU per message", node_drained["cpu_ms_per_msg"],
              None if ours_drain is None else 1000 * ours_drain.cpu_s / ours_drain.phase.total,
              lambda v: f"{v:.2f} ms"),
        ("machine", machine_note()),
    ]  # fmt: skip
    print_table("reference (imapflow + mailparser) vs shardworker", rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--drain", type=int, default=5000)
    parser.add_argument("--size", type=int, default=12_000)
    parser.add_argument("--batch", type=int, default=50, help="shardworker max_emails_per_sync")
    parser.add_argument("--gap", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--node-only", action="store_true", help="skip the shardworker runs")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 x 20, drain 500")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.samples, args.drain = 50, 20, 500
    # What bench.ingest_latency.measure reads besides the shared options:
    args.folders, args.breakdown, args.set = args.sessions, False, None
    return args


def main() -> None:
    args = parse_args()
    node_binary()
    print(f"reference_compare: {args.sessions} sessions, drain {args.drain}; {machine_note()}")
    ours_latency: LatencyResult | None = None
    ours_drain: DrainResult | None = None
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(private_dovecot())
        redis_base = stack.enter_context(private_redis())
        dsn = stack.enter_context(throwaway_database())
        stack.enter_context(bench_logs("reference", args.log_level))
        users = server.add_users(args.sessions, prefix="ref")
        print(f"node latency: {args.sessions} sessions, {args.samples} samples")
        node_samples, _ = node_latency(args, server, users)
        if not args.node_only:
            print(f"shardworker latency: {args.sessions} folders, {args.samples} samples")
            ours_latency = measure(args, dsn, redis_base, server)
        node_drained = node_drain(args, server)
        print(f"  node drain: {node_drained['rate']:,.0f} msg/s")
        if not args.node_only:
            ours_drain = run_phase(args, Phase("single", 1, args.drain, 2), server, dsn, redis_base)
        report(args, node_samples, ours_latency, node_drained, ours_drain)


if __name__ == "__main__":
    main()
