"""Backlog drain: msgs/s through the whole pipeline (fetch, parse, publish, ledger).

    PYTHONPATH=. .venv/bin/python bench/backlog_drain.py [--mailboxes 20] [--per-mailbox 1000]
        [--single 5000] [--size 12000] [--batch 50] [--tls] [--quick]

Two phases, each with a fresh engine in this process and its own Redis database:

1. ``--mailboxes`` x ``--per-mailbox`` messages (default 20 x 1,000 = 20,000);
2. one mailbox with ``--single`` messages (default 5,000).

The mail (~12 KB multipart text + html, quoted-printable) is loaded with MULTIAPPEND
first; then each provider's INBOX cursor is seeded at UID 0 (same UIDVALIDITY), so the
engine's first cycle finds the whole backlog above its cursor, exactly as after a
worker outage.  The clock runs from ``update_providers`` to the last XADD.  Afterwards
the stream must hold exactly the expected Message-IDs, once each, and the ledger one
row per message; anything else fails the run.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
import redis

from bench.common import (
    STREAM,
    EngineRun,
    bench_logs,
    bench_settings,
    cpu_seconds,
    create_providers,
    fail,
    machine_note,
    print_table,
    private_dovecot,
    private_redis,
    realistic_mail,
    run_with_progress,
    tenant_configs,
    throwaway_database,
)
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


def drain(run: EngineRun, tenant: str, total: int, timeout_s: float) -> tuple[float, float]:
    """Serve the providers; (wall s, CPU s) once all ``total`` messages are accounted.

    The engine accounts a folder's messages when its cycle ends, i.e. after the last
    batch is committed, so this clock covers the whole drain, ledger included.
    """
    stats = run.engine.stats
    configs = tenant_configs(run.ctx, tenant)
    cpu0 = cpu_seconds()
    t0 = time.monotonic()
    run.serve(configs)
    last_print = t0
    while True:
        done = stats.published + stats.duplicates + stats.dead_lettered
        now = time.monotonic()
        if done >= total:
            return now - t0, cpu_seconds() - cpu0
        if now - t0 > timeout_s:
            fail(
                f"only {done}/{total} messages after {timeout_s:.0f}s; errors {dict(stats.errors)}"
            )
        if now - last_print > 5:
            last_print = now
            print(f"  ... {done}/{total} accounted after {now - t0:.0f}s", flush=True)
        time.sleep(POLL_S)


def _id_ms(entry_id: bytes) -> int:
    """A stream id's millisecond part: when Redis ran the XADD."""
    return int(entry_id.split(b"-")[0])


def verify(redis_url: str, dsn: str, tenant: str, expected: set[str], run: EngineRun) -> float:
    """Exactly the expected Message-IDs in the stream, once each; one ledger row each.

    Returns the span from the first to the last XADD, from the stream ids (Redis time).
    """
    stats = run.engine.stats
    if stats.duplicates or stats.dead_lettered:
        fail(f"{stats.duplicates} duplicates and {stats.dead_lettered} dead letters")
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
    args: argparse.Namespace, phase: Phase, server: Dovecot, dsn: str, redis_base: str
) -> DrainResult:
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
    run = EngineRun(settings)
    try:
        wall, cpu = drain(run, tenant, phase.total, timeout_s=max(300.0, phase.total / 20))
        megabytes = run.engine.stats.bytes / 1e6
        published = run.engine.stats.published
        run.wait_idle(phase.mailboxes, timeout_s=60)  # last batch committed, back in IDLE
        publish = verify(redis_url, dsn, tenant, expected, run)
    finally:
        run.stop()
    print(f"[{phase.name}] verified: {len(expected)} unique Message-IDs in the stream and ledger")
    return DrainResult(phase, wall, publish, cpu, megabytes, published)


def report(results: list[DrainResult], args: argparse.Namespace) -> None:
    rows = [("message size / batch", f"~{args.size} B multipart text+html / "
                                     f"max_emails_per_sync {args.batch}")]  # fmt: skip
    for res in results:
        p = res.phase
        rows += [
            (f"{p.name}: messages", f"{p.total} in {p.mailboxes} mailbox(es), "
                                    f"{res.megabytes:.0f} MB fetched"),
            (f"{p.name}: rate, whole drain", f"{p.total / res.wall_s:,.0f} msg/s "
                                             f"({res.wall_s:.1f} s incl. connect)"),
            (f"{p.name}: rate, first→last XADD",
             f"{p.total / max(res.publish_s, 0.001):,.0f} msg/s"),
            (f"{p.name}: engine CPU", f"{1000 * res.cpu_s / p.total:.2f} ms/msg, "
                                      f"{100 * res.cpu_s / res.wall_s:.0f} % of one core"),
        ]  # fmt: skip
    rows.append(("target", "≥ 2,000 msg/s (20 mailboxes, one process for now)"))
    rows.append(("machine", machine_note()))
    print_table("backlog drain: fetch + parse + publish + ledger, one process", rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=20)
    parser.add_argument("--per-mailbox", type=int, default=1000)
    parser.add_argument("--single", type=int, default=5000, help="messages in the 1-mailbox phase")
    parser.add_argument("--size", type=int, default=12_000, help="message size in bytes")
    parser.add_argument("--batch", type=int, default=50, help="max_emails_per_sync")
    parser.add_argument("--tls", action="store_true", help="implicit TLS instead of plain")
    parser.add_argument("--log-level", default="INFO", help="service log level (to a file)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 x 250 and 1 x 500")
    args = parser.parse_args()
    if args.quick:
        args.mailboxes, args.per_mailbox, args.single = 4, 250, 500
    return args


def main() -> None:
    args = parse_args()
    phases = [Phase("spread", args.mailboxes, args.per_mailbox, 1)]
    if args.single:
        phases.append(Phase("single", 1, args.single, 2))
    print(f"backlog_drain: {', '.join(f'{p.mailboxes} x {p.per_mailbox}' for p in phases)}; "
          f"{machine_note()}")  # fmt: skip
    results: list[DrainResult] = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(private_dovecot())
        redis_base = stack.enter_context(private_redis())
        dsn = stack.enter_context(throwaway_database())
        stack.enter_context(bench_logs("drain", args.log_level))
        for phase in phases:
            results.append(run_phase(args, phase, server, dsn, redis_base))
    report(results, args)


if __name__ == "__main__":
    main()
