"""The control plane at size: the real leader, agents and lease keepers, a null engine.

    .venv/bin/python -m bench.control_plane --providers 100000 --members 100 --json out.json

N providers are COPYed into a throwaway database, a private redis-server holds the
pool's state.  Two leader processes (one leads, one stands by) and member processes,
each running several real ``PoolAgent``s (keeper, assigner, command inbox, leases with
fencing epochs in PostgreSQL) over an engine that "connects" at once and releases a
provider as soon as it is told to stop.  Measured:

* steady state: leader CPU per round and per second; Redis commands and bytes per second
  (``INFO commandstats`` / ``INFO stats`` deltas of the private server, every member
  together); PostgreSQL rows read and written per second (``pg_stat_user_tables``);
* one member SIGKILLed (it runs alone in its own process, as a worker does), then a
  process of several members: time until every provider it held is leased elsewhere, and
  providers moved against the optimum (the ones it held);
* a member joining: time until its share is leased, moved against the optimum (its load);
* the leader SIGKILLed: time until the standby leads, providers moved (ideally none);
* the largest value among the pool's keys (``MEMORY USAGE``) and the leader's RSS.

Prints a table; ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench import redis_counting
from bench.common import bench_settings, private_redis, settings_env, throwaway_database
from bench.redis_counting import CountingConnection
from shardworker import logs
from shardworker.config import Settings, load_settings
from shardworker.db.ownership import OwnershipStore
from shardworker.db.store import ProviderConfig, Store, open_pool
from shardworker.pool.agent import PoolAgent
from shardworker.pool.leader import Leader
from shardworker.pool.leases import LeaseManager
from shardworker.pool.registry import ASSIGN_PREFIX, OWNER_SHARDS, OWNERS_PREFIX, Registry

TENANT_SIZE = 100  # providers per tenant


# ----------------------------------------------------------------------------- roles


class NullEngine:
    """Serves whatever it is given at once; a stopped provider is released at once."""

    def __init__(self, released: queue.SimpleQueue[str]) -> None:
        self.released = released
        self.serving: set[str] = set()
        self.lock = threading.Lock()

    def update_providers(self, configs: Sequence[ProviderConfig], fences: Any = None) -> None:
        keys = {c.key for c in configs}
        with self.lock:
            for key in self.serving - keys:
                self.released.put(key)
            self.serving = keys

    def drop_provider_now(self, key: str, reason: str = "lease_lost") -> None:
        with self.lock:
            self.serving.discard(key)

    def request_stop(self) -> None:
        pass

    def reconnect_provider(self, key: str, config: Any, on_done: Any) -> None:
        on_done(key in self.serving)

    def resync_provider(self, key: str, request: Any) -> None:
        request.fail([])


def run_members(settings: Settings, names: list[str]) -> None:
    logs.configure("WARNING", stream=sys.stderr)
    client = redis.Redis.from_url(settings.redis_url, max_connections=4 * len(names) + 8,
                                  socket_timeout=30,
                                  connection_class=CountingConnection)  # fmt: skip
    # Production gives each worker a pool of its own; here the members of one process share
    # one, capped so that every process fits PostgreSQL's default 100 connections.
    pool = open_pool(settings.database_url, max_size=min(8, max(4, len(names) // 4)))
    ownership, store = OwnershipStore(pool), Store(pool)
    agents = []
    for name in names:
        released: queue.SimpleQueue[str] = queue.SimpleQueue()
        leases = LeaseManager(client, ownership, name, settings.lease_ttl_s)
        agent = PoolAgent(settings, name, registry=Registry(client), leases=leases, store=store,
                          engine=NullEngine(released), released=released)  # type: ignore[arg-type]  # fmt: skip
        agent.start()
        agents.append(agent)
    while True:  # until the bench kills the process group
        time.sleep(1.0)
        line = {"stats": True, "redis": redis_counting.snapshot(), "t": time.time()}
        print(json.dumps(line), file=sys.stdout, flush=True)


def run_leader(settings: Settings, name: str) -> None:
    logs.configure("INFO", stream=sys.stderr)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=30,
                                  connection_class=CountingConnection)  # fmt: skip
    pool = open_pool(settings.database_url, max_size=2)
    ownership = OwnershipStore(pool)
    leader = Leader(settings, Registry(client), ownership, name)
    leader.start()
    while True:
        time.sleep(0.5)
        s = leader.stats
        line = {"stats": True, "leader": s.is_leader, "version": s.version, "plans": s.plans,
                "full_scans": ownership.full_scans, "last_round_s": s.last_round_s,
                "members": s.members, "providers": s.providers, "unowned": s.unowned,
                "moves": dict(s.moves), "redis": redis_counting.snapshot(),
                "t": time.time()}  # fmt: skip
        print(json.dumps(line), file=sys.stdout, flush=True)


# ----------------------------------------------------------------------------- setup


def copy_providers(dsn: str, n: int) -> None:
    """N providers in N / TENANT_SIZE tenants, both Alga rows, by COPY."""
    tenants = [str(uuid.uuid4()) for _ in range(max(1, n // TENANT_SIZE))]
    rows = [(tenants[i % len(tenants)], str(uuid.uuid4())) for i in range(n)]
    with psycopg.connect(dsn) as conn:
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY email_providers (id, tenant, provider_type, provider_name, mailbox) "
                "FROM STDIN"
            ) as copy,
        ):
            for i, (tenant, pid) in enumerate(rows):
                copy.write_row((pid, tenant, "imap", f"p{i}", f"p{i}@example.com"))
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY imap_email_provider_config (email_provider_id, tenant, host, port, secure, "
                "allow_starttls, auth_type, username) FROM STDIN"
            ) as copy,
        ):
            for i, (tenant, pid) in enumerate(rows):
                copy.write_row((pid, tenant, "127.0.0.1", 1, False, False, "password", f"u{i}"))
        conn.execute("ANALYZE email_providers")
        conn.execute("ANALYZE imap_email_provider_config")
        conn.commit()


class Proc:
    def __init__(self, role: str, env: dict[str, str], args: list[str], log: Path) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "bench.control_plane", "--role", role, *args]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def last(self) -> dict[str, Any]:
        for line in reversed(self.log.read_bytes().splitlines()[-400:]):
            if line.startswith(b"{"):
                try:
                    found = dict(json.loads(line))
                except ValueError:
                    continue
                if found.get("stats"):
                    return found
        return {}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ----------------------------------------------------------------------------- measuring


class Probe:
    def __init__(self, client: redis.Redis, dsn: str) -> None:
        self.client = client
        self.dsn = dsn

    def redis_counts(self) -> tuple[dict[str, int], int, int]:
        """Calls per command (``INFO commandstats``, commands inside scripts included) and
        the server's byte totals.  The bench's own ``INFO`` calls are left out of the
        calls; their replies (a few KB per window end) are in the server's bytes out."""
        stats = self.client.info("stats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"])
                 for k, v in self.client.info("commandstats").items()}  # fmt: skip
        calls.pop("info", None)
        return calls, int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])

    def redis_cpu_s(self) -> float:
        """CPU seconds the Redis server has used (``INFO cpu``, user + system)."""
        cpu = self.client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def pg_counts(self) -> tuple[int, int]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)), "
                "sum(n_tup_upd + n_tup_ins + n_tup_del) FROM pg_stat_user_tables"
            ).fetchone()
        assert row is not None
        return int(row[0] or 0), int(row[1] or 0)

    def owners(self) -> dict[str, str]:
        return Registry(self.client).read_owners()

    def leased(self, keys: Sequence[str]) -> dict[str, str]:
        """provider key -> member holding its final lease token."""
        out = {}
        for start in range(0, len(keys), 5000):
            part = keys[start : start + 5000]
            got = self.client.mget([f"sw:lease:{k}" for k in part])
            for key, token in zip(part, got, strict=True):
                if token is not None and b"|p|" not in token:
                    out[key] = token.decode().split("|", 1)[0]
        return out

    def largest_value(self) -> tuple[str, int]:
        names = [f"{OWNERS_PREFIX}{i}" for i in range(OWNER_SHARDS)]
        names += [k.decode() for k in self.client.scan_iter(match=ASSIGN_PREFIX + "*", count=1000)]
        names += ["sw:assignver", "sw:members", "sw:assignment"]
        sizes = [(n, int(self.client.memory_usage(n, samples=0) or 0)) for n in names]
        return max(sizes, key=lambda x: x[1])


