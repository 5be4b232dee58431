"""Cold connect: one engine takes N providers from nothing to IDLE; where each connect's
time and CPU go.

    PYTHONPATH=. .venv/bin/python bench/connect_profile.py [--providers 2000] [--tls]
        [--set NAME=VALUE ...] [--quick] [--json PATH]

One engine in this process serves ``--providers`` fresh providers (INBOX each, no cursor:
a first sync) on a private Dovecot.  The clock runs from ``update_providers`` until every
folder is IDLE.  Each stage of the connect path is wrapped at run time (the product code
is untouched): its wall time and the CPU of the thread running it (``time.thread_time``,
so other threads and processes do not count), summed over all connects.  Process CPU per
connect is the whole engine's (all threads) divided by the providers: on a shared machine
it is the figure to trust, not the wall clock.  ``--json PATH`` writes
connect_all_idle_s, cpu_ms_per_connect, providers, load1 and per stage
``<stage>.wall_ms`` / ``<stage>.cpu_ms`` (means per call).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.common import (
    MANY_TLS_SESSIONS_CONF,
    EngineRun,
    Figure,
    add_json_option,
    bench_logs,
    bench_settings,
    cpu_seconds,
    create_providers,
    load1,
    machine_note,
    print_table,
    private_dovecot,
    private_redis,
    run_with_progress,
    tenant_configs,
    throwaway_database,
    write_figures,
)

# (module, attribute path, stage name): what one first connect does, in order.
STAGES = (
    ("shardworker.engine.cycle", "load_credentials", "secret"),
    ("shardworker.engine.cycle", "open_client", "connect+login"),
    ("shardworker.engine.cycle", "capabilities", "capabilities"),
    ("shardworker.imap.session", "FolderSession.examine", "examine"),
    ("shardworker.engine.cycle", "settle_cursor", "first-sync cursor"),
    ("shardworker.engine.sync", "FolderSync.ensure_cursor", "first-sync cursor"),  # before
    ("shardworker.imap.session", "FolderSession.new_messages", "uid fetch n:*"),
    ("shardworker.imap.session", "FolderSession.enter_idle", "idle"),
    ("shardworker.engine.cycle", "Cycle.run", "whole cycle"),
)


@dataclass
class Stage:
    calls: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0


class ConnectTracer:
    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {name: Stage() for _, _, name in STAGES}
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        for module_name, path, name in STAGES:
            owner: Any = importlib.import_module(module_name)
            *parents, attr = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            if not hasattr(owner, attr):  # a stage of an older (or newer) tree
                continue
            original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            setattr(owner, attr, self._timed(name, original))
            self._undo.append(lambda o=owner, a=attr, f=original: setattr(o, a, f))

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        stage = self.stages[name]

        def timed(*args: Any, **kwargs: Any) -> Any:
            wall0, cpu0 = time.monotonic(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.monotonic() - wall0, time.thread_time() - cpu0
                with self._lock:
                    stage.calls += 1
                    stage.wall_s += wall
                    stage.cpu_s += cpu

        return timed


def run(args: argparse.Namespace) -> tuple[float, float, ConnectTracer, tuple[int, int]]:
    tracer = ConnectTracer()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(private_dovecot(MANY_TLS_SESSIONS_CONF))
        redis_base = stack.enter_context(private_redis())
        dsn = stack.enter_context(throwaway_database())
        stack.enter_context(bench_logs("connect", args.log_level))
        users = server.add_users(args.providers, prefix="cold")
        overrides = dict(item.split("=", 1) for item in args.set or ())
        settings = bench_settings(dsn, f"{redis_base}/1", str(server.cafile), **overrides)
        tenant, _ = run_with_progress(
            f"creating {args.providers} providers",
            lambda: create_providers(settings, server, users, tls=args.tls),
        )
        engine = EngineRun(settings)
        try:
            configs = tenant_configs(engine.ctx, tenant)
            tracer.install()
            cpu0 = cpu_seconds()
            engine.serve(configs)
            took = engine.wait_idle(args.providers, timeout_s=max(120.0, args.providers * 0.1))
            cpu = cpu_seconds() - cpu0
            seeder = getattr(engine.engine.cycle, "seeder", None)
            groups = (seeder.groups, seeder.seeds) if seeder is not None else (0, 0)
        finally:
            tracer.uninstall()
            engine.stop()
    return took, cpu, tracer, groups


def report(args: argparse.Namespace, took: float, cpu: float, tracer: ConnectTracer) -> None:
    n = args.providers
    rows = [
        ("providers", f"{n} ({'TLS' if args.tls else 'plain'}, INBOX each, first sync)"),
        ("all IDLE after", f"{took:.1f} s ({n / took:,.0f} connects/s)"),
        ("engine CPU per connect", f"{1000 * cpu / n:.2f} ms (all threads)"),
    ]
    for name, st in tracer.stages.items():
        if st.calls:
            rows.append((f"  {name}", f"{1000 * st.wall_s / st.calls:.2f} ms wall, "
                                      f"{1000 * st.cpu_s / st.calls:.2f} ms CPU "
                                      f"({st.calls} calls)"))  # fmt: skip
    rows.append(("machine", machine_note()))
    print_table("cold connect: providers to IDLE, one engine", rows)


def figures(
    args: argparse.Namespace, took: float, cpu: float, tracer: ConnectTracer
) -> dict[str, Figure]:
    out: dict[str, Figure] = {
        "connect_all_idle_s": round(took, 2),
        "cpu_ms_per_connect": round(1000 * cpu / args.providers, 3),
        "providers": args.providers,
    }
    for name, st in tracer.stages.items():
        if st.calls:
            out[f"{name}.wall_ms"] = round(1000 * st.wall_s / st.calls, 3)
            out[f"{name}.cpu_ms"] = round(1000 * st.cpu_s / st.calls, 3)
    out["load1"] = load1()
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", type=int, default=2000)
    parser.add_argument("--tls", action="store_true", help="implicit TLS instead of plain")
    parser.add_argument("--log-level", default="INFO", help="service log level (to a file)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="a service setting, e.g. sync_threads=16 (repeatable)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 providers")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.providers = 300
    return args


def main() -> None:
    args = parse_args()
    print(f"connect_profile: {args.providers} providers; {machine_note()}")
    took, cpu, tracer, (groups, seeds) = run(args)
    report(args, took, cpu, tracer)
    print(f"  first-sync cursors: {seeds} in {groups} transaction(s)")
    write_figures(args.json, figures(args, took, cpu, tracer))


if __name__ == "__main__":
    main()
