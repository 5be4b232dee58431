"""One chaos run: pods up, mail delivered while faults fly, then the accounting.

Shared by ``bench/chaos.py`` (full size) and ``tests/test_chaos.py`` (the CI subset).
"""

from __future__ import annotations

import contextlib
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.chaos_support.account import Accounting, StreamReader, account
from bench.chaos_support.deliver import Deliverer
from bench.chaos_support.faults import FaultInjector, FaultLog, Targets
from bench.chaos_support.pool import ChaosPool, chaos_timings
from bench.chaos_support.servers import AofRedis, PgCluster
from tests.faultproxy import ProxyProcess
from tests.harness.dovecot import Dovecot


@dataclass(frozen=True)
class ChaosPlan:
    mailboxes: int = 500
    messages: int = 10_000
    pods: int = 3
    rate_per_s: float = 40.0
    kill_every_s: tuple[float, float] = (5.0, 10.0)
    pod_kill_share: float = 0.4
    stop_s: float = 12.0  # SIGSTOP pause: lease TTL (6 s) twice over
    one_offs: tuple[str, ...] = ()
    ready_timeout_s: float = 240.0
    settle_timeout_s: float = 300.0  # after the last delivery, for the backlog to arrive
    quiet_s: float = 15.0  # then watch this long for late duplicates
    seed: int = 1

    @property
    def per_mailbox(self) -> int:
        return max(1, self.messages // self.mailboxes)

    @property
    def duration_s(self) -> float:
        return self.per_mailbox * self.mailboxes / self.rate_per_s


@dataclass
class StaleOwner:
    member: str
    pid: int
    leases_lost: int = 0
    fenced_errors: int = 0
    stale_publishes: int = 0


@dataclass
class ChaosReport:
    plan: ChaosPlan
    accounting: Accounting
    faults: FaultLog
    ready_s: float
    delivery_s: float
    settle_s: float
    ambiguous_appends: int
    proxy: str
    delivery_started_ms: int
    stale_owners: list[StaleOwner] = field(default_factory=list)


@dataclass
class ChaosServers:
    dovecot: Dovecot
    redis: AofRedis
    dsn: str
    pg: PgCluster | None
    log_dir: Path


Progress = Callable[[str], None]


def run_chaos(plan: ChaosPlan, servers: ChaosServers, progress: Progress = print) -> ChaosReport:
    rng = random.Random(plan.seed)
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(ProxyProcess(servers.dovecot.host, servers.dovecot.plain_port))
        pool = ChaosPool(servers.dsn, servers.redis.url, str(servers.dovecot.cafile),
                         servers.log_dir, imap_port=proxy.port,
                         timings=chaos_timings(plan.stop_s))  # fmt: skip
        stack.callback(pool.close)
        users = servers.dovecot.add_users(plan.mailboxes, prefix="chaos")
        pool.create_providers(users)
        for i in range(plan.pods):
            pool.start_pod(f"pod-{i + 1}")
        ready_s = _wait_ready(pool, plan, progress)
        deliverer = Deliverer(servers.dovecot, [u.name for u in users], plan.per_mailbox,
                              rate_per_s=plan.rate_per_s, rng=rng,
                              tag=secrets.token_hex(3))  # fmt: skip
        stack.callback(deliverer.stop)
        targets = Targets(pool, servers.dovecot, servers.redis, proxy, deliverer, servers.pg)
        injector = FaultInjector(
            targets, rng, duration_s=plan.duration_s, one_offs=plan.one_offs,
            kill_every_s=plan.kill_every_s, pod_kill_share=plan.pod_kill_share,
            stop_s=plan.stop_s,
        )  # fmt: skip
        stack.callback(injector.stop)
        reader = StreamReader(redis.Redis.from_url(servers.redis.url, socket_timeout=10))
        stack.callback(reader.client.close)
        progress(f"delivering {deliverer.total} messages at {plan.rate_per_s:g}/s "
                 f"(~{plan.duration_s:.0f} s) while faults are injected")  # fmt: skip
        t0 = time.monotonic()
        deliverer.start()
        injector.start()
        _watch_delivery(deliverer, reader, progress, plan.duration_s * 3 + 300)
        delivery_s = time.monotonic() - t0
        settle_s = _settle(deliverer, reader, plan, progress)
        injector.stop()
        result = account(deliverer.result.sent_ms, reader.entries, reader.dead_letters())
        return ChaosReport(
            plan, result, injector.log, ready_s, delivery_s, settle_s,
            deliverer.result.ambiguous, f"{proxy.stats}", deliverer.result.started_ms,
            _stale_owners(pool, injector),
        )  # fmt: skip
    raise AssertionError("unreachable")


def _wait_ready(pool: ChaosPool, plan: ChaosPlan, progress: Progress) -> float:
    """Every provider leased and its INBOX cursor recorded (first sync starts from now)."""
    started = time.monotonic()
    last = started
    while True:
        leased, cursors = pool.leased(), pool.cursors()
        if leased == cursors == plan.mailboxes:
            # Configs cached by the agents predate no cursor any more (provider_refresh_s).
            time.sleep(float(pool.settings.provider_refresh_s) + 1)
            took = time.monotonic() - started
            progress(f"all {plan.mailboxes} providers leased and synced in {took:.1f} s")
            return took
        now = time.monotonic()
        if now - started > plan.ready_timeout_s:
            raise RuntimeError(f"pool not ready after {plan.ready_timeout_s:.0f} s: "
                               f"{leased} leased, {cursors} cursors")  # fmt: skip
        if now - last > 10:
            last = now
            progress(f"  ... {leased} leased, {cursors} cursors after {now - started:.0f} s")
        time.sleep(0.5)


def _watch_delivery(
    deliverer: Deliverer, reader: StreamReader, progress: Progress, timeout_s: float
) -> None:
    """Until everything is delivered, or ``timeout_s``: then delivery stops and the
    report says how much was delivered (a run that cannot deliver still gets figures)."""
    started = time.monotonic()
    last = started
    while not deliverer.join(1.0):
        reader.poll()
        now = time.monotonic()
        if now - started > timeout_s:
            progress(f"delivery stopped after {timeout_s:.0f} s: {deliverer.delivered} "
                     f"of {deliverer.total} delivered")  # fmt: skip
            deliverer.stop()
            return
        if now - last >= 15:
            last = now
            progress(f"  ... {now - started:.0f} s: delivered {deliverer.delivered}, "
                     f"stream {len(reader.entries)}")  # fmt: skip


def _settle(
    deliverer: Deliverer, reader: StreamReader, plan: ChaosPlan, progress: Progress
) -> float:
    """Wait for every delivered Message-ID, then ``quiet_s`` more for late duplicates."""
    started = time.monotonic()
    want = set(deliverer.result.sent_ms)
    while time.monotonic() - started < plan.settle_timeout_s:
        reader.poll()
        if want <= reader.seen():
            break
        time.sleep(0.5)
    settle_s = time.monotonic() - started
    missing = len(want - reader.seen())
    progress(f"backlog settled in {settle_s:.1f} s ({missing} missing); "
             f"watching {plan.quiet_s:.0f} s for late duplicates")  # fmt: skip
    time.sleep(plan.quiet_s)
    while reader.poll() < 0:
        time.sleep(1)
    return settle_s


def _stale_owners(pool: ChaosPool, injector: FaultInjector) -> list[StaleOwner]:
    """What each SIGSTOPped worker did after SIGCONT.

    A ``published`` line for a provider it had not acquired again since resuming would be
    a write past its fence: the Lua fence and the epoch guard must both have refused it.
    """
    out = []
    for paused in injector.log.stopped:
        stale = StaleOwner(paused.member, paused.pid)
        reacquired: set[str] = set()
        entries = [e for e in pool.log_entries(paused.pod) if e.get("pid") == paused.pid]
        for entry in entries:
            if paused.resumed_wall == 0.0 or entry["t"] < paused.resumed_wall:
                continue
            event, provider = entry.get("event"), str(entry.get("provider_id", ""))
            if event == "lease_lost":
                stale.leases_lost += 1
            elif event == "session_error" and entry.get("error_type") == "FencedError":
                stale.fenced_errors += 1
            elif event == "lease_acquired":
                reacquired.add(provider)
            elif event == "published" and provider not in reacquired:
                stale.stale_publishes += 1
        out.append(stale)
    return out
