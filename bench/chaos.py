"""Chaos run: nothing lost, nothing duplicated while processes, servers and links fail.

    PYTHONPATH=. .venv/bin/python bench/chaos.py [--mailboxes 500] [--messages 10000]
        [--pods 3] [--rate 40] [--seed 1] [--quick]

10,000 messages are delivered over 500 mailboxes of a private Dovecot while 3 pods of
``shardworker run`` (2 workers each) serve them through a fault-injecting TCP proxy.
Redis is a private ``redis-server`` with AOF (``appendfsync always``); PostgreSQL is a
throwaway cluster started here.  Faults (bench/chaos_support/faults.py): a worker or a
whole pod SIGKILLed every 5-10 s and restarted, a worker SIGSTOPped past its lease then
resumed, Dovecot crashed and restarted, Redis SIGKILLed and restarted on its AOF,
PostgreSQL restarted (immediate mode), and proxy cuts, a black hole, a drop and a delay
between the workers and Dovecot.

Accounting: every delivered Message-ID must appear in ``workflow:events:global`` exactly
once.  Prints delivered, published, lost, duplicated, and the APPEND→XADD delay (p50,
p99, max).  Exit status 1 when anything is lost or duplicated.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

from bench.chaos_support.faults import ONE_OFFS
from bench.chaos_support.report import format_report
from bench.chaos_support.run import ChaosPlan, ChaosServers, run_chaos
from bench.chaos_support.servers import AofRedis, PgCluster
from shardworker.db.migrate import migrate
from tests.harness.dovecot import Dovecot


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=500)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--pods", type=int, default=3)
    parser.add_argument("--rate", type=float, default=40.0, help="deliveries per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-logs", action="store_true", help="keep pod logs on success")
    parser.add_argument("--quick", action="store_true", help="smoke run: 60 x 10 messages")
    args = parser.parse_args()
    if args.quick:
        args.mailboxes, args.messages, args.rate = 60, 600, 10.0
    return args


def main() -> int:
    args = parse_args()
    plan = ChaosPlan(mailboxes=args.mailboxes, messages=args.messages, pods=args.pods,
                     rate_per_s=args.rate, one_offs=ONE_OFFS, seed=args.seed)  # fmt: skip
    log_dir = Path(tempfile.mkdtemp(prefix="sw-chaos-logs-"))
    ok = False
    with contextlib.ExitStack() as stack:
        dovecot = stack.enter_context(Dovecot())
        redis_server = AofRedis()
        stack.callback(redis_server.close)
        redis_server.start()
        pg = PgCluster()
        stack.callback(pg.close)
        pg.start()
        dsn = pg.create_database("chaos")
        migrate(dsn)
        print(f"servers: Dovecot :{dovecot.plain_port}, redis-server :{redis_server.port} "
              f"(AOF, appendfsync always), PostgreSQL :{pg.port} (fsync=off); "
              f"pod logs in {log_dir}", flush=True)  # fmt: skip
        report = run_chaos(plan, ChaosServers(dovecot, redis_server, dsn, pg, log_dir),
                           progress=lambda m: print(m, flush=True))  # fmt: skip
        print()
        print(format_report(report), flush=True)
        a = report.accounting
        complete = a.delivered == plan.per_mailbox * plan.mailboxes
        faults_ok = not any(e.error for e in report.faults.events)
        ok = complete and faults_ok and a.lost == 0 and a.duplicated == 0
    if ok and not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    elif not ok:
        print(f"\nCHAOS RUN FAILED; pod logs kept in {log_dir}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
