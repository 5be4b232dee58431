"""The coordinator's process supervisor: W worker processes in stable slots.

Modelled on gunicorn's arbiter and uvicorn's multiprocess supervisor, and it does nothing
else:

* Signal handlers only queue the signal and wake the loop through a self-pipe; the main
  loop handles what arrived.
* A worker that dies is restarted in the same slot (same index, new pid).  One that was
  ready and keeps dying is restarted with capped exponential backoff, never in a tight loop.
* A ready worker must answer pings over its pipe; one that stays silent for
  ``ping_timeout_s`` (stopped, wedged) is SIGKILLed and replaced in the same slot.
* A worker that exits with ``WORKER_BOOT_ERROR`` before it reported ready halts the pod
  (``HALTED``) instead of crash-looping: a bad setting will not fix itself.
* The first SIGTERM/SIGINT drains: no more restarts, SIGTERM to every worker, a bounded
  wait, then SIGKILL for stragglers.  A second one SIGKILLs everything at once.

Children are reaped by pid (``Process.exitcode`` is ``waitpid(pid, WNOHANG)``) rather than
``waitpid(-1)``: reaping a multiprocessing child behind its back leaves ``is_alive()`` true
forever and would let multiprocessing signal a recycled pid later.  Stray zombies are the
container init's job (tini).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from types import FrameType
from typing import Any

from shardworker.exitcodes import ExitCode
from shardworker.logs import get_logger
from shardworker.pool.childproc import PING, READY, ChildChannel, run_child

log = get_logger(__name__)

Target = Callable[[int, ChildChannel], int]
SignalHandler = Callable[[int, FrameType | None], Any] | int | None

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_BACKOFF_BASE_S = 0.5
_MAX_WAIT_S = 1.0
# A SIGKILLed process exits at once; the bound only guards against a stuck kernel.
_KILL_WAIT_S = 5.0
# A worker sending more than this between two loop turns is misbehaving; read the rest later.
_MAX_MESSAGES_PER_TURN = 64


def restart_delay_s(failures: int, cap_s: float, base_s: float = _BACKOFF_BASE_S) -> float:
    """Delay before the next restart after ``failures`` consecutive crashes.

    The first crash restarts at once (a healthy worker killed once should come straight
    back); after that the delay doubles from ``base_s`` up to ``cap_s``.
    """
    if failures <= 1:
        return 0.0
    return float(min(cap_s, base_s * 2 ** min(failures - 2, 32)))


@dataclass(frozen=True)
class SlotStats:
    index: int
    pid: int | None
    ready: bool
    restarts: int
    hung_kills: int
    # multiprocessing's convention: negative means killed by that signal.
    last_exit_code: int | None


@dataclass(frozen=True)
class SupervisorStats:
    slots: tuple[SlotStats, ...]
    draining: bool


class _Slot:
    """One stable worker index and whatever process currently fills it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: SpawnProcess | None = None
        self.conn: Connection | None = None
        self.pid: int | None = None
        self.spawned_at = 0.0
        self.ready_at: float | None = None
        self.last_seen = 0.0
        self.hung = False
        self.failures = 0
        self.restart_at: float | None = None
        self.restarts = 0
        self.hung_kills = 0
        self.last_exit_code: int | None = None


