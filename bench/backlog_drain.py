"""Backlog drain: msgs/s through the whole pipeline (fetch, parse, publish, ledger).

    PYTHONPATH=. .venv/bin/python bench/backlog_drain.py [--mailboxes 20] [--per-mailbox 1000]
        [--single 5000] [--workers 2] [--size 12000] [--batch 50] [--tls] [--quick]
        [--json PATH]

Two phases, each with fresh engines and its own Redis database:

1. spread: ``--mailboxes`` x ``--per-mailbox`` messages (default 20 x 1,000 = 20,000),
   drained by ``--workers`` spawned worker processes (default 2, a pod's layout), the
   mailboxes dealt round-robin between them;
2. single: one mailbox with ``--single`` messages (default 5,000), one worker process.

The mail (~12 KB multipart text + html, quoted-printable) is loaded with MULTIAPPEND
first; then each provider's INBOX cursor is seeded at UID 0 (same UIDVALIDITY), so the
engine's first cycle finds the whole backlog above its cursor, exactly as after a
worker outage.  The clock runs from the moment every worker is built and told to go
until the last one has accounted its share.  CPU is the worker processes' own (all
threads), per message.  Afterwards the stream must hold exactly the expected
Message-IDs, once each, and the ledger one row per message; anything else fails the run.
``--json PATH`` writes spread.msgs_per_s, spread.cpu_ms_per_msg, single.msgs_per_s, load1.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import orjson
import psycopg
import redis

from bench.common import (
    STREAM,
    EngineRun,
    Figure,
    add_json_option,
    bench_logs,
    bench_settings,
    cpu_seconds,
    create_providers,
    fail,
    load1,
    machine_note,
    print_table,
    private_dovecot,
    private_redis,
    realistic_mail,
    run_with_progress,
    settings_env,
    tenant_configs,
    throwaway_database,
    write_figures,
)
from shardworker.config import load_settings
from shardworker.db.store import Store, open_pool
from tests.harness.dovecot import Dovecot, ImapUser

POLL_S = 0.005


@dataclass(frozen=True)
class Phase:
    name: str
    mailboxes: int
    per_mailbox: int
    redis_db: int

    @property
    def total(self) -> int:
        return self.mailboxes * self.per_mailbox


@dataclass
class DrainResult:
    phase: Phase
    wall_s: float  # update_providers → last XADD
    publish_s: float  # first XADD → last XADD
    cpu_s: float
    megabytes: float
    published: int
    workers: int = 1

    @property
    def msgs_per_s(self) -> float:
        return self.phase.total / self.wall_s

    @property
    def cpu_ms_per_msg(self) -> float:
        """CPU of the worker processes (all their threads), per message."""
        return 1000 * self.cpu_s / self.phase.total


def load_mail(
    server: Dovecot, users: list[ImapUser], per_mailbox: int, size: int, tag: str
) -> set[str]:
    """MULTIAPPEND the backlog; returns every Message-ID loaded."""
    expected: set[str] = set()
    rng = random.Random(tag)

    def messages(user: ImapUser) -> Iterator[bytes]:
        for i in range(per_mailbox):
            mid = f"<drain-{tag}-{user.name}-{i}@bench.example.com>"
            expected.add(mid.strip("<>"))
            yield realistic_mail(rng, mid, size)

    for user in users:
        server.append_many(user.name, "INBOX", messages(user))
    return expected


def seed_cursors(
    dsn: str, server: Dovecot, tenant: str, pids: list[str], users: list[ImapUser]
) -> None:
    """Cursor at UID 0 under the folder's real UIDVALIDITY: everything is backlog."""
    pool = open_pool(dsn, max_size=1)
    try:
        store = Store(pool)
        for pid, user in zip(pids, users, strict=True):
            validity = server.folder_status(user.name, "INBOX")["UIDVALIDITY"]
            store.reseed_folder(tenant, pid, "INBOX", validity, 0, None)
    finally:
        pool.close()


@dataclass(frozen=True)
class WorkerShare:
    """What one worker process of the pod drains: its providers of the phase."""

    index: int
    settings: dict[str, str]  # SHARDWORKER_* (the secret keys are made per driver run)
    tenant: str
    provider_ids: tuple[str, ...]
    total: int  # messages in those providers' mailboxes
    timeout_s: float
    log_level: str


@dataclass(frozen=True)
class WorkerDone:
    """A worker's report once its share is accounted and back in IDLE."""

    index: int
    done_at: float  # time.monotonic(): CLOCK_MONOTONIC is one clock for every process
    cpu_s: float  # this process's CPU from "go" to done
    megabytes: float
    published: int
    duplicates: int
    dead_lettered: int


