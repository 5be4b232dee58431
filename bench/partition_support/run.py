"""The partition run: faults in turn, mail delivered throughout, accounting per fault.

Each fault is one phase: a deliverer starts (every mailbox gets ``per_mailbox`` messages,
spread over the fault and the recovery after it), the fault is applied to one pod (or to
Redis), healed, and the phase ends when every provider is served again and every message
of the phase is in the stream, or at a deadline.  Then the whole stream and the pointer
queue are read again from the current primary, and each phase's Message-IDs are counted.

A consumer also tails the stream the whole time, as Alga's runtime does: after a lossy
failover the entries it already read can vanish from the primary and be published again,
which the final stream cannot show and a consumer would process twice.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from bench.chaos_support.account import StreamReader
from bench.chaos_support.deliver import Deliverer
from bench.partition_support.pool import PartitionPool, partition_timings
from bench.partition_support.servers import DEPENDENCIES, PartitionServers
from tests.harness.sentinel import FailoverReport

POINTER_QUEUE = "email:inbound:unified:pointer:ready"
LEAD_S = 3.0  # mail flows before each fault
TAIL_EVERY_S = 0.25
POLL_S = 0.5
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Fault:
    name: str
    title: str
    deps: tuple[str, ...] = ()  # cut on the target pod
    target: str = "pod-c"  # a pod name, or "leader"
    cut_s: float = 30.0
    flap_s: float = 0.0  # > 0: cut and heal alternately, every flap_s, for cut_s
    failover_window_s: float = 0.0  # > 0: a Redis failover losing this much of the writes


def faults(cut_s: float, flap_for_s: float) -> dict[str, Fault]:
    every = DEPENDENCIES
    return {f.name: f for f in (
        Fault("redis_cut", f"one pod cut off from Redis for {cut_s:.0f} s", ("redis",),
              cut_s=cut_s),
        Fault("postgres_cut", f"one pod cut off from PostgreSQL for {cut_s:.0f} s",
              ("postgres",), cut_s=cut_s),
        Fault("both_cut", "one pod cut off from Redis and PostgreSQL, IMAP left open",
              ("redis", "postgres"), cut_s=cut_s),
        Fault("leader_cut", "the leader's pod cut off from everything", every,
              target="leader", cut_s=cut_s),
        Fault("redis_failover", "Redis failover to a replica missing the last 3 s",
              failover_window_s=3.0, cut_s=0.0),
        Fault("flapping", f"one pod's links cut and healed every 2 s for {flap_for_s:.0f} s",
              every, cut_s=flap_for_s, flap_s=2.0),
        Fault("flapping_leader",
              f"the leader's pod's links cut and healed every 2 s for {flap_for_s:.0f} s",
              every, target="leader", cut_s=flap_for_s, flap_s=2.0),
        Fault("flapping_slow",
              f"one pod's links cut and healed every 7 s for {flap_for_s:.0f} s (past the TTL)",
              every, cut_s=flap_for_s, flap_s=7.0),
    )}  # fmt: skip


@dataclass
class Plan:
    faults: list[Fault]
    mailboxes: int = 300
    per_mailbox: int = 1
    pods: int = 3
    recovery_s: float = 60.0  # deadline after the heal
    seed: int = 1


@dataclass
class Counts:
    published: int = 0
    lost: int = 0
    duplicated: int = 0
    lost_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)


@dataclass
class StaleCheck:
    """What the cut-off pod's workers logged once they had given up a lease."""

    leases_lost: int = 0
    published_after_loss: int = 0
    published_while_cut: int = 0  # after cut + lease TTL, before the heal
    fenced: int = 0


