"""Issue 12 items 9, 11 and 14: `shardworker run` refuses an un-migrated database, rides out
a short PostgreSQL/Redis outage at boot (its own exit code when it lasts), and its worker
processes get neither the admin token nor the ability to dump core or be ptraced."""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from shardworker.exitcodes import ExitCode
from shardworker.pool.childproc import ChildChannel
from tests.faultproxy import FaultProxy
from tests.harness.net import free_port, wait_for_port
from tests.harness.pg import create_database, drop_database, dsn_for
from tests.support import WorkerProcess, rig_settings, wait_until, worker_env

pytestmark = pytest.mark.timeout(90)


def run_once(env: dict[str, str], timeout_s: float = 40) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardworker", "run"], env=env, text=True,
                          capture_output=True, timeout=timeout_s, check=False)  # fmt: skip


@pytest.fixture
def unmigrated_dsn() -> Iterator[str]:
    name = create_database()
    yield dsn_for("postgresql://127.0.0.1:5432/postgres", name)
    drop_database(name)


def test_run_on_an_unmigrated_database_refuses_to_start(
    unmigrated_dsn: str, redis_url: str, dovecot: Any
) -> None:
    env = worker_env(rig_settings(unmigrated_dsn, redis_url, str(dovecot.cafile)))
    started = time.monotonic()
    done = run_once(env)
    assert done.returncode == ExitCode.CONFIG, done.stderr[-2000:]
    assert "SHARDWORKER_DATABASE_URL" in done.stderr
    assert "missing" in done.stderr and "shardworker migrate" in done.stderr
    assert "worker_started" not in done.stdout + done.stderr  # nothing was served
    assert time.monotonic() - started < 20


def test_an_unreachable_redis_at_boot_exits_with_dependency_unavailable(
    migrated_dsn: str, dovecot: Any
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = worker_env(rig_settings(migrated_dsn, dead, str(dovecot.cafile), boot_wait_s="2"))
    done = run_once(env)
    assert done.returncode == ExitCode.DEPENDENCY_UNAVAILABLE, done.stderr[-2000:]
    assert "SHARDWORKER_REDIS_URL" in done.stderr and "unreachable" in done.stderr
    assert "dependency_unavailable" in done.stdout + done.stderr  # each retry is logged


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path),
                             "--requirepass", "the-real-password"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_redis_password_redis_refuses_names_the_setting(
    migrated_dsn: str, redis_with_password: str, dovecot: Any
) -> None:
    wrong = redis_with_password.replace("redis://", "redis://:not-the-password@") + "/0"
    env = worker_env(rig_settings(migrated_dsn, wrong, str(dovecot.cafile), boot_wait_s="2"))
    done = run_once(env)
    assert done.returncode == ExitCode.CONFIG, done.stderr[-2000:]
    assert "SHARDWORKER_REDIS_URL" in done.stderr and "not-the-password" not in done.stderr


def test_an_unknown_database_is_a_configuration_error(redis_url: str, dovecot: Any) -> None:
    dsn = "postgresql://127.0.0.1:5432/sw_no_such_database"
    env = worker_env(rig_settings(dsn, redis_url, str(dovecot.cafile), boot_wait_s="2"))
    done = run_once(env)
    assert done.returncode == ExitCode.CONFIG, done.stderr[-2000:]
    assert "SHARDWORKER_DATABASE_URL" in done.stderr and "does not exist" in done.stderr


def test_a_short_redis_outage_at_boot_does_not_halt_the_pod(
    migrated_dsn: str, redis_server: str, dovecot: Any, tmp_path: Path
) -> None:
    host, port = redis_server.removeprefix("redis://").split("/")[0].split(":")
    proxy = FaultProxy(host, int(port)).start()
    try:
        # Every connection reset until the boot has seen the outage (however long the
        # start takes on a loaded machine), then healed.
        proxy.drop(60)
        settings = rig_settings(migrated_dsn, f"redis://127.0.0.1:{proxy.port}/0",
                                str(dovecot.cafile), workers="1", boot_wait_s="30")  # fmt: skip
        log = tmp_path / "run.log"
        worker = WorkerProcess(settings, str(log))
        worker.start()
        try:
            wait_until(lambda: b'"dependency_unavailable"' in log.read_bytes(), 30)
            proxy.heal()
            wait_until(lambda: b'"worker_started"' in log.read_bytes()
                       and b'"member"' in log.read_bytes(), 40)  # fmt: skip
            assert worker.proc is not None and worker.proc.poll() is None
            text = log.read_text()
            assert "dependency_unavailable" in text and "pod_halted" not in text
            worker.signal(signal.SIGTERM)
            assert worker.wait(30) == 0
        finally:
            worker.stop()
    finally:
        proxy.close()


def _worker_pids(log: Path) -> list[int]:
    pids = []
    for line in log.read_bytes().splitlines():
        if line.startswith(b"{"):
            event = orjson.loads(line)
            if event.get("event") == "worker_started" and "member" in event:
                pids.append(int(event["pid"]))
    return pids


def test_workers_get_no_admin_token_and_are_not_dumpable(
    migrated_dsn: str, redis_url: str, dovecot: Any, tmp_path: Path
) -> None:
    token = "adm-" + os.urandom(8).hex()
    settings = rig_settings(migrated_dsn, redis_url, str(dovecot.cafile), workers="1",
                            admin_addr=f"127.0.0.1:{free_port()}", admin_token=token)  # fmt: skip
    log = tmp_path / "run.log"
    worker = WorkerProcess(settings, str(log))
    worker.start()
    try:
        wait_until(lambda: _worker_pids(log), 40)
        (pid,) = _worker_pids(log)
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert token.encode() not in environ
        assert b"SHARDWORKER_ADMIN_TOKEN" not in environ
        assert b"SHARDWORKER_DATABASE_URL" in environ  # what it needs, it still has
        # The kernel hands the /proc files of a non-dumpable process to root.
        status = Path(f"/proc/{pid}/status").read_text()
        assert "\nUid:" in status
        assert os.stat(f"/proc/{pid}/environ").st_uid == 0
        core = [ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if ln.startswith("Max core file size")]  # fmt: skip
        assert core and core[0].split()[4:6] == ["0", "0"], core
    finally:
        worker.stop()


def report_dumpable(index: int, channel: ChildChannel) -> int:
    """Supervisor target: write PR_GET_DUMPABLE and RLIMIT_CORE of this worker."""
    libc = ctypes.CDLL(None, use_errno=True)
    dumpable = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
    Path(os.environ["SW_SUP_DIR"], "dumpable").write_text(
        f"{dumpable} {resource.getrlimit(resource.RLIMIT_CORE)}"
    )
    return ExitCode.OK


def test_a_spawned_worker_is_non_dumpable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:  # fmt: skip
    from shardworker.pool.supervisor import Supervisor

    monkeypatch.setenv("SW_SUP_DIR", str(tmp_path))
    report = tmp_path / "dumpable"
    supervisor = Supervisor(1, report_dumpable, ping_interval_s=0.1, drain_deadline_s=2,
                            tick_interval_s=0.1)  # fmt: skip
    started = time.monotonic()

    def stop_once_reported() -> None:
        if report.exists() or time.monotonic() - started > 20:
            supervisor.handle_signal(signal.SIGTERM, None)

    supervisor.on_tick = stop_once_reported
    supervisor.run()
    assert (tmp_path / "dumpable").read_text() == "0 (0, 0)"
