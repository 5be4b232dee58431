"""A private, throwaway PostgreSQL cluster that listens on the addresses a test chooses.

The shared server listens on 127.0.0.1 only; pods in network namespaces (tests/harness/
netns.py) reach their servers at the topology's service address, so the partition tests
start a cluster of their own: ``initdb`` as the ``postgres`` user (it refuses root),
``fsync=off``, trust authentication for loopback and the test's private range only.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.harness.net import free_port, wait_for_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
START_TIMEOUT_S = 30


class PgServerError(RuntimeError):
    """The private cluster could not be created, started or stopped."""


def _as_postgres(args: Sequence[str], timeout_s: float = START_TIMEOUT_S) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    try:
        done = subprocess.run([*prefix, *args], capture_output=True, text=True,
                              timeout=timeout_s, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise PgServerError(f"{args[0]}: no answer within {timeout_s}s") from None
    if done.returncode != 0:
        raise PgServerError(f"{Path(args[0]).name} failed: {done.stderr.strip()[-500:]}")


class PgServer:
    """``PgServer(["127.0.0.1", "10.213.1.253"], trust="10.213.1.0/24").start()``."""

    def __init__(self, listen: Sequence[str], *, trust: str) -> None:
        self.listen = tuple(listen)
        self.trust = trust
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="sw-pg-"))
        self.data = self.root / "data"
        self._started = False

    def dsn(self, host: str = "127.0.0.1", db: str = "postgres") -> str:
        return f"postgresql://postgres@{host}:{self.port}/{db}"

    def start(self) -> PgServer:
        if not (PG_BIN / "initdb").exists():
            raise PgServerError(f"PostgreSQL server binaries not found in {PG_BIN}")
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        _as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust",
                      "-U", "postgres", "--no-sync"])  # fmt: skip
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {self.trust} trust\n")
        options = (f"-c listen_addresses='{','.join(self.listen)}' -c port={self.port} "
                   f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   f"-c max_connections=300 -c unix_socket_directories='{self.root}'")  # fmt: skip
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options,
                      "-l", str(self.root / "server.log"), "-w", "start"])  # fmt: skip
        self._started = True
        wait_for_port(self.port)
        return self

    def close(self) -> None:
        if self._started:
            with contextlib.suppress(PgServerError):
                _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                              "-w", "stop"])  # fmt: skip
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
