"""The coordinator's process supervisor, with real spawned processes.

Scenarios that send signals to the supervisor run it as a process
(``python -m tests.supervisor_targets``) and read its JSON logs and the targets' marker
files.  Loop-logic scenarios run it in-process and push signals onto its queue directly,
the way uvicorn's supervisor tests do.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardworker.exitcodes import ExitCode
from shardworker.pool.childproc import PING, PONG, READY, ChildChannel
from shardworker.pool.supervisor import Supervisor, restart_delay_s
from tests import supervisor_targets as targets

ROOT = Path(__file__).resolve().parent.parent
FAST: dict[str, Any] = {"ping_interval_s": 0.2, "ping_timeout_s": 1.0, "drain_deadline_s": 3.0}


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    """Running or stopped; a zombie or a vanished pid counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def started_pids(workdir: Path, slot: int) -> list[int]:
    path = workdir / f"slot{slot}.pids"
    if not path.exists():
        return []
    return [int(line.split()[0]) for line in path.read_text().splitlines()]


def start_times(workdir: Path, slot: int) -> list[float]:
    lines = (workdir / f"slot{slot}.pids").read_text().splitlines()
    return [float(line.split()[1]) for line in lines]


def is_ready(workdir: Path, slot: int, pid: int) -> bool:
    return (workdir / f"ready-{slot}-{pid}").exists()


class SupervisorProcess:
    """A supervisor running as its own process, as `shardworker run` will."""

    def __init__(self, workdir: Path, target: str, workers: int, **kwargs: Any) -> None:
        self.workdir = workdir
        self.log_path = workdir / "supervisor.log"
        env = {**os.environ, "SW_SUP_DIR": str(workdir)}
        args = [sys.executable, "-m", "tests.supervisor_targets", target, str(workers)]
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [*args, json.dumps({**FAST, **kwargs})], cwd=ROOT, env=env, stderr=log_file
            )

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [r for r in records if r.get("event") == name]

    def wait_ready(self, slot: int, count: int = 1) -> int:
        """Waits until slot has had ``count`` starts and the last one is ready; its pid."""

        def ready() -> bool:
            pids = started_pids(self.workdir, slot)
            return len(pids) >= count and is_ready(self.workdir, slot, pids[-1])

        wait_until(ready, what=f"slot {slot} start #{count} ready")
        return started_pids(self.workdir, slot)[-1]

    def all_pids(self) -> list[int]:
        return [pid for path in self.workdir.glob("slot*.pids") for pid in
                started_pids(self.workdir, int(path.stem[4:]))]  # fmt: skip

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.all_pids():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def spawn_supervisor(tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    started: list[SupervisorProcess] = []

    def spawn(target: str, workers: int, **kwargs: Any) -> SupervisorProcess:
        sup = SupervisorProcess(tmp_path, target, workers, **kwargs)
        started.append(sup)
        return sup

    yield spawn
    for sup in started:
        sup.cleanup()


# -- restarts and liveness ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_sigkilled_worker_is_restarted_in_its_slot(
    spawn_supervisor: Callable[..., SupervisorProcess], tmp_path: Path
) -> None:
    sup = spawn_supervisor("serve", 2)
    first, other = sup.wait_ready(0), sup.wait_ready(1)

    os.kill(first, signal.SIGKILL)
    second = sup.wait_ready(0, count=2)

    assert second != first
    assert started_pids(tmp_path, 1) == [other]
    restarted = sup.events("worker_restarted")
    assert [(e["slot"], e["pid"]) for e in restarted] == [(0, second)]
    exited = sup.events("worker_exited")
    assert [(e["slot"], e["pid"], e["signal"]) for e in exited] == [(0, first, "SIGKILL")]
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == ExitCode.OK


def test_a_dead_background_thread_ends_the_worker_which_is_restarted(
    spawn_supervisor: Callable[..., SupervisorProcess], tmp_path: Path
) -> None:
    sup = spawn_supervisor("thread_dies_once", 1)
    first = sup.wait_ready(0)
    second = sup.wait_ready(0, count=2)
    assert second != first
    [died] = sup.events("thread_died")
    assert (died["thread"], died["error_type"]) == ("keeper", "RuntimeError")
    assert died["worker"] == 0 and "hunter2" not in json.dumps(died)
    [exited] = sup.events("worker_exited")
    assert (exited["pid"], exited["code"]) == (first, ExitCode.THREAD_DIED)
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == ExitCode.OK


