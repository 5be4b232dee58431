"""APPEND→XADD latency over Dovecot's own push floor, with N idle folders in the engine.

    PYTHONPATH=. .venv/bin/python bench/ingest_latency.py [--folders 5000] [--samples 300]
        [--tls] [--size 12000] [--quick] [--json PATH]

One engine serves N providers (INBOX each) from this process.  A probe in a separate
process then takes sequential samples, each on a random one of the N mailboxes:

* a bare imapclient session IDLEs on the same mailbox and notes when ``* n EXISTS``
  arrives: the floor (Dovecot holds IDLE notifications ~500 ms);
* it APPENDs one message and an ``XREAD BLOCK`` on the workflow stream notes when the
  event for that Message-ID lands;
* overhead = t_xadd - t_exists(bare), for the same message.

The probe runs in its own process so its threads never compete with the engine for
the GIL; both use CLOCK_MONOTONIC.  The engine's own view (EXISTS seen → XADD done,
``engine.stats.latencies``) is reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import orjson
import redis

from bench.common import (
    MANY_TLS_SESSIONS_CONF,
    SAMPLE_TIMEOUT_S,
    STREAM,
    EngineRun,
    Figure,
    PushTarget,
    Sample,
    StageTracer,
    add_json_option,
    bench_logs,
    bench_settings,
    cpu_seconds,
    create_providers,
    fail,
    load1,
    machine_note,
    ms,
    percentile,
    print_table,
    private_dovecot,
    private_redis,
    push_sample,
    rss_kib,
    run_with_progress,
    tenant_configs,
    throwaway_database,
    write_figures,
)
from tests.harness.dovecot import Dovecot, ImapUser


@dataclass(frozen=True)
class ProbeSpec:
    target: PushTarget
    redis_url: str
    users: tuple[ImapUser, ...]  # one per sample, already drawn at random
    size: int
    gap_s: float


def _last_id(client: redis.Redis) -> bytes:
    newest: Any = client.xrevrange(STREAM, count=1)
    return bytes(newest[0][0]) if newest else b"0-0"


def _wait_event(client: redis.Redis, after: bytes, mid: str) -> tuple[float, bytes]:
    """Block until the event whose emailData.id is ``mid`` is readable; (time, its id)."""
    deadline = time.monotonic() + SAMPLE_TIMEOUT_S
    wanted = mid.strip("<>")
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            raise TimeoutError(f"no event for {mid} within {SAMPLE_TIMEOUT_S}s")
        reply: Any = client.xread({STREAM: after}, count=100, block=remaining_ms)
        now = time.monotonic()
        for _, entries in reply or ():
            for entry_id, fields in entries:
                after = entry_id
                payload = orjson.loads(fields[b"payload_json"])
                if str(payload["emailData"]["id"]).strip("<>") == wanted:
                    return now, after


def _stream_waiter(r: redis.Redis) -> Callable[[str], Callable[[], float]]:
    def arm(mid: str) -> Callable[[], float]:
        after = _last_id(r)  # taken before the APPEND: the event cannot slip past
        return lambda: _wait_event(r, after, mid)[0]

    return arm


def probe(spec: ProbeSpec) -> tuple[list[Sample], list[str]]:
    """Runs in a spawned process: the samples, sequentially; also the ones that timed out."""
    # redis-py's default 5 s socket timeout would cut a long XREAD BLOCK short.
    r = redis.Redis.from_url(spec.redis_url, socket_timeout=SAMPLE_TIMEOUT_S + 5)
    out: list[Sample] = []
    missed: list[str] = []
    try:
        for seq, user in enumerate(spec.users):
            try:
                out.append(push_sample(spec.target, user, seq, spec.size, _stream_waiter(r)))
            except (TimeoutError, RuntimeError) as exc:
                missed.append(f"sample {seq} on {user.name}: {exc}")
                print(f"  !!! {missed[-1]}", flush=True)
            if (seq + 1) % 50 == 0:
                print(f"  ... {seq + 1}/{len(spec.users)} samples", flush=True)
            time.sleep(spec.gap_s)
    finally:
        r.close()
    return out, missed


def run_probe(spec: ProbeSpec) -> tuple[list[Sample], list[str]]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(probe, spec).result()


@dataclass
class LatencyResult:
    folders: int
    connect_s: float
    samples: list[Sample]
    missed: list[str]
    engine_latencies: list[float]
    engine_cpu_s: float
    sampling_s: float
    rss_kib: int
    errors: dict[str, int]
    keepalives: int = 0  # bare "* OK" wakes handled on the loop thread while sampling


def measure(
    args: argparse.Namespace,
    dsn: str,
    redis_base: str,
    server: Dovecot,
    tracer: StageTracer | None = None,
) -> LatencyResult:
    """Engine with ``args.folders`` idle providers, then the probe's samples."""
    users = server.add_users(args.folders, prefix="lat")
    redis_url = f"{redis_base}/1"
    overrides = dict(item.split("=", 1) for item in args.set or ())
    settings = bench_settings(dsn, redis_url, str(server.cafile), **overrides)
    tenant, _ = run_with_progress(
        f"creating {args.folders} providers",
        lambda: create_providers(settings, server, users, tls=args.tls),
    )
    run = EngineRun(settings)
    try:
        run.serve(tenant_configs(run.ctx, tenant))
        connect_s = run.wait_idle(args.folders, timeout_s=max(180.0, args.folders * 0.1))
        print(f"{args.folders} folders IDLE after {connect_s:.1f}s", flush=True)
        time.sleep(2)  # let the post-connect status writes settle
        rng = random.Random(args.seed)
        spec = ProbeSpec(
            target=PushTarget.of(server, args.tls), redis_url=redis_url,
            users=tuple(rng.choice(users) for _ in range(args.samples)),
            size=args.size, gap_s=args.gap,
        )  # fmt: skip
        run.engine.stats.latencies.clear()
        if tracer is not None:
            tracer.install()
        keepalives0 = run.engine.stats.keepalives
        cpu0, t0 = cpu_seconds(), time.monotonic()
        try:
            samples, missed = run_probe(spec)
        finally:
            if tracer is not None:
                tracer.uninstall()
        sampling_s, engine_cpu = time.monotonic() - t0, cpu_seconds() - cpu0
        still_idle = run.census()["idle"]
        if still_idle < args.folders:
            fail(f"only {still_idle}/{args.folders} folders IDLE after sampling")
        return LatencyResult(
            folders=args.folders, connect_s=connect_s, samples=samples, missed=missed,
            engine_latencies=list(run.engine.stats.latencies), engine_cpu_s=engine_cpu,
            sampling_s=sampling_s, rss_kib=rss_kib(), errors=dict(run.engine.stats.errors),
            keepalives=run.engine.stats.keepalives - keepalives0,
        )  # fmt: skip
    finally:
        run.stop()


