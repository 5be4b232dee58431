"""Real-server fixtures: private Dovecot and Redis, throwaway PostgreSQL database.

A server that cannot start fails the test (pytest.fail) with the reason; it never skips,
on a developer machine as in CI. `make deps` (scripts/install-deps.sh) installs them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.harness.dovecot import Dovecot, DovecotError, ImapUser
from tests.harness.net import free_port, wait_for_port
from tests.harness.pg import PG_ADMIN_DSN, create_database, drop_database, dsn_for

__all__ = ["PG_ADMIN_DSN", "free_port", "wait_for_port"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port; yields its base URL (no DB index)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make test installs it)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="sw-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir, "--databases", "64"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


_next_db = iter(range(1, 10_000))


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """A freshly flushed DB index on the private server, one per test."""
    db = next(_next_db) % 63 + 1
    client = redis.Redis.from_url(f"{redis_server}/{db}")
    client.flushdb()
    client.close()
    return f"{redis_server}/{db}"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """An empty throwaway database, dropped after the session."""
    try:
        name = create_database(PG_ADMIN_DSN)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_DSN}: {exc}")
    yield dsn_for(PG_ADMIN_DSN, name)
    drop_database(name, PG_ADMIN_DSN)


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sw-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_dovecot(
    *, hide_idle: bool = False, oauth2_introspection_url: str | None = None, extra_conf: str = ""
) -> Dovecot:
    """A started private Dovecot, or pytest.fail with the reason."""
    instance: Dovecot | None = None
    try:
        instance = Dovecot(
            hide_idle=hide_idle,
            oauth2_introspection_url=oauth2_introspection_url,
            extra_conf=extra_conf,
        )
        instance.start()
    except (DovecotError, OSError) as exc:
        if instance is not None:
            instance.close()
        pytest.fail(f"cannot start the private Dovecot (dovecot-imapd): {exc}", pytrace=False)
    return instance


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """The shared private Dovecot. Tests that stop or reconfigure a server use
    dovecot_factory instead, so later tests still find this one running."""
    instance = start_dovecot()
    yield instance
    instance.close()


@pytest.fixture
def dovecot_factory() -> Iterator[Callable[..., Dovecot]]:
    """`dovecot_factory(hide_idle=..., oauth2_introspection_url=..., extra_conf=...)`:
    extra instances, each stopped and deleted after the test."""
    started: list[Dovecot] = []

    def make(
        *,
        hide_idle: bool = False,
        oauth2_introspection_url: str | None = None,
        extra_conf: str = "",
    ) -> Dovecot:
        instance = start_dovecot(
            hide_idle=hide_idle,
            oauth2_introspection_url=oauth2_introspection_url,
            extra_conf=extra_conf,
        )
        started.append(instance)
        return instance

    yield make
    for instance in started:
        instance.close()


@pytest.fixture
def imap_user(dovecot: Dovecot) -> ImapUser:
    """A fresh user (name, password) on the shared Dovecot; unpacks as a tuple."""
    return dovecot.add_user()


@pytest.fixture(scope="session")
def migrated_dsn(pg_dsn: str) -> str:
    """The session's throwaway database after `shardworker migrate`."""
    from shardworker.db.migrate import migrate

    migrate(pg_dsn)
    return pg_dsn


@pytest.fixture
def fresh_dsn() -> Iterator[str]:
    """A migrated database of its own, for tests that run a whole pool over it."""
    from shardworker.db.migrate import migrate

    name = create_database()
    dsn = dsn_for(PG_ADMIN_DSN, name)
    migrate(dsn)
    yield dsn
    drop_database(name)