@pytest.mark.timeout(30)
def test_stopped_worker_is_detected_as_hung_and_replaced(
    spawn_supervisor: Callable[..., SupervisorProcess], tmp_path: Path
) -> None:
    sup = spawn_supervisor("serve", 1)
    first = sup.wait_ready(0)

    stopped_at = time.monotonic()
    os.kill(first, signal.SIGSTOP)
    wait_until(lambda: len(started_pids(tmp_path, 0)) == 2, timeout=8, what="replacement")
    replaced_after_s = time.monotonic() - stopped_at

    assert FAST["ping_timeout_s"] <= replaced_after_s <= FAST["ping_timeout_s"] + 2.0
    [hung] = sup.events("worker_hung")
    assert (hung["slot"], hung["pid"], hung["phase"]) == (0, first, "running")
    wait_until(lambda: not pid_alive(first), timeout=5, what="stopped worker killed")
    sup.wait_ready(0, count=2)
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == ExitCode.OK


@pytest.mark.timeout(30)
def test_boot_failure_halts_the_pod(
    spawn_supervisor: Callable[..., SupervisorProcess], tmp_path: Path
) -> None:
    sup = spawn_supervisor("boot_fail_slot1", 3)

    assert sup.wait(15) == ExitCode.HALTED

    assert len(started_pids(tmp_path, 1)) == 1  # never respawned
    # Workers still booting may be stopped before they record themselves: ask the log.
    pids = [e["pid"] for e in sup.events("worker_started")]
    assert len(pids) == 3
    assert not [pid for pid in pids if pid_alive(pid)]
    [halted] = sup.events("pod_halted")
    assert halted["slot"] == 1
    assert not sup.events("worker_restarted")


@pytest.mark.timeout(30)
def test_a_worker_whose_stores_are_down_at_boot_is_restarted_not_halted(
    spawn_supervisor: Callable[..., SupervisorProcess], tmp_path: Path
) -> None:
    """Issue 12 item 11: DEPENDENCY_UNAVAILABLE is an outage, not a bad setting."""
    sup = spawn_supervisor("dependency_down_at_first_boot", 2)
    sup.wait_ready(0, count=2)
    assert not sup.events("pod_halted")
    [exited] = [e for e in sup.events("worker_exited") if e["slot"] == 0]
    assert exited["ready"] is False
    sup.signal(signal.SIGTERM)
    assert sup.wait(15) == ExitCode.OK


# -- shutdown ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_sigterm_drains_every_worker_and_exits_ok(
    spawn_supervisor: Callable[..., SupervisorProcess], tmp_path: Path
) -> None:
    sup = spawn_supervisor("serve", 2)
    pids = [sup.wait_ready(0), sup.wait_ready(1)]

    sup.signal(signal.SIGTERM)
    assert sup.wait(FAST["drain_deadline_s"] + 2) == ExitCode.OK

    for slot, pid in enumerate(pids):
        drained = json.loads((tmp_path / f"drained-{slot}-{pid}").read_text())
        assert drained == [signal.SIGTERM]
    assert [e["code"] for e in sup.events("worker_exited")] == [0, 0]
    [finished] = sup.events("drain_finished")
    assert finished["killed"] == 0
    assert finished["elapsed_s"] < FAST["drain_deadline_s"]


@pytest.mark.timeout(30)
def test_worker_ignoring_sigterm_is_killed_at_the_deadline(
    spawn_supervisor: Callable[..., SupervisorProcess],
) -> None:
    sup = spawn_supervisor("ignore_drain", 1, drain_deadline_s=1.0)
    pid = sup.wait_ready(0)

    signalled_at = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == ExitCode.OK
    took_s = time.monotonic() - signalled_at

    assert 1.0 <= took_s < 4.0
    assert not pid_alive(pid)
    [finished] = sup.events("drain_finished")
    assert finished["killed"] == 1
    assert [e["signal"] for e in sup.events("worker_exited")] == ["SIGKILL"]