class Supervisor:
    def __init__(
        self,
        worker_count: int,
        target: Target,
        *,
        pod_identity: str = "",
        ping_interval_s: float = 1.0,
        ping_timeout_s: float = 5.0,
        boot_timeout_s: float = 60.0,
        drain_deadline_s: float = 20.0,
        restart_backoff_max_s: float = 30.0,
        on_tick: Callable[[], None] | None = None,
        tick_interval_s: float = 1.0,
    ) -> None:
        if worker_count < 1:
            raise ValueError("worker_count must be at least 1")
        try:
            pickle.dumps(target)
        except Exception as exc:
            raise ValueError("target must be a picklable top-level function") from exc
        self.target = target
        self.pod_identity = pod_identity
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.boot_timeout_s = boot_timeout_s
        self.drain_deadline_s = drain_deadline_s
        self.restart_backoff_max_s = restart_backoff_max_s
        self.on_tick = on_tick
        self.tick_interval_s = tick_interval_s
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(worker_count)]
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop_result: ExitCode | None = None
        self._drain_started = 0.0
        self._result: ExitCode | None = None
        self._next_ping = 0.0
        self._next_tick = 0.0

    # -- public ------------------------------------------------------------------------

    def run(self) -> int:
        previous = self.install_signal_handlers()
        try:
            self.spawn_workers()
            while self._result is None:
                self._run_once()
            return self._result
        finally:
            if self._stop_result is None:
                self._stop_result = ExitCode.FAILURE
            self.kill_workers()
            self.restore_signal_handlers(previous)
            self._close_wake_pipe()

    def handle_signal(self, signum: int, frame: FrameType | None) -> None:
        """No logging, just queue (gunicorn): the main loop does the work."""
        # SIGCHLD storms collapse: one queued SIGCHLD reaps every dead child.
        if signum != signal.SIGCHLD or signum not in self._signals:
            self._signals.append(signum)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def stats(self) -> SupervisorStats:
        slots = tuple(
            SlotStats(
                index=s.index,
                pid=s.pid,
                ready=s.ready_at is not None,
                restarts=s.restarts,
                hung_kills=s.hung_kills,
                last_exit_code=s.last_exit_code,
            )
            for s in self._slots
        )
        return SupervisorStats(slots=slots, draining=self._stop_result is not None)

    # -- signals -----------------------------------------------------------------------

    def install_signal_handlers(self) -> dict[int, SignalHandler]:
        return {sig: signal.signal(sig, self.handle_signal) for sig in HANDLED_SIGNALS}

    def restore_signal_handlers(self, previous: dict[int, SignalHandler]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def handle_signals(self) -> None:
        while self._signals and self._result is None:
            signum = self._signals.pop(0)
            if signum == signal.SIGCHLD:
                self.reap_workers()
            elif signum in _STOP_SIGNALS and self._stop_result is None:
                self.begin_stop(ExitCode.OK, reason=signal.Signals(signum).name)
            elif signum in _STOP_SIGNALS:
                self.abort_stop(signal.Signals(signum).name)

    # -- main loop ---------------------------------------------------------------------

    def _run_once(self) -> None:
        self.wait_for_events(self._next_timeout())
        self.handle_signals()
        if self._result is not None:
            return
        self.reap_workers()
        self.read_messages()
        now = time.monotonic()
        if self._stop_result is None:
            self.ping_workers(now)
            self.kill_hung_workers(now)
            self.restart_workers(now)
        else:
            self.check_drain(now)
        self.run_tick(now)

    def wait_for_events(self, timeout: float) -> None:
        waitables: list[Any] = [self._wake_r]
        for slot in self._live_slots():
            if slot.conn is not None:
                waitables.append(slot.conn)
            if slot.proc is not None:
                waitables.append(slot.proc.sentinel)
        wait(waitables, timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _next_timeout(self) -> float:
        now = time.monotonic()
        due = [now + _MAX_WAIT_S]
        if self.on_tick is not None:
            due.append(self._next_tick)
        if self._stop_result is None:
            due.append(self._next_ping)
        else:
            due.append(self._drain_started + self.drain_deadline_s)
        due.extend(s.restart_at for s in self._slots if s.restart_at is not None)
        return max(0.0, min(due) - now)

    def run_tick(self, now: float) -> None:
        if self.on_tick is None or now < self._next_tick:
            return
        self._next_tick = now + self.tick_interval_s
        try:
            self.on_tick()
        except Exception:
            log.error("tick_failed", exc=True)

    # -- spawning ----------------------------------------------------------------------

    def spawn_workers(self) -> None:
        for slot in self._slots:
            self.spawn_worker(slot)

    def spawn_worker(self, slot: _Slot) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=run_child,
            args=(self.target, slot.index, self.pod_identity, child_conn),
            name=f"shardworker-worker-{slot.index}",
        )
        try:
            proc.start()
        finally:
            # The parent must not hold the child's end, or a dead child never reads as EOF.
            child_conn.close()
        now = time.monotonic()
        slot.proc, slot.conn, slot.pid = proc, parent_conn, proc.pid
        slot.spawned_at = slot.last_seen = now
        slot.ready_at = slot.restart_at = None
        slot.hung = False
        log.info("worker_started", slot=slot.index, pid=proc.pid)

    def restart_workers(self, now: float) -> None:
        for slot in self._slots:
            if slot.proc is None and slot.restart_at is not None and slot.restart_at <= now:
                slot.restarts += 1
                self.spawn_worker(slot)
                log.info(
                    "worker_restarted",
                    slot=slot.index,
                    pid=slot.pid,
                    restarts=slot.restarts,
                    consecutive_failures=slot.failures,
                )

    def schedule_restart(self, slot: _Slot, ready_at: float | None, now: float) -> None:
        stable = ready_at is not None and now - ready_at >= self.restart_backoff_max_s
        slot.failures = 1 if stable else slot.failures + 1
        slot.restart_at = now + restart_delay_s(slot.failures, self.restart_backoff_max_s)

    # -- reaping -----------------------------------------------------------------------

    def reap_workers(self) -> None:
        for slot in self._live_slots():
            assert slot.proc is not None
            code = slot.proc.exitcode  # waitpid(pid, WNOHANG) under the hood
            if code is not None:
                self.handle_exit(slot, code)

    def handle_exit(self, slot: _Slot, code: int) -> None:
        # A READY sent just before exiting may still sit in the pipe.
        self.read_slot_messages(slot, time.monotonic())
        ready_at, hung, pid = slot.ready_at, slot.hung, slot.pid
        log.info("worker_exited", slot=slot.index, pid=pid, ready=ready_at is not None,
                 hung=hung, **_describe_exit(code))  # fmt: skip
        slot.last_exit_code = code
        self.release_slot(slot)
        if self._stop_result is not None:
            return
        if ready_at is None and not hung and code == ExitCode.WORKER_BOOT_ERROR:
            log.error("pod_halted", slot=slot.index, pid=pid, reason="worker_boot_error")
            self.begin_stop(ExitCode.HALTED, reason="worker_boot_error")
            return
        self.schedule_restart(slot, ready_at, time.monotonic())

    def release_slot(self, slot: _Slot) -> None:
        if slot.conn is not None:
            slot.conn.close()
        if slot.proc is not None:
            slot.proc.close()
        slot.proc = slot.conn = slot.pid = None
        slot.ready_at = None

    # -- liveness ----------------------------------------------------------------------

    def read_messages(self) -> None:
        now = time.monotonic()
        for slot in self._live_slots():
            self.read_slot_messages(slot, now)

    def read_slot_messages(self, slot: _Slot, now: float) -> None:
        try:
            for _ in range(_MAX_MESSAGES_PER_TURN):
                if slot.conn is None or not slot.conn.poll():
                    return
                message = slot.conn.recv_bytes()
                slot.last_seen = now
                if message == READY and slot.ready_at is None:
                    slot.ready_at = now
                    log.info("worker_ready", slot=slot.index, pid=slot.pid,
                             boot_s=round(now - slot.spawned_at, 3))  # fmt: skip
        except (EOFError, OSError):
            # The child closed its end or died; reaping or the ping timeout handles it.
            self._close_conn(slot)

    def ping_workers(self, now: float) -> None:
        if now < self._next_ping:
            return
        self._next_ping = now + self.ping_interval_s
        for slot in self._live_slots():
            if slot.ready_at is None or slot.conn is None or slot.hung:
                continue
            try:
                slot.conn.send_bytes(PING)
            except OSError:
                self._close_conn(slot)

    def kill_hung_workers(self, now: float) -> None:
        for slot in self._live_slots():
            if slot.hung:
                continue
            if slot.ready_at is None:
                phase, silent_s, limit_s = "boot", now - slot.spawned_at, self.boot_timeout_s
            else:
                phase, silent_s, limit_s = "running", now - slot.last_seen, self.ping_timeout_s
            if silent_s > limit_s:
                log.warning("worker_hung", slot=slot.index, pid=slot.pid, phase=phase,
                            silent_s=round(silent_s, 3))  # fmt: skip
                slot.hung = True
                slot.hung_kills += 1
                assert slot.proc is not None
                slot.proc.kill()

    # -- stopping ----------------------------------------------------------------------

    def begin_stop(self, result: ExitCode, reason: str) -> None:
        self._stop_result = result
        self._drain_started = time.monotonic()
        for slot in self._slots:
            slot.restart_at = None
        live = self._live_slots()
        log.info("drain_started", reason=reason, workers=len(live),
                 deadline_s=self.drain_deadline_s)  # fmt: skip
        for slot in live:
            assert slot.proc is not None
            slot.proc.terminate()

    def check_drain(self, now: float) -> None:
        if not self._live_slots():
            self.finish_drain(killed=0, result=self._stop_result)
        elif now >= self._drain_started + self.drain_deadline_s:
            self.finish_drain(killed=self.kill_workers(), result=self._stop_result)

    def abort_stop(self, reason: str) -> None:
        """A second stop signal: no more waiting."""
        killed = self.kill_workers()
        forced = ExitCode.HALTED if self._stop_result == ExitCode.HALTED else ExitCode.INTERRUPTED
        self.finish_drain(killed=killed, result=forced, forced_by=reason)

    def finish_drain(self, killed: int, result: ExitCode | None, forced_by: str = "") -> None:
        self._result = result if result is not None else ExitCode.OK
        log.info("drain_finished", killed=killed, forced_by=forced_by or None,
                 elapsed_s=round(time.monotonic() - self._drain_started, 3),
                 exit_code=int(self._result))  # fmt: skip

    def kill_workers(self) -> int:
        """SIGKILL every live worker and reap it; returns how many there were."""
        live = self._live_slots()
        for slot in live:
            assert slot.proc is not None
            slot.proc.kill()
        for slot in live:
            assert slot.proc is not None
            slot.proc.join(_KILL_WAIT_S)
            code = slot.proc.exitcode
            if code is None:
                log.error("worker_unkillable", slot=slot.index, pid=slot.pid)
                continue
            self.handle_exit(slot, code)
        return len(live)

    # -- helpers -----------------------------------------------------------------------

    def _live_slots(self) -> list[_Slot]:
        return [s for s in self._slots if s.proc is not None]

    def _close_wake_pipe(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)
        # A late handle_signal() must not write into whatever file reuses the number.
        self._wake_r = self._wake_w = -1

    def _close_conn(self, slot: _Slot) -> None:
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None


def _describe_exit(code: int) -> dict[str, Any]:
    if code >= 0:
        return {"code": code}
    try:
        return {"signal": signal.Signals(-code).name}
    except ValueError:
        return {"signal": f"SIG{-code}"}
