"""Redis footprint: what shardworker keeps in Redis per message, before and after consumption.

    PYTHONPATH=. .venv/bin/python bench/redis_footprint.py [--mailboxes 20] [--per-mailbox 1000]
        [--size 6000] [--batch 50] [--json PATH] [--quick]

``--mailboxes`` x ``--per-mailbox`` messages (default 20,000) through the real engine (fetch,
parse, publish, ledger, settle) from a private Dovecot into a private Redis, while a consumer
group (``workflow-runtime-v2``, the backpressure group) reads and acknowledges them and a
pointer consumer pops the pointer queue as Alga's claim does.  The leader's housekeeping
(``sink/housekeeping.py``) runs every second, as the leader's round would.

Prints (and writes to ``--json``): Redis ``used_memory`` before, at the peak and after the
consumer caught up; bytes per message retained after consumption, by kind (``MEMORY USAGE``
of every shardworker key: exact, not sampled); the stream length after trimming.  The run
fails unless every Message-ID was read exactly once.  Target: ≤ 100 bytes/message retained.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import redis

from bench.backlog_drain import drain, load_mail, seed_cursors
from bench.common import (
    STREAM,
    EngineRun,
    bench_logs,
    bench_settings,
    create_providers,
    fail,
    machine_note,
    print_table,
    private_dovecot,
    private_redis,
    run_with_progress,
    throwaway_database,
)
from shardworker.config import Settings
from shardworker.sink.housekeeping import Housekeeper
from shardworker.sink.redis_streams import POINTER_QUEUE, dlq_bytes_key

GROUP = "workflow-runtime-v2"


class Consumers(threading.Thread):
    """The consumer group reading the stream, and Alga's pointer claim popping the queue."""

    def __init__(self, url: str) -> None:
        super().__init__(name="consumer", daemon=True)
        self.client = redis.Redis.from_url(url)
        self.read: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            got: Any = self.client.xreadgroup(GROUP, "bench", {STREAM: ">"}, count=500, block=100)
            for _, entries in got or ():
                for _, fields in entries:
                    payload = orjson.loads(fields[b"payload_json"])
                    self.read[str(payload["emailData"]["id"]).strip("<>")] += 1
                self.client.xack(STREAM, GROUP, *[e[0] for e in entries])
            with self.client.pipeline(transaction=False) as pipe:
                for _ in range(500):
                    pipe.rpop(POINTER_QUEUE)
                pipe.execute()


class Sampler(threading.Thread):
    """Peak used_memory, and the leader's housekeeping once a second."""

    def __init__(self, client: redis.Redis, keeper: Housekeeper) -> None:
        super().__init__(name="sampler", daemon=True)
        self.client, self.keeper = client, keeper
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        last = 0.0
        while not self.stop.wait(0.1):
            self.peak = max(self.peak, int(self.client.info("memory")["used_memory"]))
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                self.keeper.run()


