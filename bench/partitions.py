"""Partition run: exactly-once while the network lies to one pod, and Redis fails over.

    PYTHONPATH=. nice .venv/bin/python bench/partitions.py [--mailboxes 300] [--cut-s 30]
        [--flap-for-s 60] [--faults redis_cut,postgres_cut,...] [--json PATH]

3 pods of ``shardworker run`` (2 workers each), each in its own network namespace
(tests/harness/netns.py), serve 300 mailboxes of a private Dovecot; PostgreSQL, Redis
(primary + replica + 3 Sentinels, reached through Sentinel) and Dovecot are private
instances at the topology's service address.  Mail is delivered throughout, and in turn:

  redis_cut       one pod cut off from Redis (and the Sentinels) for 30 s, then healed
  postgres_cut    one pod cut off from PostgreSQL for 30 s, then healed
  both_cut        one pod cut off from both, its IMAP sessions left open
  leader_cut      the leader's pod cut off from everything
  redis_failover  the replica misses the last 3 s of writes, the primary dies, the
                  Sentinels promote the replica
  flapping        one pod's links cut and healed every 2 s for 60 s
  flapping_leader the leader's pod's links cut and healed every 2 s for 60 s
  flapping_slow   one pod's links cut and healed every 7 s (past the lease TTL) for 60 s

Per fault: Message-ID accounting on ``workflow:events:global`` and on the pointer queue
(lost, duplicated), what a consumer tailing the stream read twice, the time until every
provider is served again, and the cut-off pod's log lines that would show a publish after
it had given up a lease.  Exit status 1 when anything is lost, duplicated or stale.
Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import orjson

from bench.partition_support.report import as_json, format_table
from bench.partition_support.run import Plan, faults, run_partitions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=300)
    parser.add_argument("--per-mailbox", type=int, default=1, help="messages per fault")
    parser.add_argument("--cut-s", type=float, default=30.0)
    parser.add_argument("--flap-for-s", type=float, default=60.0)
    parser.add_argument("--faults", default=",".join(faults(30, 60)))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep-logs", type=Path, help="copy the pods' logs here")
    args = parser.parse_args(argv)
    known = faults(args.cut_s, args.flap_for_s)
    wanted = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in known]
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; known: {sorted(known)}")
    plan = Plan([known[f] for f in wanted], mailboxes=args.mailboxes,
                per_mailbox=args.per_mailbox, seed=args.seed)  # fmt: skip
    log_dir = Path(tempfile.mkdtemp(prefix="sw-partitions-"))
    try:
        report = run_partitions(plan, log_dir)
        if args.keep_logs:
            shutil.copytree(log_dir, args.keep_logs, dirs_exist_ok=True)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    print(format_table(report))
    if args.json:
        args.json.write_bytes(orjson.dumps(as_json(report), option=orjson.OPT_INDENT_2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