def _detection_rows(res: LatencyResult) -> list[tuple[str, str]]:
    """overhead - engine latency, per sample: how much later than the bare client the
    engine saw the EXISTS (Dovecot's delivery, or the loop thread busy elsewhere).
    Samples and engine events pair up in order, since the samples are sequential."""
    if res.missed or len(res.engine_latencies) != len(res.samples):
        return []
    lag = [s.overhead_s - e for s, e in zip(res.samples, res.engine_latencies, strict=True)]
    return [("engine saw EXISTS after the bare client p50 / p99",
             f"{ms(percentile(lag, 50))} / {ms(percentile(lag, 99))}")]  # fmt: skip


def report(res: LatencyResult, args: argparse.Namespace) -> None:
    floors = [s.floor_s for s in res.samples]
    over = [s.overhead_s for s in res.samples]
    eng = res.engine_latencies
    mode = "TLS" if args.tls else "plain"
    rows = [
        ("idle folders in the engine", f"{res.folders} ({mode}, INBOX each)"),
        ("samples", f"{len(res.samples)} x ~{args.size} B, sequential"),
        ("connect + IDLE all folders", f"{res.connect_s:.1f} s"),
        ("floor p50 / p99 (APPEND done → bare EXISTS)",
         f"{ms(percentile(floors, 50))} / {ms(percentile(floors, 99))}"),
        ("overhead p50 (target ≤ 5 ms)", ms(percentile(over, 50))),
        ("overhead p99 (target ≤ 25 ms)", ms(percentile(over, 99))),
        ("overhead max", ms(max(over))),
        ("engine EXISTS seen → XADD done p50 / p99",
         f"{ms(percentile(eng, 50))} / {ms(percentile(eng, 99))} ({len(eng)} events)"),
        *_detection_rows(res),
        ("keepalives while sampling (no cycle)", str(res.keepalives)),
        ("engine CPU while sampling", f"{100 * res.engine_cpu_s / res.sampling_s:.1f} % of a core"),
        ("engine process RSS", f"{res.rss_kib / 1024:.0f} MiB"),
        ("engine errors", str(res.errors or "none")),
        ("machine", machine_note()),
    ]  # fmt: skip
    print_table("ingest latency: APPEND→XADD over the push floor", rows)
    if res.missed:
        fail(f"{len(res.missed)} sample(s) saw no event within {SAMPLE_TIMEOUT_S:.0f} s: "
             + "; ".join(res.missed[:5]))  # fmt: skip
    if len(eng) != len(res.samples):
        # The engine times a push only when the cycle started from the readable socket; an
        # EXISTS that lands while the folder's cycle is running is drained by a follow-up
        # cycle that it does not time.  The probe's figures above still cover every sample.
        print(f"note: the engine timed {len(eng)} of {len(res.samples)} pushes; the others "
              "arrived while their folder's cycle was already running")  # fmt: skip