def wait_for(what: str, predicate: Any, timeout_s: float, every_s: float = 0.25) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(every_s)
    raise SystemExit(f"{what}: not within {timeout_s:.0f}s")


def client_counts(procs: Sequence[Proc]) -> dict[str, list[int]]:
    """The simulator processes' own per-request Redis counts, summed (bench.redis_counting)."""
    total: dict[str, list[int]] = {}
    for proc in procs:
        for label, row in proc.last().get("redis", {}).items():
            mine = total.setdefault(label, [0, 0, 0])
            for i, value in enumerate(row):
                mine[i] += int(value)
    return total


def steady(
    probe: Probe, leader: Proc, procs: Sequence[Proc], window_s: float, round_s: float
) -> dict[str, Any]:
    c0 = client_counts(procs)
    r0, pg0, cpu0, t0 = probe.redis_counts(), probe.pg_counts(), cpu_s(leader.pid), time.time()
    redis_cpu0 = probe.redis_cpu_s()
    scans0 = leader.last().get("full_scans", 0)
    time.sleep(window_s)
    r1, pg1, cpu1, t1 = probe.redis_counts(), probe.pg_counts(), cpu_s(leader.pid), time.time()
    redis_cpu1 = probe.redis_cpu_s()
    time.sleep(1.5)  # every process has printed its counts since t1
    c1 = client_counts(procs)
    dt = t1 - t0
    cpu = (cpu1 - cpu0) / dt
    calls = {k: round((v - r0[0].get(k, 0)) / dt, 1) for k, v in r1[0].items()
             if v != r0[0].get(k, 0)}  # fmt: skip
    by_request = redis_counting.delta(c0, c1, dt)
    return {
        "window_s": round(dt, 1),
        "leader_cpu_pct": round(100 * cpu, 2),
        "leader_cpu_ms_per_round": round(1000 * cpu * round_s, 2),
        "redis_cmds_per_s": round(sum(calls.values()), 1),
        "redis_server_cpu_pct": round(100 * (redis_cpu1 - redis_cpu0) / dt, 1),
        "redis_calls_per_s_by_command": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        "redis_by_request": by_request,
        "redis_client_bytes_in_per_s": sum(r["bytes_in_per_s"] for r in by_request.values()),
        "redis_client_bytes_out_per_s": sum(r["bytes_out_per_s"] for r in by_request.values()),
        "redis_bytes_in_per_s": round((r1[1] - r0[1]) / dt),
        "redis_bytes_out_per_s": round((r1[2] - r0[2]) / dt),
        "pg_rows_read_per_s": round((pg1[0] - pg0[0]) / dt, 1),
        "pg_rows_written_per_s": round((pg1[1] - pg0[1]) / dt, 1),
        "full_scans_in_window": leader.last().get("full_scans", 0) - scans0,
    }


