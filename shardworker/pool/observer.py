"""The coordinator's view of its pod, for ``/healthz``, ``/readyz`` and ``/metrics``.

Three threads meet here, and each only writes its own fields:

* the supervisor's loop calls :meth:`PodObserver.tick` every second: that is the liveness
  heartbeat, and where reaped workers are marked dead for the multiprocess metrics;
* the observer's own thread probes Redis and PostgreSQL every second (short timeouts),
  samples the stream, the consumer groups and each local member's heartbeat and share, and,
  on the leader, the paused providers every few seconds (logging pauses and resumes);
* HTTP handler threads read the latest results and never block on a dependency.

Liveness covers the coordinator loop and its workers only; readiness adds membership,
leases, Redis and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from psycopg_pool import ConnectionPool

from shardworker import metrics
from shardworker.config import Settings
from shardworker.db.store import Store
from shardworker.errors import ShardworkerError
from shardworker.http import HttpEndpoint, Routes, Verdict
from shardworker.logs import get_logger
from shardworker.metrics.pod import (
    LeaderSample,
    PodCollector,
    PodSample,
    ProcessSample,
    StreamSample,
    WorkerSample,
)
from shardworker.pool.leader import Leader
from shardworker.pool.registry import Registry
from shardworker.pool.supervisor import Supervisor, SupervisorStats
from shardworker.redisconn import redis_client
from shardworker.sink.redis_streams import WORKFLOW_STREAM, RedisStreamsSink

log = get_logger(__name__)

PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 2.0
PAUSED_EVERY_S = 5.0
# The supervisor ticks every second; this much silence means its loop is stuck.
TICK_STALE_S = 10.0
# A slot without a ready worker for this long fails liveness (a boot takes seconds).
WORKER_DOWN_S = 90.0
# Readiness trusts probe results this old at most.
PROBE_STALE_S = 5.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Probe:
    at: float
    redis_ok: bool
    db_ok: bool
    live_members: frozenset[str] = frozenset()
    assigned: dict[str, int] = field(default_factory=dict)
    held: dict[int, int] = field(default_factory=dict)


class PodObserver:
    def __init__(
        self, settings: Settings, supervisor: Supervisor, leader: Leader, pool: ConnectionPool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.supervisor = supervisor
        self.leader = leader
        self.clock = clock
        self.store = Store(pool)
        self._pool = pool
        self._redis = redis_client(settings, timeout_s=PROBE_TIMEOUT_S)
        self._registry = Registry(self._redis)
        # The pod samples Alga's stream itself, whichever sink the workers write to.
        self._stream_sink = RedisStreamsSink(self._redis, settings)
        self._stats: SupervisorStats | None = None
        self._last_tick: float | None = None
        self._unready_since: dict[int, float] = {}
        self._pids: set[int] = set()
        self._probe: Probe | None = None
        self._stream: StreamSample | None = None
        self._paused: dict[str, int] | None = None
        self._paused_ids: dict[str, str] | None = None
        self._paused_at = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.http = HttpEndpoint(
            settings.metrics_addr,
            Routes(metrics=self.render, liveness=self.liveness, readiness=self.readiness),
        )

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.http.start()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.http.stop(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._redis.close()

    # -- supervisor thread ---------------------------------------------------------------

    def tick(self) -> None:
        now = self.clock()
        stats = self.supervisor.stats()
        pids = {s.pid for s in stats.slots if s.pid is not None}
        for gone in self._pids - pids:
            metrics.mark_process_dead(gone)
        self._pids = pids
        for slot in stats.slots:
            if slot.ready:
                self._unready_since.pop(slot.index, None)
            else:
                self._unready_since.setdefault(slot.index, now)
        self._stats = stats
        self._last_tick = now

    # -- health --------------------------------------------------------------------------

    def liveness(self) -> Verdict:
        now, problems = self.clock(), []
        if self._last_tick is None or now - self._last_tick > TICK_STALE_S:
            problems.append("coordinator loop is not ticking")
        stats = self._stats
        if stats is not None and not stats.draining:
            for index, since in sorted(self._unready_since.copy().items()):
                if now - since > WORKER_DOWN_S:
                    problems.append(f"worker {index} not ready for {now - since:.0f}s")
        return Verdict(not problems, tuple(problems))

    def readiness(self) -> Verdict:
        stats, probe = self._stats, self._probe
        if stats is None or stats.draining:
            return Verdict(False, ("starting" if stats is None else "draining",))
        problems = [f"worker {s.index} not ready" for s in stats.slots if not s.ready]
        if probe is None or self.clock() - probe.at > PROBE_STALE_S:
            problems.append("dependency probes are stale")
        else:
            problems += self._probe_problems(stats, probe)
        return Verdict(not problems, tuple(problems))

    def _probe_problems(self, stats: SupervisorStats, probe: Probe) -> list[str]:
        problems = []
        if not probe.redis_ok:
            problems.append("redis unreachable")
        if not probe.db_ok:
            problems.append("database unreachable")
        for slot in stats.slots:
            member = self._member(slot.index)
            if probe.redis_ok and slot.ready and member not in probe.live_members:
                problems.append(f"worker {slot.index} is not heartbeating")
            assigned = probe.assigned.get(member, 0)
            if assigned and slot.pid is not None and not probe.held.get(slot.pid, 0):
                problems.append(f"worker {slot.index} holds no lease of {assigned} assigned")
        return problems

    def _member(self, index: int) -> str:
        return f"{self.settings.identity}/{index}"

    # -- observer thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self.clock()
            try:
                self.probe_once()
            except Exception:
                log.error("observer_probe_crashed", exc=True)
            self._stop.wait(max(0.0, PROBE_EVERY_S - (self.clock() - started)))

    def probe_once(self) -> None:
        db_ok = self._probe_db()
        redis_ok, live, assigned = self._probe_redis()
        if redis_ok:
            self._stream = self._sample_stream()
        self._probe = Probe(
            at=self.clock(), redis_ok=redis_ok, db_ok=db_ok, live_members=live,
            assigned=assigned, held=metrics.leases_held_by_pid(),
        )  # fmt: skip
        if db_ok:
            self._sample_paused()

    def _probe_db(self) -> bool:
        try:
            # The pool checks a connection on checkout (and reconnects): that is the probe.
            with self._pool.connection(timeout=PROBE_TIMEOUT_S):
                return True
        except Exception:
            return False

    def _probe_redis(self) -> tuple[bool, frozenset[str], dict[str, int]]:
        stats = self._stats
        count = len(stats.slots) if stats is not None else 0
        try:
            live = frozenset(self._registry.live_members(self.settings.member_grace_s))
            assigned = {}
            for index in range(count):
                share = self._registry.member_assignment(self._member(index))
                assigned[self._member(index)] = len(share.providers) if share else 0
        except redis.RedisError:
            return False, frozenset(), {}
        return True, live, assigned

    def _sample_stream(self) -> StreamSample | None:
        try:
            groups = self._redis.xinfo_groups(WORKFLOW_STREAM)
        except redis.ResponseError:
            groups = []  # no stream yet
        except redis.RedisError:
            return None
        try:
            return StreamSample(
                length=self._stream_sink.stream_length(),
                dead_letter_length=int(self._redis.xlen(self.settings.dlq_stream)),
                group_lag={_text(g["name"]): self._group_lag(g) for g in groups},
                backlog=self._stream_sink.backlog(),
                max_lag=self.settings.backpressure_max_lag,
            )
        except (redis.RedisError, ShardworkerError):
            return None

    def _group_lag(self, group: dict[str, object]) -> int:
        lag = group.get("lag")
        if isinstance(lag, int):
            return lag
        # Redis leaves lag out when deletions make it uncertain: the publisher's estimate.
        info = self._redis.xinfo_stream(WORKFLOW_STREAM)
        added, read = info.get("entries-added"), group.get("entries-read")
        if not isinstance(added, int) or not isinstance(read, int):
            return int(info["length"])
        return max(0, min(int(info["length"]), added - read))

    def _sample_paused(self) -> None:
        if not self.leader.stats.is_leader:
            self._paused = self._paused_ids = None
            return
        now = self.clock()
        if now - self._paused_at < PAUSED_EVERY_S:
            return
        self._paused_at = now
        try:
            providers = self.store.load_providers()
        except ShardworkerError:
            return
        paused = {p.provider_id: _pause_reason(p.pause_reason) for p in providers if p.paused}
        self._log_pause_changes(paused)
        self._paused_ids = paused
        self._paused = dict(Counter(paused.values()))

    def _log_pause_changes(self, paused: dict[str, str]) -> None:
        before = self._paused_ids
        if before is None:
            return  # a new leader has nothing to compare with
        for pid in sorted(paused.keys() - before.keys()):
            log.warning("provider_paused", provider_id=pid, reason=paused[pid])
        for pid in sorted(before.keys() - paused.keys()):
            log.info("provider_resumed", provider_id=pid)

    # -- metrics -------------------------------------------------------------------------

    def render(self) -> bytes:
        return metrics.render(PodCollector(self.sample))

    def sample(self) -> PodSample:
        stats, probe = self._stats, self._probe
        slots = stats.slots if stats is not None else ()
        workers = [WorkerSample(s.index, s.pid, s.ready, s.restarts, s.hung_kills) for s in slots]
        processes = [_process("coordinator", os.getpid())]
        processes += [_process(f"worker-{s.index}", s.pid) for s in slots if s.pid is not None]
        ls = self.leader.stats
        leader = LeaderSample(
            is_leader=ls.is_leader, transitions=ls.transitions, members=ls.members,
            providers=ls.providers, unowned=ls.unowned, imbalance=ls.imbalance,
            moves=dict(ls.moves),
        )  # fmt: skip
        deps = {"redis": bool(probe and probe.redis_ok), "postgres": bool(probe and probe.db_ok)}
        return PodSample(
            workers=workers,
            processes=[p for p in processes if p is not None],
            leader=leader,
            stream=self._stream,
            paused=self._paused if ls.is_leader else None,
            dependencies=deps,
        )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pause_reason(reason: str | None) -> str:
    return reason if reason in metrics.PAUSE_REASONS else "other"


def _process(name: str, pid: int) -> ProcessSample | None:
    """CPU, memory and descriptors of one process, from /proc (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # Fields after the command name, which may itself contain spaces.
            fields = f.read().rsplit(b")", 1)[1].split()
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except PermissionError:  # a non-dumpable worker's fd table is private (childproc)
            fds = 0
        with open(f"/proc/{pid}/limits") as f:
            limit = next(line for line in f if line.startswith("Max open files")).split()[3]
    except (OSError, StopIteration, IndexError):
        return None
    with contextlib.suppress(ValueError):
        return ProcessSample(
            name=name,
            cpu_s=(int(fields[11]) + int(fields[12])) / _CLK_TCK,
            rss_bytes=int(fields[21]) * _PAGE,
            open_fds=fds,
            max_fds=int(limit) if limit.isdigit() else 0,
        )
    return None