def figures(res: LatencyResult) -> dict[str, Figure]:
    over = [s.overhead_s for s in res.samples]
    return {
        "overhead_p50_ms": round(1000 * percentile(over, 50), 3),
        "overhead_p99_ms": round(1000 * percentile(over, 99), 3),
        "overhead_max_ms": round(1000 * max(over, default=float("nan")), 3),
        "folders": res.folders,
        "load1": load1(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", type=int, default=5000, help="idle providers (INBOX each)")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--tls", action="store_true", help="implicit TLS instead of plain")
    parser.add_argument("--size", type=int, default=12_000, help="message size in bytes")
    parser.add_argument("--gap", type=float, default=0.05, help="pause between samples (s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-level", default="INFO", help="service log level (to a file)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="a service setting, e.g. idle_refresh_s=600 (repeatable)")  # fmt: skip
    parser.add_argument("--no-keepalive", action="store_true",
                        help="Dovecot keepalive every 30 min, not 2 (diagnostic)")  # fmt: skip
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each stage of the push cycles (diagnostic)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 folders, 30 samples")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.folders, args.samples = 200, 30
    return args


def main() -> None:
    args = parse_args()
    print(f"ingest_latency: {args.folders} folders, {args.samples} samples; {machine_note()}")
    with contextlib.ExitStack() as stack:
        # Dovecot's "* OK Still here" every 2 min wakes every idle folder; this knob moves
        # it out of the run, to show what those wake-ups cost the push path.
        quiet = "imap_idle_notify_interval = 30 mins\n" if args.no_keepalive else ""
        server = stack.enter_context(private_dovecot(MANY_TLS_SESSIONS_CONF + quiet))
        redis_base = stack.enter_context(private_redis())
        dsn = stack.enter_context(throwaway_database())
        stack.enter_context(bench_logs("latency", args.log_level))
        tracer = StageTracer() if args.breakdown else None
        result = measure(args, dsn, redis_base, server, tracer)
        if tracer is not None:
            print_table("push cycle stages: p50 / p99 (times from the loop seeing EXISTS)",
                        tracer.table())  # fmt: skip
            print_table("slowest push cycles (time since the first sample)", tracer.slowest())
            print_table("other cycles while sampling", tracer.background())
        write_figures(args.json, figures(result))
        report(result, args)  # inside: a failed run keeps the service log


if __name__ == "__main__":
    main()
