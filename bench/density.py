"""Density: idle TLS folders per engine process, and resident memory per folder.

    PYTHONPATH=. .venv/bin/python bench/density.py [--folders 5000] [--quick] [--json PATH]

Two measurements against one private Dovecot, each in a freshly spawned process so
neither inherits the other's heap (or this driver's):

* baseline: N bare imapclient sessions over implicit TLS (login, EXAMINE INBOX, IDLE),
  RSS before the first connect vs after the last IDLE;
* engine: the worker engine serving N providers (INBOX each, implicit TLS), RSS after
  the providers are loaded but before any connect vs after every folder is IDLE.

RSS is VmRSS from /proc/self/status, after a gc.collect().  While each child holds its
sessions, the driver also divides Dovecot's whole PSS (all its processes) by the session count.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import time
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import imapclient

from bench.common import (
    MANY_TLS_SESSIONS_CONF,
    EngineRun,
    Figure,
    add_json_option,
    bare_client,
    bench_logs,
    bench_settings,
    create_providers,
    fail,
    load1,
    machine_note,
    print_table,
    private_dovecot,
    private_redis,
    rss_kib,
    run_with_progress,
    settings_env,
    tenant_configs,
    throwaway_database,
    write_figures,
)
from shardworker import logs
from shardworker.config import load_settings
from tests.harness.dovecot import Dovecot, ImapUser

TARGET_KIB = 64


@dataclass(frozen=True)
class Held:
    """What a child reports while it holds its sessions open."""

    folders: int
    rss_before_kib: int
    rss_after_kib: int
    connect_s: float
    extra: dict[str, Any]

    @property
    def per_folder_kib(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.folders


def _settle_rss() -> int:
    gc.collect()
    return rss_kib()


def bare_child(conn: Connection, host: str, port: int, cafile: str, users: list[ImapUser]) -> None:
    """Spawned: N bare TLS sessions in IDLE; report, then wait for the driver's word."""
    before = _settle_rss()
    start = time.monotonic()
    clients: list[imapclient.IMAPClient] = []
    for user in users:
        client = bare_client(host, port, True, cafile, user)
        client.idle()
        clients.append(client)
    connect_s = time.monotonic() - start
    conn.send(Held(len(clients), before, _settle_rss(), connect_s, {}))
    conn.recv()
    for client in clients:
        with contextlib.suppress(Exception):
            client.shutdown()


def engine_child(conn: Connection, env: dict[str, str], tenant: str, n: int, log: str) -> None:
    """Spawned: the engine serving N TLS providers; report once all are IDLE."""
    with Path(log).open("a", buffering=1 << 16) as stream:
        logs.configure("INFO", stream=stream)
        run = EngineRun(load_settings(env))
        configs = tenant_configs(run.ctx, tenant)
        before = _settle_rss()
        run.serve(configs)
        connect_s = run.wait_idle(n, timeout_s=max(300.0, n * 0.2))
        time.sleep(3)  # the post-connect status writes run on the sync threads
        after = _settle_rss()
        census = dict(run.census())
        threads = len(os.listdir("/proc/self/task"))
        extra = {"census": census, "threads": threads, "errors": dict(run.engine.stats.errors)}
        conn.send(Held(n, before, after, connect_s, extra))
        conn.recv()
        run.stop()


def dovecot_pss_kib(server: Dovecot) -> int:
    """Proportional set size of every process of this Dovecot (its process group)."""
    master = server._proc.pid if server._proc is not None else -1
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != master:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return total


def hold(target: Any, args: tuple[Any, ...], server: Dovecot) -> tuple[Held, int]:
    """Run a child until it reports; (its report, Dovecot's whole PSS meanwhile, KiB).

    The whole PSS, not a delta: Dovecot keeps its imap processes after the first phase
    (service_count = 0), so a delta would charge process start-up to whichever phase ran
    first.
    """
    ctx = get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    try:
        while not parent.poll(1.0):
            if not proc.is_alive():
                fail(f"the child died before reporting (exit {proc.exitcode})")
        held: Held = parent.recv()
        pss = dovecot_pss_kib(server)
        parent.send("stop")
        proc.join(120)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if proc.exitcode != 0:
        fail(f"child exited with {proc.exitcode}")
    return held, pss


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", type=int, default=5000)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 folders")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.folders = 300
    return args


def report(args: argparse.Namespace, results: list[tuple[str, Held, int]]) -> None:
    rows = [("folders", f"{args.folders} idle, implicit TLS, INBOX each")]
    for name, held, pss in results:
        rows += [
            (f"{name}: RSS before → after", f"{held.rss_before_kib / 1024:.1f} → "
                                            f"{held.rss_after_kib / 1024:.1f} MiB"),
            (f"{name}: RSS per folder", f"{held.per_folder_kib:.1f} KiB"),
            (f"{name}: connect + IDLE all", f"{held.connect_s:.1f} s"),
            (f"{name}: Dovecot PSS (all processes) / sessions", f"{pss / held.folders:.1f} KiB"),
        ]  # fmt: skip
        if held.extra:
            errors = held.extra["errors"] or "none"
            rows.append((f"{name}: threads / errors", f"{held.extra['threads']} / {errors}"))
    rows.append(("target", f"≥ 5,000 folders per process at ≤ {TARGET_KIB} KiB each"))
    rows.append(("machine", machine_note()))
    print_table("density: idle TLS folders per process", rows)


def figures(args: argparse.Namespace, results: list[tuple[str, Held, int]]) -> dict[str, Figure]:
    out: dict[str, Figure] = {"folders": args.folders}
    for name, held, pss in results:
        key = "engine" if name == "engine" else "baseline"
        out[f"{key}.rss_per_folder_kib"] = round(held.per_folder_kib, 2)
        out[f"{key}.connect_s"] = round(held.connect_s, 2)
        out[f"{key}.dovecot_pss_per_session_kib"] = round(pss / held.folders, 2)
    out["load1"] = load1()
    return out


def main() -> None:
    args = parse_args()
    print(f"density: {args.folders} TLS folders; {machine_note()}")
    results: list[tuple[str, Held, int]] = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(private_dovecot(MANY_TLS_SESSIONS_CONF))
        redis_base = stack.enter_context(private_redis())
        dsn = stack.enter_context(throwaway_database())
        log = stack.enter_context(bench_logs("density", "INFO"))
        users = server.add_users(args.folders, prefix="dens")
        if not args.skip_baseline:
            bare_args = (server.host, server.tls_port, str(server.cafile), users)
            held, pss = run_with_progress(
                f"baseline: {args.folders} bare imapclient TLS sessions",
                lambda: hold(bare_child, bare_args, server),
            )
            results.append(("bare imapclient", held, pss))
        settings = bench_settings(dsn, f"{redis_base}/1", str(server.cafile))
        tenant, _ = run_with_progress(
            f"creating {args.folders} providers",
            lambda: create_providers(settings, server, users, tls=True),
        )
        engine_args = (settings_env(settings), tenant, args.folders, str(log))
        held, pss = run_with_progress(
            f"engine: {args.folders} TLS folders", lambda: hold(engine_child, engine_args, server)
        )
        results.append(("engine", held, pss))
        census = held.extra["census"]
        if census.get("idle", 0) != args.folders:
            fail(f"not every folder was IDLE: {census}")
    report(args, results)
    write_figures(args.json, figures(args, results))


if __name__ == "__main__":
    main()