@dataclass
class PhaseResult:
    fault: str
    title: str
    pod: str
    delivered: int = 0
    stream: Counts = field(default_factory=Counts)
    pointer: Counts = field(default_factory=Counts)
    consumer_duplicates: int = 0  # entries a tailing consumer read twice for one Message-ID
    # ... of which with an event_id it had not read before (a consumer deduping on
    # event_id, as Alga's runtime does, would process these twice)
    consumer_new_event_ids: int = 0
    takeover_s: float | None = None  # cut → every provider served by another pod
    recovered_s: float | None = None  # heal → every provider served, all mail published
    stale: StaleCheck = field(default_factory=StaleCheck)
    failover: dict[str, Any] = field(default_factory=dict)
    unserved: str = ""  # why the takeover did not complete during the fault, if it did not
    # How the takeover went: (seconds since the cut, why not served yet) at each change
    unserved_trail: list[tuple[float, str]] = field(default_factory=list)
    cut_at: str = ""
    heal_at: str = ""
    # IMAP sessions the cut-off pod still had open once others served all its providers
    stale_sessions_max: int = 0
    # What the PostgreSQL ledger says of each lost message: (Message-ID, status, stream id)
    ledger_of_lost: list[tuple[str, str, str]] = field(default_factory=list)
    # Every ledger row of each duplicated message: which provider, folder and UID published it
    ledger_of_duplicated: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        s, p, stale = self.stream, self.pointer, self.stale
        broken = (s.lost, s.duplicated, p.lost, p.duplicated, stale.published_after_loss,
                  stale.published_while_cut)  # fmt: skip
        return not any(broken) and self.recovered_s is not None


class Tail:
    """A consumer reading the stream as it grows, from whichever server is the primary."""

    def __init__(self, client: redis.Redis) -> None:
        self.reader = StreamReader(client)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tail", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TAIL_EVERY_S):
            self.reader.poll()

    def seen(self) -> Counter[str]:
        return Counter(mid for _, mid in self.reader.entries)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def read_stream(client: redis.Redis) -> Counter[str]:
    reader = StreamReader(client)
    while reader.poll() < 0:
        time.sleep(0.5)
    return Counter(mid for _, mid in reader.entries)


def read_pointers(client: redis.Redis) -> Counter[str]:
    out: Counter[str] = Counter()
    for raw in client.lrange(POINTER_QUEUE, 0, -1):
        job = orjson.loads(raw)
        out[str(job["pointer"].get("messageId", "")).strip("<>")] += 1
    return out


def count(sent: set[str], got: Counter[str]) -> Counts:
    lost = sorted(m for m in sent if got.get(m, 0) == 0)
    dups = sorted(m for m in sent if got.get(m, 0) > 1)
    return Counts(
        published=sum(got.get(m, 0) for m in sent), lost=len(lost),
        duplicated=sum(got[m] - 1 for m in dups), lost_ids=lost[:20], duplicated_ids=dups[:20],
    )  # fmt: skip