def retained_by_kind(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """MEMORY USAGE of every key shardworker writes, summed by kind (exact: full scan)."""
    kinds = Counter({"stream": 0, "dedupe": 0, "dlq": 0, "pointer_queue": 0, "other": 0})
    dlq = {settings.dlq_stream, dlq_bytes_key(settings.dlq_stream)}
    for raw in client.scan_iter(count=1000):
        key = raw.decode()
        size = int(client.memory_usage(key, samples=0) or 0)
        if key == STREAM:
            kinds["stream"] += size
        elif key.startswith(("sw:pub:", "sw:mid:")):
            kinds["dedupe"] += size
        elif key in dlq:
            kinds["dlq"] += size
        elif key == POINTER_QUEUE:
            kinds["pointer_queue"] += size
        else:
            kinds["other"] += size  # leases, fences of this run: not per message
    return dict(kinds)


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def dataset_memory(client: redis.Redis) -> int:
    """used_memory minus Redis's own overhead (client buffers, script cache, allocator)."""
    return int(client.info("memory")["used_memory_dataset"])


def measure(args: argparse.Namespace, server: Any, dsn: str, redis_base: str) -> dict[str, Any]:
    tag = f"fp-{secrets.token_hex(3)}"
    users = server.add_users(args.mailboxes, prefix="fp-")
    total = args.mailboxes * args.per_mailbox
    expected = run_with_progress(
        f"loading {total} messages into {args.mailboxes} mailboxes",
        lambda: load_mail(server, users, args.per_mailbox, args.size, tag),
    )
    url = f"{redis_base}/1"
    settings = bench_settings(dsn, url, str(server.cafile), housekeeping_s="1")
    client = redis.Redis.from_url(url)
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    tenant, pids = create_providers(settings, server, users, tls=False, max_per_sync=args.batch)
    seed_cursors(dsn, server, tenant, pids, users)
    before, dataset_before = used_memory(client), dataset_memory(client)
    consumers, sampler = Consumers(url), Sampler(client, Housekeeper(client, settings))
    consumers.start()
    sampler.start()
    run = EngineRun(settings)
    try:
        wall, _ = drain(run, tenant, total, timeout_s=max(600.0, total / 10))
        run.wait_idle(args.mailboxes, timeout_s=120)
        deadline = time.monotonic() + 120
        while sum(consumers.read.values()) < total and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # one more housekeeping round after the last read
    finally:
        run.stop()
        consumers.stop.set()
        sampler.stop.set()
        consumers.join(10)
        sampler.join(10)
    Housekeeper(client, settings).run()
    if set(consumers.read) != expected or any(n != 1 for n in consumers.read.values()):
        fail(f"read {sum(consumers.read.values())} events, {len(consumers.read)} unique; "
             f"expected {len(expected)} once each")  # fmt: skip
    after, dataset_after = used_memory(client), dataset_memory(client)
    by_kind = retained_by_kind(client, settings)
    per_message = {k: v / total for k, v in by_kind.items()}
    return {
        "messages": total,
        "message_bytes": args.size,
        "drain_s": round(wall, 1),
        "used_memory_before": before,
        "used_memory_peak": max(sampler.peak, after),
        "used_memory_after": after,
        "used_memory_growth_per_message": round((after - before) / total, 1),
        "dataset_growth_per_message": round((dataset_after - dataset_before) / total, 1),
        "retained_bytes_by_kind": by_kind,
        "retained_bytes_per_message_by_kind": {k: round(v, 2) for k, v in per_message.items()},
        "retained_bytes_per_message": round(sum(per_message.values()) - per_message["other"], 2),
        "stream_length_after_trim": int(client.xlen(STREAM)),
        "read_once": len(consumers.read),
        "target_bytes_per_message": 100,
        "machine": machine_note(),
    }


def report(figures: dict[str, Any]) -> None:
    mib = 1024 * 1024
    rows = [
        ("messages", f"{figures['messages']} (~{figures['message_bytes']} B each), "
                     f"drained in {figures['drain_s']} s"),
        ("used_memory before / peak / after",
         f"{figures['used_memory_before'] / mib:.1f} / {figures['used_memory_peak'] / mib:.1f} "
         f"/ {figures['used_memory_after'] / mib:.1f} MiB"),
        ("used_memory growth per message", f"{figures['used_memory_growth_per_message']} B "
                                           f"(dataset: {figures['dataset_growth_per_message']} B)"),
    ]  # fmt: skip
    for kind, value in figures["retained_bytes_per_message_by_kind"].items():
        rows.append((f"retained per message: {kind}", f"{value} B"))
    rows += [
        ("retained per message (stream+dedupe+dlq+queue)",
         f"{figures['retained_bytes_per_message']} B (target ≤ 100)"),
        ("stream length after trimming", str(figures["stream_length_after_trim"])),
        ("read exactly once", f"{figures['read_once']} Message-IDs"),
        ("machine", figures["machine"]),
    ]  # fmt: skip
    print_table("Redis footprint with a healthy consumer group", rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=20)
    parser.add_argument("--per-mailbox", type=int, default=1000)
    parser.add_argument("--size", type=int, default=6000, help="message size in bytes")
    parser.add_argument("--batch", type=int, default=50, help="max_emails_per_sync")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--log-level", default="INFO", help="service log level (to a file)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 x 250")
    args = parser.parse_args()
    if args.quick:
        args.mailboxes, args.per_mailbox = 4, 250
    return args


def main() -> None:
    args = parse_args()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(private_dovecot())
        redis_base = stack.enter_context(private_redis())
        dsn = stack.enter_context(throwaway_database())
        stack.enter_context(bench_logs("footprint", args.log_level))
        figures = measure(args, server, dsn, redis_base)
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if figures["retained_bytes_per_message"] > figures["target_bytes_per_message"]:
        fail(f"{figures['retained_bytes_per_message']} B/message retained, target ≤ 100")


if __name__ == "__main__":
    main()
