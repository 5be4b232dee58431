"""The fault timeline: periodic SIGKILLs of workers and pods, plus one-off server faults.

Every ``kill_every_s`` (uniform in the range) a random worker, or with probability
``pod_kill_share`` a whole pod, is SIGKILLed.  A killed worker is replaced by its pod's
supervisor; a killed pod is started again here after 1-3 s (at most one pod is down at a
time, so a 2-pod run is never a plain outage).  One-off faults are spread evenly over
the run:

``sigstop``         SIGSTOP a worker for ``stop_s`` (past its lease TTL), then SIGCONT
``dovecot``         crash Dovecot (SIGKILL of its process group) and start it again
``redis``           SIGKILL redis-server, 2 s down, start it on the same AOF
``postgres``        ``pg_ctl restart -m immediate``
``proxy_cut``       reset every worker ↔ Dovecot connection
``proxy_blackhole`` forward nothing for 8 s (beyond the IMAP timeout)
``proxy_delay``     hold every chunk 300 ms, for 10 s
``proxy_drop``      reset every connection and refuse new ones for 3 s
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.chaos_support.deliver import Deliverer
from bench.chaos_support.pool import ChaosPool, signal_pid
from bench.chaos_support.servers import AofRedis, PgCluster
from tests.faultproxy import ProxyProcess
from tests.harness.dovecot import Dovecot, DovecotError

ONE_OFFS = ("sigstop", "dovecot", "redis", "postgres", "proxy_cut", "proxy_blackhole",
            "proxy_delay", "proxy_drop")  # fmt: skip
TICK_S = 0.1
SELF_EXIT_RESTART_S = 1.0
DOVECOT_START_ATTEMPTS = 5


@dataclass
class FaultEvent:
    at_s: float
    kind: str
    detail: str
    took_s: float = 0.0
    error: str = ""


@dataclass
class Stopped:
    pod: str
    member: str
    pid: int
    resume_at: float
    stopped_wall: float
    resumed_wall: float = 0.0


@dataclass
class Targets:
    """What the faults act on; ``pg`` is None when PostgreSQL is not ours to restart."""

    pool: ChaosPool
    dovecot: Dovecot
    redis: AofRedis
    proxy: ProxyProcess
    deliverer: Deliverer
    pg: PgCluster | None = None


@dataclass
class FaultLog:
    events: list[FaultEvent] = field(default_factory=list)
    worker_kills: int = 0
    pod_kills: int = 0
    self_exits: int = 0  # pods that exited on their own (restarted like the kubelet would)
    stopped: list[Stopped] = field(default_factory=list)


class FaultInjector:
    def __init__(
        self, targets: Targets, rng: random.Random, *, duration_s: float,
        one_offs: tuple[str, ...], kill_every_s: tuple[float, float], pod_kill_share: float,
        stop_s: float,
    ) -> None:  # fmt: skip
        self.t = targets
        self.rng = rng
        self.duration_s = duration_s
        self.kill_every_s = kill_every_s
        self.pod_kill_share = pod_kill_share
        self.stop_s = stop_s
        step = duration_s / (len(one_offs) + 1)
        self.pending = [(step * (i + 1), kind) for i, kind in enumerate(one_offs)]
        self.log = FaultLog()
        self._down: dict[str, float] = {}  # killed pod → restart time
        self._paused: Stopped | None = None
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """End the run: pods are restarted and stopped workers resumed."""
        self._stop.set()
        self._thread.join(120)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    # -- timeline ------------------------------------------------------------------------

    def _run(self) -> None:
        """Faults while delivering (at least ``duration_s``); then pods are only kept alive."""
        next_kill = self._t0 + self.rng.uniform(*self.kill_every_s)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self._reap_exited(now)
                self._restore(now, force=False)
                if self.pending and self._now() >= self.pending[0][0]:
                    self._one_off(self.pending.pop(0)[1])
                if now >= next_kill and self._faulting():
                    self._periodic_kill()
                    next_kill = now + self.rng.uniform(*self.kill_every_s)
                self._stop.wait(TICK_S)
            for _, kind in self.pending:  # a run cut short still gets every one-off
                self._one_off(kind)
        finally:
            self._restore(time.monotonic(), force=True)

    def _reap_exited(self, now: float) -> None:
        """A pod that exited by itself is started again, as the kubelet would."""
        for name, pod in self.t.pool.pods.items():
            code = pod.proc.poll() if pod.proc is not None else None
            if code is None or name in self._down:
                continue
            self.log.self_exits += 1
            self.log.events.append(
                FaultEvent(round(self._now(), 1), "pod_exited", f"{name} exit {code}")
            )
            self._down[name] = now + SELF_EXIT_RESTART_S

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _faulting(self) -> bool:
        """Kills go on for the planned duration, and longer while delivery lags behind."""
        return self._now() < self.duration_s or not self.t.deliverer.finished

    def _record(self, kind: str, action: Callable[[], str]) -> None:
        event = FaultEvent(round(self._now(), 1), kind, "")
        started = time.monotonic()
        try:
            event.detail = action()
        except Exception as exc:  # reported with the figures; the run goes on
            event.error = f"{type(exc).__name__}: {exc}"
        event.took_s = round(time.monotonic() - started, 2)
        self.log.events.append(event)

    def _restore(self, now: float, *, force: bool) -> None:
        for name, when in list(self._down.items()):
            if force or now >= when:
                del self._down[name]
                self._record("pod_restart", lambda n=name: self._start_pod(n))  # type: ignore[misc]
        paused = self._paused
        if paused is not None and (force or now >= paused.resume_at):
            self._paused = None
            self._record("sigcont", lambda: self._resume(paused))

    def _start_pod(self, name: str) -> str:
        self.t.pool.start_pod(name)
        return name

    def _resume(self, paused: Stopped) -> str:
        paused.resumed_wall = time.time()
        alive = signal_pid(paused.pid, signal.SIGCONT)
        return f"{paused.member} pid {paused.pid}" + ("" if alive else " (gone)")

    # -- periodic kills ------------------------------------------------------------------

    def _periodic_kill(self) -> None:
        busy = set(self._down) | ({self._paused.pod} if self._paused else set())
        candidates = [n for n in self.t.pool.alive_pods() if n not in busy]
        if not self._down and candidates and self.rng.random() < self.pod_kill_share:
            name = self.rng.choice(candidates)
            self._record("pod_kill", lambda: self._kill_pod(name))
            return
        self._record("worker_kill", lambda: self._kill_worker(busy))

    def _kill_pod(self, name: str) -> str:
        self.t.pool.pods[name].kill()
        self.log.pod_kills += 1
        self._down[name] = time.monotonic() + self.rng.uniform(1.0, 3.0)
        return name

    def _kill_worker(self, busy: set[str]) -> str:
        picked = self.t.pool.random_worker(self.rng, busy)
        if picked is None:
            return "no live worker"
        member, pid = picked
        if signal_pid(pid, signal.SIGKILL):
            self.log.worker_kills += 1
        return f"{member} pid {pid}"

    # -- one-offs ------------------------------------------------------------------------

    def _one_off(self, kind: str) -> None:
        actions: dict[str, Callable[[], str]] = {
            "sigstop": self._sigstop,
            "dovecot": self._restart_dovecot,
            "redis": self._restart_redis,
            "postgres": self._restart_postgres,
            "proxy_cut": lambda: f"{self.t.proxy.cut()} connections reset",
            "proxy_blackhole": lambda: self._proxy(lambda: self.t.proxy.blackhole(8), "8 s"),
            "proxy_delay": lambda: self._proxy(
                lambda: self.t.proxy.delay(0.3, for_s=10), "300 ms for 10 s"
            ),
            "proxy_drop": lambda: f"{self.t.proxy.drop(3)} reset, new refused for 3 s",
        }
        self._record(kind, actions[kind])

    @staticmethod
    def _proxy(action: Callable[[], None], detail: str) -> str:
        action()
        return detail

    def _sigstop(self) -> str:
        busy = set(self._down)
        picked = self.t.pool.random_worker(self.rng, busy)
        if picked is None:
            raise RuntimeError("no live worker to stop")
        member, pid = picked
        signal_pid(pid, signal.SIGSTOP)
        paused = Stopped(member.split("/")[0], member, pid, time.monotonic() + self.stop_s,
                         time.time())  # fmt: skip
        self._paused = paused
        self.log.stopped.append(paused)
        return f"{member} pid {pid} for {self.stop_s:.0f} s"

    def _restart_dovecot(self) -> str:
        with self.t.deliverer.pause:  # no APPEND in flight across the crash
            try:
                self.t.dovecot.restart(graceful=False)
            except DovecotError as exc:
                # A child of the killed instance can hold a socket a moment longer
                # ("Dovecot is already running?"): start again, as an init system would.
                return f"crash + start, retried: {self._start_dovecot(exc)}"
        return "crash + start"

    def _start_dovecot(self, first: DovecotError) -> str:
        for attempt in range(1, DOVECOT_START_ATTEMPTS + 1):
            time.sleep(1.0)
            try:
                self.t.dovecot.start()
            except DovecotError:
                continue
            return f"up after {attempt} more attempt(s)"
        raise first

    def _restart_redis(self) -> str:
        self.t.redis.restart(down_s=2.0)
        return "SIGKILL, 2 s down, AOF reload"

    def _restart_postgres(self) -> str:
        if self.t.pg is None:
            return "skipped: not a private cluster"
        self.t.pg.restart()
        return "pg_ctl restart -m immediate"