def all_leased(probe: Probe, keys: list[str], members: set[str] | None = None) -> bool:
    held = probe.leased(keys)
    if len(held) != len(keys):
        return False
    return members is None or set(held.values()) <= members


def member_names(proc: int, count: int) -> list[str]:
    return [f"sim-{proc}/{i}" for i in range(count)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"providers": args.providers, "members": args.members}
    with ExitStack() as stack:
        base = stack.enter_context(private_redis())
        dsn = stack.enter_context(throwaway_database())
        started = time.monotonic()
        copy_providers(dsn, args.providers)
        out["copy_s"] = round(time.monotonic() - started, 1)
        overrides = {"provider_refresh_s": "5", **dict(i.split("=", 1) for i in args.set or ())}
        settings = bench_settings(dsn, f"{base}/0", "", **overrides)
        env = {**os.environ, **settings_env(settings)}
        client = redis.Redis.from_url(f"{base}/0", socket_timeout=120)
        probe = Probe(client, dsn)
        logdir = Path(args.logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        for old in logdir.glob("*.log"):
            old.unlink()
        procs: list[Proc] = []
        stack.callback(lambda: [p.stop() for p in procs])
        leaders = [Proc("leader", env, ["--name", f"coord-{i}"], logdir / f"leader{i}.log")
                   for i in range(2)]  # fmt: skip
        procs += leaders
        # M - 1 members over the processes, plus one member alone in its own process: the
        # one killed first, as a crashed worker (one member) is in production.
        rest = args.members - 1
        per = -(-rest // args.procs)
        groups = [member_names(i, min(per, rest - i * per)) for i in range(args.procs)
                  if rest - i * per > 0]  # fmt: skip
        groups.append(["sim-solo/0"])
        members = [Proc("members", env, ["--names", ",".join(g)], logdir / f"members{i}.log")
                   for i, g in enumerate(groups)]  # fmt: skip
        procs += members
        keys = sorted(f"{t}:{p}" for t, p in _pairs(dsn))
        started = time.monotonic()
        wait_for("initial settle", lambda: all_leased(probe, keys), args.settle_s, every_s=2)
        out["initial_settle_s"] = round(time.monotonic() - started, 1)
        time.sleep(args.quiet_s)
        lead = next(p for p in leaders if p.last().get("leader"))
        out["steady"] = steady(probe, lead, procs, args.window_s, settings.leader_round_s)
        out["steady"]["leader_rss_mb"] = round(rss_mb(lead.pid), 1)
        name, size = probe.largest_value()
        out["largest_value"] = {"key": name, "bytes": size}
        out["member_killed"] = kill_members(probe, members[-1], groups[-1], keys, settings)
        procs.remove(members[-1])
        out["member_process_killed"] = kill_members(probe, members[-2], groups[-2], keys,
                                                    settings)  # fmt: skip
        procs.remove(members[-2])
        out["member_joined"] = join_member(probe, env, logdir, keys, procs)
        out["leader_killed"] = kill_leader(probe, leaders, keys)
        out["ttl_s"] = settings.lease_ttl_s
        out["settings"] = overrides
    return out


def _pairs(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT tenant::text, id::text FROM email_providers").fetchall()
    return [(str(t), str(p)) for t, p in rows]


def kill_members(
    probe: Probe, victim: Proc, names: list[str], keys: list[str], settings: Settings
) -> dict[str, Any]:
    before = probe.owners()
    theirs = sorted(k for k, m in before.items() if m in names)
    victim.kill()
    killed_at = time.monotonic()
    wait_for("takeover", lambda: all(m not in names for m in probe.leased(theirs).values())
             and len(probe.leased(theirs)) == len(theirs), 120)  # fmt: skip
    took = time.monotonic() - killed_at
    wait_for("settled after kill", lambda: all_leased(probe, keys), 120, every_s=1)
    after = probe.owners()
    moved = sum(1 for k in keys if before.get(k) != after.get(k))
    return {"members": len(names), "providers_held": len(theirs),
            "leased_elsewhere_s": round(took, 2), "moved": moved,
            "moved_vs_optimum": round(moved / max(1, len(theirs)), 3),
            "ttl_s": settings.lease_ttl_s}  # fmt: skip


def join_member(
    probe: Probe, env: dict[str, str], logdir: Path, keys: list[str], procs: list[Proc]
) -> dict[str, Any]:
    before = probe.owners()
    names = ["sim-join/0"]
    joined = Proc("members", env, ["--names", ",".join(names)], logdir / "join.log")
    procs.append(joined)
    started = time.monotonic()

    def served() -> bool:
        owners = probe.owners()
        mine = [k for k, m in owners.items() if m in names]
        return (
            bool(mine)
            and all(v in names for v in probe.leased(mine).values())
            and len(probe.leased(mine)) == len(mine)
        )

    wait_for("join", served, 180, every_s=1)
    took = time.monotonic() - started
    time.sleep(3)  # rate-limited rebalancing may still be finishing
    after = probe.owners()
    load = sum(1 for m in after.values() if m in names)
    moved = sum(1 for k in keys if before.get(k) != after.get(k))
    return {"share_leased_s": round(took, 2), "load": load, "moved": moved,
            "moved_vs_optimum": round(moved / max(1, load), 3)}  # fmt: skip


def kill_leader(probe: Probe, leaders: list[Proc], keys: list[str]) -> dict[str, Any]:
    lead = next(p for p in leaders if p.last().get("leader"))
    standby = next(p for p in leaders if p is not lead)
    before = probe.owners()
    lead.kill()
    killed = time.monotonic()
    wait_for("new leader", lambda: bool(standby.last().get("leader")), 60, every_s=0.2)
    took = time.monotonic() - killed
    time.sleep(5)
    after = probe.owners()
    moved = sum(1 for k in keys if before.get(k) != after.get(k))
    return {"new_leader_s": round(took, 2), "moved": moved,
            "full_scans_by_new_leader": standby.last().get("full_scans"),
            "new_leader_rss_mb": round(rss_mb(standby.pid), 1),
            "all_leased": all_leased(probe, keys)}  # fmt: skip


# ----------------------------------------------------------------------------- output


def table(out: dict[str, Any]) -> str:
    buf = io.StringIO()
    s, k, j, ld = out["steady"], out["member_killed"], out["member_joined"], out["leader_killed"]
    kp = out["member_process_killed"]
    rows = [
        ("providers / members", f"{out['providers']} / {out['members']}"),
        ("initial settle", f"{out['initial_settle_s']} s"),
        ("leader CPU, steady", f"{s['leader_cpu_pct']} % of a core, "
                               f"{s['leader_cpu_ms_per_round']} ms/round"),
        ("Redis, steady (all)", f"{s['redis_cmds_per_s']} cmd/s, in {s['redis_bytes_in_per_s']} "
                                f"B/s, out {s['redis_bytes_out_per_s']} B/s, server CPU "
                                f"{s['redis_server_cpu_pct']} % of a core"),
        ("PostgreSQL, steady", f"{s['pg_rows_read_per_s']} rows read/s, "
                               f"{s['pg_rows_written_per_s']} rows written/s"),
        ("full scans in window", str(s["full_scans_in_window"])),
        ("member killed", f"{k['providers_held']} providers leased elsewhere in "
                          f"{k['leased_elsewhere_s']} s (TTL {k['ttl_s']} s), moved "
                          f"{k['moved_vs_optimum']} x optimum"),
        ("member process killed", f"{kp['members']} members, {kp['providers_held']} providers "
                                  f"leased elsewhere in {kp['leased_elsewhere_s']} s (TTL "
                                  f"{kp['ttl_s']} s), moved {kp['moved_vs_optimum']} x optimum"),
        ("member joined", f"share of {j['load']} leased in {j['share_leased_s']} s, moved "
                          f"{j['moved_vs_optimum']} x optimum"),
        ("leader killed", f"standby leads in {ld['new_leader_s']} s, moved {ld['moved']}, "
                          f"all leased {ld['all_leased']}"),
        ("largest Redis value", f"{out['largest_value']['bytes']} B "
                                f"({out['largest_value']['key']})"),
        ("leader RSS", f"{s['leader_rss_mb']} MB"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        buf.write(f"{name.ljust(width)}  {value}\n")
    buf.write(f"\nRedis by request, steady (simulator sockets: in "
              f"{s['redis_client_bytes_in_per_s']} B/s, "
              f"out {s['redis_client_bytes_out_per_s']} B/s)\n")  # fmt: skip
    for label, row in list(s["redis_by_request"].items())[:15]:
        buf.write(
            f"  {label[:48].ljust(48)} {row['requests_per_s']:>8} req/s  in "
            f"{row['bytes_in_per_s']:>7} B/s  out {row['bytes_out_per_s']:>7} B/s\n"
        )
    calls = ", ".join(f"{k} {v}" for k, v in list(s["redis_calls_per_s_by_command"].items())[:12])
    buf.write(f"Redis calls/s by command (server, inside scripts too): {calls}\n")
    return buf.getvalue()


def _exit_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", type=int, default=100_000)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--procs", type=int, default=4, help="member processes")
    parser.add_argument("--settle-s", type=float, default=900.0)
    parser.add_argument("--quiet-s", type=float, default=10.0)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--logdir", default="/tmp/sw-control-plane")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="a service setting, e.g. lease_ttl_s=30 (repeatable)")  # fmt: skip
    parser.add_argument("--role", choices=["bench", "leader", "members"], default="bench")
    parser.add_argument("--name", default="coord")
    parser.add_argument("--names", default="")
    args = parser.parse_args(argv)
    if args.role == "leader":
        run_leader(load_settings(), args.name)
    elif args.role == "members":
        run_members(load_settings(), args.names.split(","))
    else:
        _exit_on_sigterm()
        out = run(args)
        print(table(out))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
