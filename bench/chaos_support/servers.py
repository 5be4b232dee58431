"""Servers the chaos run can crash and restart: Redis with AOF, a private PostgreSQL cluster.

Both keep their port and their data across restarts, so the workers reconnect to the same
address and find the same state, as after a real crash of a production server.

* ``AofRedis``: ``appendonly yes`` with ``appendfsync always`` — every write is in the AOF
  file before Redis answers it, so even a SIGKILL loses nothing acknowledged (everysec
  could lose up to a second of XADDs and dedupe keys, which would show up as losses
  here).  ``restart()`` is a SIGKILL and a start on the same directory.
* ``PgCluster``: ``initdb`` (as the ``postgres`` user when root, which initdb requires) into
  a directory owned by that user, ``-c fsync=off`` (only an OS crash could lose data; the
  run never causes one), trust auth on a private port.  ``restart()`` is
  ``pg_ctl restart -m immediate``: no clean shutdown, crash recovery at start.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import redis

from tests.harness.net import free_port, port_is_open, wait_for_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"


class ServerError(RuntimeError):
    """A private server could not be started or restarted."""


class AofRedis:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError("redis-server is not installed (scripts/install-deps.sh)")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sw-chaos-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", "--databases", "4"]  # fmt: skip
        log = (self.dir / "redis.log").open("ab")
        with log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, 20)
        # The port answers before the AOF is loaded; LOADING replies until it is.
        client = redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    if time.monotonic() > deadline:
                        raise ServerError("redis still loading its AOF after 60 s") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        deadline = time.monotonic() + 10
        while port_is_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def restart(self, down_s: float = 0.0) -> None:
        """SIGKILL, stay down ``down_s`` seconds, start again on the same AOF."""
        self.kill()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *args] if os.geteuid() == 0 else args


class PgCluster:
    """A throwaway PostgreSQL 15 cluster on a private port (see the module docstring)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise ServerError(f"PostgreSQL 15 server binaries are missing under {PG_BIN}")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sw-chaos-pg-"))
        self.data = self.dir / "data"
        self.sockets = self.dir / "sockets"
        self.log = self.dir / "postgres.log"
        self.user = PG_USER if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
        if os.geteuid() == 0:
            entry = pwd.getpwnam(PG_USER)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.sockets.mkdir()
        if os.geteuid() == 0:
            os.chown(self.sockets, entry.pw_uid, entry.pw_gid)
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", self.user,
                   "--auth=trust", "-E", "UTF8", "--no-sync"])  # fmt: skip

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run(self, args: list[str], timeout_s: float = 120) -> None:
        done = subprocess.run(
            _as_postgres(args), capture_output=True, text=True, check=False, timeout=timeout_s
        )
        if done.returncode != 0:
            raise ServerError(f"{Path(args[0]).name} exited {done.returncode}: "
                              f"{done.stderr.strip()[-2000:]}")  # fmt: skip

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c full_page_writes=off -c unix_socket_directories={self.sockets} "
                   f"-c max_connections=300 -c shared_buffers=64MB")  # fmt: skip
        self._run([str(PG_BIN / "pg_ctl"), action, "-D", str(self.data), "-l", str(self.log),
                   "-w", "-t", "60", "-o", options, *extra])  # fmt: skip

    def start(self) -> None:
        self._pg_ctl("start")
        self._wait_ready()

    def restart(self) -> None:
        """Immediate shutdown (no checkpoint: crash recovery on start), then start."""
        self._pg_ctl("restart", "-m", "immediate")
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise ServerError("PostgreSQL did not accept connections in 60 s") from None
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(ServerError, subprocess.TimeoutExpired):
                self._pg_ctl("stop", "-m", "immediate")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