def drain_worker(share: WorkerShare, go: Any, out: Any) -> None:
    """Runs in a spawned process, as one worker of the pod: an engine on its share.

    Reports ("ready",) once built, waits for ``go``, then serves its providers and reports
    a :class:`WorkerDone` once every message of its share is accounted.
    """
    with bench_logs(f"drain-w{share.index}", share.log_level):
        run = EngineRun(load_settings(share.settings))
        try:
            mine = set(share.provider_ids)
            configs = [c for c in tenant_configs(run.ctx, share.tenant) if c.provider_id in mine]
            out.put(("ready", share.index))
            if not go.wait(600):
                fail("no go signal within 600 s")
            cpu0 = cpu_seconds()
            run.serve(configs)
            done_at = _wait_accounted(run, share.total, share.timeout_s)
            cpu = cpu_seconds() - cpu0
            stats = run.engine.stats
            out.put(WorkerDone(share.index, done_at, cpu, stats.bytes / 1e6, stats.published,
                               stats.duplicates, stats.dead_lettered))  # fmt: skip
            run.wait_idle(len(configs), timeout_s=60)  # last batch committed, back in IDLE
        finally:
            run.stop()


def _wait_accounted(run: EngineRun, total: int, timeout_s: float) -> float:
    """Block until ``total`` messages are accounted; when (monotonic).

    The engine accounts a folder's messages when its cycle ends, i.e. after the last
    batch is committed, so this clock covers the whole drain, ledger included.
    """
    stats = run.engine.stats
    t0 = last_print = time.monotonic()
    while True:
        done = stats.published + stats.duplicates + stats.dead_lettered
        now = time.monotonic()
        if done >= total:
            return now
        if now - t0 > timeout_s:
            fail(
                f"only {done}/{total} messages after {timeout_s:.0f}s; errors {dict(stats.errors)}"
            )
        if now - last_print > 5:
            last_print = now
            print(f"  ... {done}/{total} accounted after {now - t0:.0f}s", flush=True)
        time.sleep(POLL_S)


def drain_pod(shares: list[WorkerShare]) -> tuple[float, list[WorkerDone]]:
    """One spawned process per share, started together; (wall s, each worker's report).

    The clock runs from the "go" signal (every engine built, providers loaded) until the
    last worker has accounted its share.
    """
    ctx = get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=drain_worker, args=(s, go, out), name=f"drain-w{s.index}")
             for s in shares]  # fmt: skip
    for proc in procs:
        proc.start()
    try:
        for _ in shares:
            _expect(out, procs, 120.0, "ready")
        t0 = time.monotonic()
        go.set()
        deadline = max(s.timeout_s for s in shares) + 60
        done = [_expect(out, procs, deadline, "done") for _ in shares]
        for proc in procs:
            proc.join(120)
            if proc.exitcode != 0:
                fail(f"worker {proc.name} exited with {proc.exitcode}")
        return max(d.done_at for d in done) - t0, done
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(10)


def _expect(out: Any, procs: list[Any], timeout_s: float, what: str) -> Any:
    """The next report of any worker; fails the run if a worker died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=1.0)
        except queue.Empty:
            dead = [p.name for p in procs if p.exitcode not in (None, 0)]
            if dead:
                fail(f"worker(s) {dead} died before reporting {what}")
    fail(f"no worker reported {what} within {timeout_s:.0f} s")
    return None


def _id_ms(entry_id: bytes) -> int:
    """A stream id's millisecond part: when Redis ran the XADD."""
    return int(entry_id.split(b"-")[0])


def verify(
    redis_url: str, dsn: str, tenant: str, expected: set[str], done: list[WorkerDone]
) -> float:
    """Exactly the expected Message-IDs in the stream, once each; one ledger row each.

    Returns the span from the first to the last XADD, from the stream ids (Redis time).
    """
    duplicates = sum(d.duplicates for d in done)
    dead_lettered = sum(d.dead_lettered for d in done)
    if duplicates or dead_lettered:
        fail(f"{duplicates} duplicates and {dead_lettered} dead letters")
    client = redis.Redis.from_url(redis_url)
    seen: list[str] = []
    first_ms: int | None = None
    last_ms = 0
    try:
        cursor = "-"
        while True:
            chunk: Any = client.xrange(STREAM, min=cursor, count=5000)
            if not chunk:
                break
            for _, fields in chunk:
                payload = orjson.loads(fields[b"payload_json"])
                seen.append(str(payload["emailData"]["id"]).strip("<>"))
            cursor = "(" + chunk[-1][0].decode()
            if first_ms is None:
                first_ms = _id_ms(chunk[0][0])
            last_ms = _id_ms(chunk[-1][0])
    finally:
        client.close()
    unique = set(seen)
    if len(seen) != len(expected) or unique != expected:
        fail(
            f"stream holds {len(seen)} events, {len(unique)} unique ids; expected "
            f"{len(expected)}; missing {len(expected - unique)}, "
            f"unexpected {len(unique - expected)}"
        )
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM shardworker_ledger WHERE tenant = %s AND status = 'published'",
            (tenant,),
        ).fetchone()
    if row is None or row[0] != len(expected):
        fail(f"ledger holds {row and row[0]} published rows, expected {len(expected)}")
    return (last_ms - (first_ms or last_ms)) / 1000


