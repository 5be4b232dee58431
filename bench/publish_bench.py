"""Publisher throughput: pipelined batches of 50 through the exactly-once Lua script.

    .venv/bin/python bench/publish_bench.py [--messages 10000] [--batch 50]

Always runs against a private redis-server on a free port: every variant starts from an
empty database (FLUSHDB), which must never touch a shared one.  Prints msgs/s for first
publishes and for a replay of the same batches (all duplicates), with and without the
pointer queue and event bus.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import redis

from bench.common import Figure, add_json_option, load1, write_figures
from shardworker.config import Settings
from shardworker.sink.base import Fence, Outbound
from shardworker.sink.redis_streams import RedisStreamsSink

TENANT = "0b7c4d1e-8f0a-4c6b-9d2e-3f4a5b6c7d8e"
PROVIDER = "5d6e7f80-1a2b-4c3d-8e9f-a0b1c2d3e4f5"
BODY = "Hello, this is a typical short support request. " * 20


@contextmanager
def private_redis() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="sw-bench-redis-")
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def message(uid: int) -> Outbound:
    mid = f"<bench-{uid}@example.com>"
    now = datetime.now(UTC)
    payload = {
        "tenantId": TENANT,
        "tenant": TENANT,
        "providerId": PROVIDER,
        "occurredAt": "2026-11-27T12:00:00.123Z",
        "emailData": {
            "id": mid,
            "subject": f"Ticket {uid}",
            "from": {"email": "customer@example.com", "name": "Customer"},
            "to": [{"email": "support@example.com"}],
            "body": {"text": BODY},
            "receivedAt": "2026-11-27T12:00:00.123Z",
        },
    }
    return Outbound(TENANT, PROVIDER, "support@example.com", "INBOX", 1, uid, mid, payload, now)


def run(
    client: redis.Redis, settings: Settings, label: str, count: int, batch: int
) -> dict[str, float]:
    client.flushdb()
    lease = f"sw:lease:{TENANT}:{PROVIDER}"
    client.set(lease, "bench-token")
    fence = Fence(lease, "bench-token", 1)
    publisher = RedisStreamsSink(client, settings)
    batches = [
        [message(u) for u in range(s, min(s + batch, count))] for s in range(0, count, batch)
    ]
    rates: dict[str, float] = {}
    for phase in ("first", "replay"):
        started = time.perf_counter()
        for chunk in batches:
            publisher.publish_batch(chunk, fence)
        elapsed = time.perf_counter() - started
        print(f"{label:<28} {phase:<7} {count / elapsed:>10,.0f} msgs/s  ({elapsed * 1000:.0f} ms)")
        rates[f"{phase}.msgs_per_s"] = round(count / elapsed, 1)
    assert publisher.stream_length() == count
    return rates


VARIANT_KEYS = {"workflow stream only": "stream", "+ pointer queue": "pointer",
                "+ pointer queue + event bus": "pointer_bus"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=50)
    add_json_option(parser)
    args = parser.parse_args()
    figures: dict[str, Figure] = {}
    with private_redis() as url:
        client = redis.Redis.from_url(url)
        print(f"{args.messages} messages, batches of {args.batch}, fenced")
        variants = {
            "workflow stream only": Settings(publish_pointer_queue=False),
            "+ pointer queue": Settings(publish_pointer_queue=True),
            "+ pointer queue + event bus": Settings(
                publish_pointer_queue=True, publish_event_bus=True
            ),
        }
        for label, settings in variants.items():
            for name, rate in run(client, settings, label, args.messages, args.batch).items():
                figures[f"{VARIANT_KEYS[label]}.{name}"] = rate
        client.close()
    figures["load1"] = load1()
    write_figures(args.json, figures)


if __name__ == "__main__":
    main()