class PhaseRunner:
    def __init__(self, pool: PartitionPool, plan: Plan, tail: Tail, progress: Progress) -> None:
        self.pool = pool
        self.plan = plan
        self.tail = tail
        self.progress = progress
        self.rng = random.Random(plan.seed)
        self.ttl_s = pool.settings.lease_ttl_s
        self.sent_all: set[str] = set()
        self.ready_s = 0.0
        self._cutting = False

    def restore_redis(self) -> None:
        """After a failover: the old primary back as a replica, for the next failover."""
        if self.pool.servers.redis is not None:
            self.pool.servers.redis.restore_replica()

    def run(self, fault: Fault) -> PhaseResult:
        pod = self._target(fault)
        result = PhaseResult(fault.name, fault.title, pod if not fault.failover_window_s else "-")
        assert self.pool.servers.dovecot is not None
        span_s = max(fault.cut_s, 10.0) + 15.0
        users = list(self.pool.users.values())
        total = len(users) * self.plan.per_mailbox
        deliverer = Deliverer(self.pool.servers.dovecot, users, self.plan.per_mailbox,
                              rate_per_s=total / span_s, rng=self.rng, tag=fault.name)  # fmt: skip
        deliverer.start()
        time.sleep(LEAD_S)
        cut_wall = time.time()
        heal_wall = self._apply(fault, pod, result)
        result.cut_at, result.heal_at = _iso(cut_wall), _iso(heal_wall)
        heal_at = time.monotonic()
        sent_before_heal = set(deliverer.result.sent_ms)
        result.recovered_s = self._wait_recovered(sent_before_heal, heal_at)
        deliverer.join(span_s + 60)
        self._wait_published(set(deliverer.result.sent_ms), heal_at + self.plan.recovery_s + 30)
        time.sleep(3.0)  # a late duplicate would show up now
        self.sent_all |= set(deliverer.result.sent_ms)
        self.account(result, set(deliverer.result.sent_ms))
        if not fault.failover_window_s:
            silent = "redis" in fault.deps and not fault.flap_s  # no publish can succeed
            result.stale = self.stale_check(pod, cut_wall, heal_wall if silent else cut_wall)
        return result

    def _target(self, fault: Fault) -> str:
        if fault.target == "leader":
            leader = self.pool.leader_pod()
            assert leader is not None, "no leader"
            return leader
        return fault.target

    def _apply(self, fault: Fault, pod: str, result: PhaseResult) -> float:
        """Inject the fault; returns the wall time of the heal."""
        if fault.failover_window_s:
            assert self.pool.servers.redis is not None
            report: FailoverReport = self.pool.servers.redis.lossy_failover(fault.failover_window_s)
            result.failover = {"lost_replication_bytes": report.lost_bytes,
                               "sentinel_failover_s": round(report.took_s, 2)}  # fmt: skip
            self.progress(f"  failover: {report}")
            return time.time()
        net = self.pool.net(pod)
        started = time.monotonic()
        watch = threading.Thread(target=self._watch_takeover, args=(fault, pod, result, started),
                                 name="takeover", daemon=True)  # fmt: skip
        net.cut(*fault.deps)
        self._cutting = True
        watch.start()
        if fault.flap_s:
            flips = int(fault.cut_s / fault.flap_s)
            for i in range(1, flips):
                time.sleep(max(0.0, started + i * fault.flap_s - time.monotonic()))
                net.heal() if net.cut_now else net.cut(*fault.deps)
        time.sleep(max(0.0, started + fault.cut_s - time.monotonic()))
        net.heal()
        healed = time.time()  # before the join: a slow check under load must not move it
        self._cutting = False
        watch.join(30)
        return healed

    def _watch_takeover(self, fault: Fault, pod: str, result: PhaseResult, started: float) -> None:
        """While the cut lasts: when others serve all of ``pod``'s providers, and what it
        still has open at Dovecot then (not counted when its IMAP link is cut: Dovecot
        never hears of a close it cannot receive)."""
        while self._cutting:
            try:
                self._check_takeover(fault, pod, result, started)
            except Exception as exc:  # a slow doveadm under load: try again next round
                result.unserved = f"check failed: {type(exc).__name__}"
            time.sleep(POLL_S)

    def _check_takeover(self, fault: Fault, pod: str, result: PhaseResult, started: float) -> None:
        if result.takeover_s is None:
            result.unserved = self._unserved(frozenset({pod}))
            trail = result.unserved_trail
            if result.unserved and (not trail or trail[-1][1] != result.unserved):
                trail.append((round(time.monotonic() - started, 1), result.unserved))
                del trail[:-20]
            if not result.unserved and self._cutting:
                result.takeover_s = round(time.monotonic() - started, 1)
        elif not fault.flap_s and "imap" not in fault.deps:
            stale = self.pool.sessions_of(pod)
            result.stale_sessions_max = max(result.stale_sessions_max, stale)

    def _unserved(self, exclude: frozenset[str]) -> str:
        try:
            return self.pool.unserved(exclude)
        except redis.RedisError as exc:
            return f"Redis: {type(exc).__name__}"

    def _wait_recovered(self, sent: set[str], heal_at: float) -> float | None:
        deadline = heal_at + self.plan.recovery_s
        while time.monotonic() < deadline:
            try:
                if self.pool.served() and not [m for m in sent if m not in self.tail.seen()]:
                    return round(time.monotonic() - heal_at, 1)
            except redis.RedisError:
                pass
            time.sleep(POLL_S)
        return None

    def _wait_published(self, sent: set[str], deadline: float) -> None:
        while time.monotonic() < deadline:
            seen = self.tail.seen()
            if all(m in seen for m in sent):
                return
            time.sleep(POLL_S)

    def account(self, result: PhaseResult, sent: set[str]) -> None:
        result.delivered = len(sent)
        result.stream = count(sent, read_stream(self.pool.redis))
        result.pointer = count(sent, read_pointers(self.pool.redis))
        seen = self.tail.seen()
        result.consumer_duplicates = sum(seen[m] - 1 for m in sent if seen.get(m, 0) > 1)
        ids = self.tail.reader.event_ids
        result.consumer_new_event_ids = sum(len(ids[m]) - 1 for m in sent if seen.get(m, 0) > 1)
        if result.stream.lost:
            result.ledger_of_lost = self.ledger_rows(result.stream.lost_ids)
        if result.stream.duplicated or result.pointer.duplicated:
            dups = sorted(set(result.stream.duplicated_ids) | set(result.pointer.duplicated_ids))
            result.ledger_of_duplicated = self.ledger_detail(dups)

    def ledger_rows(self, mids: list[str]) -> list[tuple[str, str, str]]:
        import psycopg

        with psycopg.connect(self.pool.settings.database_url) as conn:
            rows = conn.execute(
                "SELECT message_id, status, coalesce(stream_id, '') FROM shardworker_ledger "
                "WHERE tenant = %s AND message_id = ANY(%s) ORDER BY message_id",
                (self.pool.tenant, [f"<{m}>" for m in mids] + mids),
            ).fetchall()
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def ledger_detail(self, mids: list[str]) -> list[tuple[str, ...]]:
        import psycopg

        with psycopg.connect(self.pool.settings.database_url) as conn:
            rows = conn.execute(
                "SELECT message_id, provider_id::text, folder, uid::text, status, "
                "coalesce(stream_id, ''), published_at::text FROM shardworker_ledger "
                "WHERE tenant = %s AND message_id = ANY(%s) ORDER BY message_id, uid",
                (self.pool.tenant, [f"<{m}>" for m in mids] + mids),
            ).fetchall()
        return [tuple(str(v) for v in row) for row in rows]

    def stale_check(self, pod: str, cut_wall: float, heal_wall: float) -> StaleCheck:
        return stale_check(self.pool.log_entries(pod), cut_wall, heal_wall, self.ttl_s)