@pytest.mark.timeout(30)
def test_second_sigterm_exits_at_once(
    spawn_supervisor: Callable[..., SupervisorProcess],
) -> None:
    sup = spawn_supervisor("ignore_drain", 2, drain_deadline_s=30.0)
    pids = [sup.wait_ready(0), sup.wait_ready(1)]

    signalled_at = time.monotonic()
    sup.signal(signal.SIGTERM)
    wait_until(lambda: bool(sup.events("drain_started")), what="drain_started")
    sup.signal(signal.SIGINT)
    assert sup.wait(10) == ExitCode.INTERRUPTED

    assert time.monotonic() - signalled_at < 3.0
    assert not [pid for pid in pids if pid_alive(pid)]
    [finished] = sup.events("drain_finished")
    assert (finished["killed"], finished["forced_by"]) == (2, "SIGINT")


# -- loop logic, signals pushed onto the queue ---------------------------------------------


@pytest.fixture
def sup_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SW_SUP_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.timeout(30)
def test_queued_sigterm_before_run_drains_and_returns_ok(sup_dir: Path) -> None:
    supervisor = Supervisor(2, targets.serve, **FAST)
    supervisor.handle_signal(signal.SIGTERM, None)

    assert supervisor.run() == ExitCode.OK

    stats = supervisor.stats()
    assert stats.draining
    assert [s.pid for s in stats.slots] == [None, None]
    assert [s.restarts for s in stats.slots] == [0, 0]
    assert not [pid for slot in (0, 1) for pid in started_pids(sup_dir, slot) if pid_alive(pid)]


@pytest.mark.timeout(30)
def test_drain_waits_idle_until_the_deadline(sup_dir: Path) -> None:
    drain: dict[str, float] = {}

    def stop_once_ready() -> None:
        stats = supervisor.stats()
        if stats.slots[0].ready and not stats.draining:
            supervisor.handle_signal(signal.SIGTERM, None)
            drain.update(wall=time.monotonic(), cpu=time.process_time())

    supervisor = Supervisor(
        1, targets.ignore_drain, **{**FAST, "drain_deadline_s": 1.0},
        on_tick=stop_once_ready, tick_interval_s=0.05,
    )  # fmt: skip
    assert supervisor.run() == ExitCode.OK

    assert time.monotonic() - drain["wall"] >= 1.0
    # The loop sleeps until the deadline instead of spinning.
    assert time.process_time() - drain["cpu"] < 0.2
    assert supervisor.stats().slots[0].last_exit_code == -signal.SIGKILL


@pytest.mark.timeout(30)
def test_two_queued_signals_kill_at_once(sup_dir: Path) -> None:
    supervisor = Supervisor(1, targets.ignore_drain, **{**FAST, "drain_deadline_s": 30.0})
    supervisor.handle_signal(signal.SIGTERM, None)
    supervisor.handle_signal(signal.SIGINT, None)

    started = time.monotonic()
    assert supervisor.run() == ExitCode.INTERRUPTED
    assert time.monotonic() - started < 5.0
    assert supervisor.stats().slots[0].pid is None


@pytest.mark.timeout(30)
def test_crash_after_ready_restarts_with_backoff(sup_dir: Path) -> None:
    window_s = 3.5
    started = time.monotonic()

    def stop_after_window() -> None:
        # Stop between a crash and its restart, so the last exit is the crash's own.
        stats = supervisor.stats()
        waiting = stats.slots[0].pid is None and not stats.draining
        if waiting and time.monotonic() - started > window_s:
            supervisor.handle_signal(signal.SIGTERM, None)

    supervisor = Supervisor(
        1, targets.ready_then_exit, **FAST, restart_backoff_max_s=1.0,
        on_tick=stop_after_window, tick_interval_s=0.1,
    )  # fmt: skip
    # The boot-error code after ready is an ordinary crash: restarted, never a halt.
    assert supervisor.run() == ExitCode.OK

    [slot] = supervisor.stats().slots
    # Without backoff a 3.5 s window holds a dozen restarts; with it 0, 0.5, 1, 1, ... s.
    assert 2 <= slot.restarts <= 6
    assert slot.last_exit_code == ExitCode.WORKER_BOOT_ERROR
    starts = start_times(sup_dir, 0)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[-1] >= 0.9  # capped at restart_backoff_max_s, but well above spawn time