def run_phase(
    args: argparse.Namespace,
    phase: Phase,
    server: Dovecot,
    dsn: str,
    redis_base: str,
    *,
    workers: int = 1,
) -> DrainResult:
    """Load the phase's backlog, then drain it with ``workers`` worker processes (the
    providers dealt round-robin, as the leader's assignment spreads them)."""
    tag = f"{phase.name}-{secrets.token_hex(3)}"
    users = server.add_users(phase.mailboxes, prefix=f"{phase.name}-")
    expected = run_with_progress(
        f"[{phase.name}] loading {phase.total} messages into {phase.mailboxes} mailboxes",
        lambda: load_mail(server, users, phase.per_mailbox, args.size, tag),
    )
    redis_url = f"{redis_base}/{phase.redis_db}"
    settings = bench_settings(dsn, redis_url, str(server.cafile))
    tenant, pids = create_providers(settings, server, users, tls=args.tls, max_per_sync=args.batch)
    seed_cursors(dsn, server, tenant, pids, users)
    workers = max(1, min(workers, phase.mailboxes))
    shares = [
        WorkerShare(index=i, settings=settings_env(settings), tenant=tenant,
                    provider_ids=tuple(pids[i::workers]),
                    total=phase.per_mailbox * len(pids[i::workers]),
                    timeout_s=max(300.0, phase.total / 20), log_level=args.log_level)
        for i in range(workers)
    ]  # fmt: skip
    print(f"[{phase.name}] draining with {workers} worker process(es)", flush=True)
    wall, done = drain_pod(shares)
    publish = verify(redis_url, dsn, tenant, expected, done)
    print(f"[{phase.name}] verified: {len(expected)} unique Message-IDs in the stream and ledger")
    return DrainResult(
        phase, wall, publish, sum(d.cpu_s for d in done), sum(d.megabytes for d in done),
        sum(d.published for d in done), workers,
    )  # fmt: skip


def report(results: list[DrainResult], args: argparse.Namespace) -> None:
    rows = [("message size / batch", f"~{args.size} B multipart text+html / "
                                     f"max_emails_per_sync {args.batch}")]  # fmt: skip
    for res in results:
        p = res.phase
        rows += [
            (f"{p.name}: messages", f"{p.total} in {p.mailboxes} mailbox(es), "
                                    f"{res.megabytes:.0f} MB fetched, {res.workers} worker(s)"),
            (f"{p.name}: rate, whole drain", f"{res.msgs_per_s:,.0f} msg/s "
                                             f"({res.wall_s:.1f} s incl. connect)"),
            (f"{p.name}: rate, first→last XADD",
             f"{p.total / max(res.publish_s, 0.001):,.0f} msg/s"),
            (f"{p.name}: worker CPU", f"{res.cpu_ms_per_msg:.2f} ms/msg, "
                                      f"{100 * res.cpu_s / res.wall_s:.0f} % of one core"),
        ]  # fmt: skip
    rows.append(("target", "one pod (2 workers) ≥ 4,000 msg/s, ≤ 0.4 ms CPU per message"))
    rows.append(("machine", machine_note()))
    print_table("backlog drain: fetch + parse + publish + ledger", rows)


def figures(results: list[DrainResult]) -> dict[str, Figure]:
    out: dict[str, Figure] = {"spread.msgs_per_s": None, "spread.cpu_ms_per_msg": None,
                              "single.msgs_per_s": None}  # fmt: skip
    for res in results:
        out[f"{res.phase.name}.msgs_per_s"] = round(res.msgs_per_s, 1)
        if res.phase.name == "spread":
            out["spread.cpu_ms_per_msg"] = round(res.cpu_ms_per_msg, 4)
    out["load1"] = load1()
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=20)
    parser.add_argument("--per-mailbox", type=int, default=1000)
    parser.add_argument("--single", type=int, default=5000, help="messages in the 1-mailbox phase")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes of the spread phase (a pod: 2)")  # fmt: skip
    parser.add_argument("--size", type=int, default=12_000, help="message size in bytes")
    parser.add_argument("--batch", type=int, default=50, help="max_emails_per_sync")
    parser.add_argument("--tls", action="store_true", help="implicit TLS instead of plain")
    parser.add_argument("--log-level", default="INFO", help="service log level (to a file)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 x 250 and 1 x 500")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.mailboxes, args.per_mailbox, args.single = 4, 250, 500
    return args


def main() -> None:
    args = parse_args()
    phases = [(Phase("spread", args.mailboxes, args.per_mailbox, 1), args.workers)]
    if args.single:
        phases.append((Phase("single", 1, args.single, 2), 1))
    print(f"backlog_drain: {', '.join(f'{p.mailboxes} x {p.per_mailbox}' for p, _ in phases)}, "
          f"{args.workers} worker(s); {machine_note()}")  # fmt: skip
    results: list[DrainResult] = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(private_dovecot())
        redis_base = stack.enter_context(private_redis())
        dsn = stack.enter_context(throwaway_database())
        for phase, workers in phases:
            results.append(run_phase(args, phase, server, dsn, redis_base, workers=workers))
    report(results, args)
    write_figures(args.json, figures(results))


if __name__ == "__main__":
    main()
