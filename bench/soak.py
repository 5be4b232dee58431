"""Soak: 10,000 IDLE folders for an hour with a trickle of mail; RSS growth, missed pushes.

    PYTHONPATH=. .venv/bin/python bench/soak.py [--folders 10000] [--duration 3600]
        [--trickle-every 2] [--workers 2] [--warmup 120] [--sample-every 30]

One pod (``shardworker run``, ``--workers`` worker processes, production settings) serves
``--folders`` providers, one INBOX each, on a private Dovecot.  Once every folder is
leased, synced and IDLE and ``--warmup`` seconds have passed, the RSS of the pod's
processes is taken (the start), then every ``--sample-every`` seconds until
``--duration`` is over (the end).  Meanwhile one message is appended to a random mailbox
every ``--trickle-every`` seconds; each must be published (found in the stream by its
Message-ID).  A push counts as missed when its message is not published within
``MISSED_AFTER_S`` (the IDLE push floor is 0.5 s; a message found only by the IDLE refresh
or a reconnect shows up as a late one).  Goal: RSS growth < 5 %, no missed push.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from bench.chaos_support.account import StreamReader, percentile
from bench.common import (
    bench_settings,
    create_providers,
    machine_note,
    print_table,
    private_redis,
    throwaway_database,
)
from tests.harness.dovecot import Dovecot
from tests.pool_support import Pod
from tests.support import make_mail

MISSED_AFTER_S = 10.0
# 10,000 sessions is exactly 100 imap processes x 100 clients: room for the trickle too.
DOVECOT_EXTRA = "service imap {\n  process_limit = 120\n}\n"


@dataclass
class Sample:
    at_s: float
    rss_kib: dict[int, int]  # pid → VmRSS

    @property
    def total(self) -> int:
        return sum(self.rss_kib.values())


@dataclass
class Trickle:
    sent_ms: dict[str, int] = field(default_factory=dict)
    failed: int = 0


# ------------------------------------------------------------------------------ pod


def pod_pids(pod: Pod) -> list[int]:
    """The coordinator and its children (worker processes), alive now."""
    assert pod.proc is not None
    root = pod.proc.pid
    pids = [root]
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{root}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def sample(pod: Pod, t0: float) -> Sample:
    return Sample(time.monotonic() - t0, {pid: rss_kib(pid) for pid in pod_pids(pod)})


def wait_ready(client: redis.Redis, dsn: str, tenant: str, folders: int, timeout_s: float) -> float:
    """Every provider leased and its INBOX cursor recorded; seconds taken."""
    started = time.monotonic()
    last = started
    while True:
        leased = sum(1 for _ in client.scan_iter(match=f"sw:lease:{tenant}:*", count=5000))
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM imap_email_provider_config "
                "WHERE tenant = %s AND folder_state ? 'INBOX'",
                (tenant,),
            ).fetchone()
        cursors = int(row[0]) if row else 0
        now = time.monotonic()
        if leased >= folders and cursors >= folders:
            return now - started
        if now - started > timeout_s:
            raise SystemExit(
                f"not ready after {timeout_s:.0f} s: {leased} leased, {cursors} synced"
            )
        if now - last > 15:
            last = now
            print(
                f"  ... {leased} leased, {cursors} synced after {now - started:.0f} s", flush=True
            )
        time.sleep(2)


# -------------------------------------------------------------------------- trickle


def trickle(
    server: Dovecot, users: list[str], every_s: float, stop: threading.Event, out: Trickle
) -> None:
    rng = random.Random(7)
    tag = secrets.token_hex(3)
    n = 0
    while not stop.wait(every_s):
        mid = f"soak-{tag}-{n}@example.com"
        n += 1
        try:
            server.append(rng.choice(users), "INBOX", make_mail(message_id=f"<{mid}>"))
        except Exception:
            out.failed += 1
            continue
        out.sent_ms[mid] = int(time.time() * 1000)
        server.close_admin_sessions()  # one admin session at a time, not thousands


# --------------------------------------------------------------------------- report


@dataclass
class SoakRun:
    samples: list[Sample]
    trickled: Trickle
    reader: StreamReader
    ready_s: float
    soaked_s: float


def report(args: argparse.Namespace, run: SoakRun) -> bool:
    first: dict[str, int] = {}
    for ms, mid in run.reader.entries:
        first.setdefault(mid, ms)
    sent = run.trickled.sent_ms
    delays = sorted(first[m] - at for m, at in sent.items() if m in first)
    unpublished = [m for m in sent if m not in first]
    late = sum(1 for d in delays if d > MISSED_AFTER_S * 1000)
    start, end = run.samples[0], run.samples[-1]
    growth = 100 * (end.total - start.total) / start.total
    peak = max(s.total for s in run.samples)
    short = "" if run.soaked_s >= args.duration - 1 else " (cut short)"
    delay = (f"p50 {percentile(delays, 50)} ms, p99 {percentile(delays, 99)} ms, "
             f"max {max(delays, default=0)} ms")  # fmt: skip
    rows = [
        ("folders / workers", f"{args.folders} IDLE INBOXes, 1 pod x {args.workers} workers"),
        ("ready (leased + synced)", f"{run.ready_s:.0f} s"),
        ("soaked", f"{run.soaked_s:.0f} s of {args.duration:.0f} s planned{short}"),
        ("RSS start (pod total)", f"{start.total / 1024:.1f} MiB  {_per_pid(start)}"),
        ("RSS end (pod total)", f"{end.total / 1024:.1f} MiB  {_per_pid(end)}"),
        ("RSS growth", f"{growth:+.2f} % (goal < 5 %); peak {peak / 1024:.1f} MiB"),
        ("trickled", f"{len(sent)} messages ({run.trickled.failed} APPENDs failed)"),
        ("published", f"{len(delays)}; not published: {len(unpublished)}"),
        ("missed pushes", f"{late + len(unpublished)} (late > {MISSED_AFTER_S:.0f} s: {late})"),
        ("push delay APPEND→XADD", delay),
        ("machine", machine_note()),
    ]
    print_table("soak: IDLE folders over time", rows)
    return growth < 5 and not unpublished and late == 0


def _per_pid(s: Sample) -> str:
    return (
        "(" + ", ".join(f"{pid}: {kib / 1024:.0f}" for pid, kib in sorted(s.rss_kib.items())) + ")"
    )


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=3600.0, help="soak seconds")
    parser.add_argument("--trickle-every", type=float, default=2.0, help="seconds per message")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before the start RSS")
    parser.add_argument("--sample-every", type=float, default=30.0)
    return parser.parse_args()


def soak(args: argparse.Namespace, stack: contextlib.ExitStack) -> bool:
    server = stack.enter_context(Dovecot(extra_conf=DOVECOT_EXTRA))
    redis_url = stack.enter_context(private_redis()) + "/0"
    dsn = stack.enter_context(throwaway_database())
    settings = bench_settings(dsn, redis_url, str(server.cafile), workers=str(args.workers),
                              metrics_addr="127.0.0.1:0")  # fmt: skip
    users = server.add_users(args.folders, prefix="soak")
    print(f"creating {args.folders} providers ...", flush=True)
    tenant, _ = create_providers(settings, server, users, tls=False)
    log_dir = Path(tempfile.mkdtemp(prefix="sw-soak-"))
    pod = Pod(f"soak-{uuid.uuid4().hex[:6]}", settings, log_dir / "pod.log")
    pod.start()
    stack.callback(pod.stop)
    client = redis.Redis.from_url(redis_url)
    stack.callback(client.close)
    ready_s = wait_ready(client, dsn, tenant, args.folders, timeout_s=900)
    print(f"all {args.folders} folders leased and synced in {ready_s:.0f} s; warming up "
          f"{args.warmup:.0f} s (pod log {pod.log_path})", flush=True)  # fmt: skip
    out, stop = Trickle(), threading.Event()
    names = [u.name for u in users]
    feeder = threading.Thread(
        target=trickle, args=(server, names, args.trickle_every, stop, out), daemon=True
    )
    feeder.start()
    stack.callback(stop.set)
    reader = StreamReader(client)
    time.sleep(args.warmup)
    samples, t0 = _soak_loop(args, pod, reader)
    soaked_s = time.monotonic() - t0
    stop.set()
    feeder.join(30)
    time.sleep(MISSED_AFTER_S)  # the last message's push
    reader.poll()
    ok = report(args, SoakRun(samples, out, reader, ready_s, soaked_s))
    if ok:
        stack.callback(shutil.rmtree, log_dir, True)  # after the pod has stopped
    else:
        print(f"pod log kept in {log_dir}", file=sys.stderr)
    return ok


def _soak_loop(
    args: argparse.Namespace, pod: Pod, reader: StreamReader
) -> tuple[list[Sample], float]:
    t0 = time.monotonic()
    samples = [sample(pod, t0)]
    print(f"start RSS {samples[0].total / 1024:.1f} MiB over {len(samples[0].rss_kib)} processes",
          flush=True)  # fmt: skip
    while time.monotonic() - t0 < args.duration:
        time.sleep(min(args.sample_every, max(0.0, args.duration - (time.monotonic() - t0))))
        if not pod.alive:
            print("the pod exited: the soak is cut short", file=sys.stderr)
            break
        reader.poll()
        samples.append(sample(pod, t0))
        s = samples[-1]
        print(f"  ... {s.at_s:5.0f} s: RSS {s.total / 1024:.1f} MiB, published "
              f"{len(reader.entries)}", flush=True)  # fmt: skip
    return samples, t0


def main() -> int:
    args = parse_args()
    print(f"soak: {args.folders} folders, {args.duration:.0f} s, one message every "
          f"{args.trickle_every:g} s; {machine_note()}", flush=True)  # fmt: skip
    with contextlib.ExitStack() as stack:
        ok = soak(args, stack)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