@pytest.mark.timeout(30)
def test_worker_that_never_boots_is_replaced_after_boot_timeout(sup_dir: Path) -> None:
    def stop_after_first_restart() -> None:
        stats = supervisor.stats()
        if stats.slots[0].restarts >= 1 and not stats.draining:
            supervisor.handle_signal(signal.SIGTERM, None)

    supervisor = Supervisor(
        1, targets.never_ready, **{**FAST, "drain_deadline_s": 0.5}, boot_timeout_s=0.8,
        on_tick=stop_after_first_restart, tick_interval_s=0.1,
    )  # fmt: skip
    assert supervisor.run() == ExitCode.OK

    [slot] = supervisor.stats().slots
    assert (slot.restarts, slot.hung_kills) == (1, 1)
    assert len(started_pids(sup_dir, 0)) >= 1


@pytest.mark.timeout(30)
def test_busy_main_thread_still_counts_as_alive(
    sup_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SW_SUP_BLOCK_S", str(FAST["ping_timeout_s"] * 2))
    ready_at: list[float] = []

    def stop_after_the_block() -> None:
        stats = supervisor.stats()
        if stats.slots[0].ready and not ready_at:
            ready_at.append(time.monotonic())
        blocked_long = ready_at and time.monotonic() - ready_at[0] > FAST["ping_timeout_s"] * 2.5
        if blocked_long and not stats.draining:
            supervisor.handle_signal(signal.SIGTERM, None)

    supervisor = Supervisor(
        1, targets.block_after_ready, **FAST, on_tick=stop_after_the_block, tick_interval_s=0.1
    )
    assert supervisor.run() == ExitCode.OK

    [slot] = supervisor.stats().slots
    assert (slot.hung_kills, slot.restarts, slot.last_exit_code) == (0, 0, 0)


@pytest.mark.timeout(30)
def test_failing_tick_is_logged_and_the_loop_goes_on(
    sup_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[float] = []

    def flaky_tick() -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RuntimeError("leader election failed")
        if len(calls) == 3:
            supervisor.handle_signal(signal.SIGTERM, None)

    supervisor = Supervisor(1, targets.serve, **FAST, on_tick=flaky_tick, tick_interval_s=0.1)
    assert supervisor.run() == ExitCode.OK

    # Ticks go on during the drain (the lead renews its leadership until the end).
    assert len(calls) >= 3
    assert [r.getMessage() for r in caplog.records].count("tick_failed") == 2


# -- the child's half ----------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_channel_answers_pings_and_notices_a_vanished_supervisor() -> None:
    parent, child = multiprocessing.Pipe(duplex=True)
    channel = ChildChannel(3, "pod-a", child)
    try:
        channel.ready()
        assert parent.recv_bytes() == READY
        parent.send_bytes(PING)
        assert parent.poll(2) and parent.recv_bytes() == PONG
        assert not channel.draining

        channel.record_signal(signal.SIGTERM, None)
        assert channel.draining and channel.drain_signals == [signal.SIGTERM]

        parent.close()
        wait_until(lambda: channel.supervisor_gone, timeout=3, what="EOF noticed")
    finally:
        channel.close()


# -- pure units ----------------------------------------------------------------------------


def test_restart_delay_starts_at_zero_doubles_and_caps() -> None:
    delays = [restart_delay_s(n, cap_s=4.0) for n in range(1, 8)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert restart_delay_s(10_000, cap_s=30.0) == 30.0


def test_target_must_be_picklable() -> None:
    with pytest.raises(ValueError, match="picklable"):
        Supervisor(1, lambda index, channel: 0)
    with pytest.raises(ValueError, match="at least 1"):
        Supervisor(0, targets.serve)