@dataclass
class RunReport:
    plan: Plan
    phases: list[PhaseResult]
    ready_s: float
    total: PhaseResult
    loadavg: str = ""

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.phases) and self.total.ok


@contextmanager
def partition_pool(plan: Plan, log_dir: Path, progress: Progress = print) -> Iterator[PhaseRunner]:
    """Servers, providers and pods up, every provider served, a consumer tailing the stream."""
    servers = PartitionServers().start()
    pool: PartitionPool | None = None
    tail: Tail | None = None
    try:
        assert servers.dovecot is not None
        progress(f"servers up; service address {servers.net.service_addr}")
        pool = PartitionPool(servers, log_dir, partition_timings())
        pool.create_providers(servers.dovecot.add_users(plan.mailboxes, prefix="part"))
        for i in range(plan.pods):
            pool.start_pod(f"pod-{chr(ord('a') + i)}")
        ready_s = _wait(pool.served, 180, "every provider served once")
        progress(f"{plan.mailboxes} providers served by {plan.pods} pods in {ready_s:.1f}s")
        tail = Tail(pool.redis)
        tail.start()
        runner = PhaseRunner(pool, plan, tail, progress)
        runner.ready_s = ready_s
        yield runner
    finally:
        if tail is not None:
            tail.stop()
        if pool is not None:
            pool.close()
        servers.close()


def run_partitions(plan: Plan, log_dir: Path, progress: Progress = print) -> RunReport:
    with partition_pool(plan, log_dir, progress) as runner:
        phases = []
        for fault in plan.faults:
            progress(f"fault {fault.name}: {fault.title}")
            phases.append(runner.run(fault))
            progress(f"  {phase_line(phases[-1])}")
            if fault.failover_window_s:
                runner.restore_redis()
        total = PhaseResult("total", "every message of the run", "-")
        runner.account(total, runner.sent_all)
        total.recovered_s = max((p.recovered_s or 0.0 for p in phases), default=0.0)
        with open("/proc/loadavg") as f:
            load = f.read().strip()
        return RunReport(plan, phases, runner.ready_s, total, load)


def stale_check(
    entries: Iterable[dict[str, Any]], cut_wall: float, heal_wall: float, ttl_s: float
) -> StaleCheck:
    """Per worker pid: a ``published`` line for a provider it had given up is stale.

    A ``published`` line is written after the checkpoint, which can come much later than
    the XADD (a PostgreSQL cut holds it): it is dated by its first stream id, the moment
    Redis accepted the publish, so a publish made under the lease and checkpointed after a
    give-up (the epoch still the owner's) is not counted."""
    out = StaleCheck()
    owned: dict[int, set[str]] = {}
    for e in sorted(entries, key=_event_time):
        pid, event, provider = e.get("pid", 0), e.get("event"), str(e.get("provider_id", ""))
        mine = owned.setdefault(pid, set())
        at = _event_time(e)
        if event == "lease_acquired":
            mine.add(provider)
        elif event in ("lease_lost", "provider_dropped"):
            out.leases_lost += event == "lease_lost" and cut_wall <= at
            mine.discard(provider)
        elif event == "session_error" and e.get("error_type") == "FencedError":
            out.fenced += cut_wall <= at
        elif event == "published" and at >= cut_wall:
            out.published_after_loss += provider not in mine
            out.published_while_cut += cut_wall + ttl_s < at < heal_wall
    return out


def _event_time(entry: dict[str, Any]) -> float:
    """A log entry's time; a ``published`` line's is its first XADD's (the stream id)."""
    stream_id = entry.get("first_stream_id") if entry.get("event") == "published" else None
    if isinstance(stream_id, str) and "-" in stream_id:
        return int(stream_id.split("-", 1)[0]) / 1000
    return float(entry["t"])


def _iso(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(wall)) + f".{int(wall * 1000) % 1000:03d}"


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if predicate():
                return time.monotonic() - started
        except redis.RedisError:
            pass
        time.sleep(POLL_S)
    raise AssertionError(f"{what}: not within {timeout_s}s")


def phase_line(p: PhaseResult) -> str:
    return (
        f"delivered {p.delivered}, stream {p.stream.published} (lost {p.stream.lost}, dup "
        f"{p.stream.duplicated}), pointer {p.pointer.published} (lost {p.pointer.lost}, dup "
        f"{p.pointer.duplicated}), consumer dups {p.consumer_duplicates} (new event_id "
        f"{p.consumer_new_event_ids}), takeover "
        f"{p.takeover_s}s, recovered {p.recovered_s}s, stale publishes "
        f"{p.stale.published_after_loss + p.stale.published_while_cut}, stale sessions "
        f"{p.stale_sessions_max} (cut {p.cut_at}, heal {p.heal_at} UTC)"
        + (f"; before the heal: {p.unserved}" if p.takeover_s is None and p.unserved else "")
        + (f"; takeover trail: {p.unserved_trail[-3:]}" if p.unserved_trail else "")
        + (f"; ledger of lost: {p.ledger_of_lost[:3]}" if p.ledger_of_lost else "")
        + (f"; ledger of duplicated: {p.ledger_of_duplicated}" if p.ledger_of_duplicated else "")
    )
