"""Start-up: check the dependencies before serving, and tell outages from mistakes.

``shardworker run`` first checks PostgreSQL (reachable, credentials accepted, schema
migrated: :func:`shardworker.db.migrate.verify_schema`) and Redis (reachable, credentials
accepted).  Two kinds of failure are kept apart:

* a configuration mistake (wrong password, unknown database, un-migrated schema, a URL
  that does not parse) will not fix itself: ``ConfigError`` naming the setting, exit
  code ``CONFIG`` (2), and nothing is started;
* an outage (connection refused, timeout, a server still starting) usually ends within
  seconds: retried with capped exponential backoff for ``SHARDWORKER_BOOT_WAIT_S``, then
  ``DependencyUnavailableError`` and exit code ``DEPENDENCY_UNAVAILABLE``.

A worker process retries its own boot the same way; one that still cannot reach its
stores exits with ``DEPENDENCY_UNAVAILABLE``, which the supervisor answers with a restart
(with backoff), not with halting the pod as it does for ``WORKER_BOOT_ERROR``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
import redis

from shardworker.config import Settings, env_name
from shardworker.db.migrate import verify_schema
from shardworker.errors import (
    ConfigError,
    DependencyUnavailableError,
    MigrationError,
    StoreError,
)
from shardworker.exitcodes import ExitCode
from shardworker.logs import get_logger
from shardworker.redact import describe_dsn, redact_configured, redact_text

log = get_logger(__name__)

T = TypeVar("T")

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 5.0
CHECK_TIMEOUT_S = 5
# Environment a worker process does not get: it parses untrusted mail and serves no API.
WORKER_ENV_DROP = ("SHARDWORKER_ADMIN_TOKEN", "SHARDWORKER_ADMIN_ADDR")
# libpq's words for "your settings are wrong", as opposed to "the server is not there".
_PG_CONFIG_HINTS = (
    "password authentication failed",
    "no password supplied",
    "does not exist",
    "authentication failed",
    "invalid dsn",
    "invalid connection option",
    "invalid uri",
    "sslmode",
    "no pg_hba.conf entry",
)


class _Outage(Exception):
    """A dependency that may come back: worth another attempt."""

    def __init__(self, setting: str, text: str) -> None:
        super().__init__(text)
        self.setting = setting


def preflight(
    settings: Settings,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Raise ``ConfigError`` or ``DependencyUnavailableError`` unless both stores are fit."""
    with_retries(lambda: check_postgres(settings), settings, sleep=sleep, clock=clock)
    with_retries(lambda: check_redis(settings), settings, sleep=sleep, clock=clock)


def with_retries(
    attempt: Callable[[], T],
    settings: Settings,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``attempt()``, retried on an outage for up to ``boot_wait_s``."""
    give_up_at = clock() + settings.boot_wait_s
    delay = BACKOFF_BASE_S
    tries = 0
    while True:
        tries += 1
        try:
            return attempt()
        except _Outage as exc:
            error: _Outage = exc
        except (StoreError, redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if isinstance(exc, MigrationError | redis.AuthenticationError):
                raise
            error = _Outage("", f"{type(exc).__name__}: {exc}")
        text = redact_text(str(error), (settings.database_url, settings.redis_url))
        if clock() + delay > give_up_at:
            where = f"{error.setting}: " if error.setting else ""
            raise DependencyUnavailableError(
                f"{where}still unavailable after {tries} attempt(s) over "
                f"{settings.boot_wait_s:g}s ({env_name('boot_wait_s')}): {text}"
            ) from None
        log.warning("dependency_unavailable", setting=error.setting or None, attempt=tries,
                    retry_in_s=delay, error=text)  # fmt: skip
        sleep(delay)
        delay = min(BACKOFF_CAP_S, delay * 2)


def check_postgres(settings: Settings) -> None:
    name, url = env_name("database_url"), settings.database_url
    where = f"PostgreSQL at {describe_dsn(url)}"
    try:
        with psycopg.connect(url, connect_timeout=CHECK_TIMEOUT_S, autocommit=True) as conn:
            verify_schema(conn)
    except MigrationError as exc:
        raise ConfigError(f"{name}: {where}: the schema is not ready: {exc}") from None
    except psycopg.Error as exc:
        text = redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                           (url,))  # fmt: skip
        if isinstance(exc, psycopg.ProgrammingError) or any(
            hint in text.lower() for hint in _PG_CONFIG_HINTS
        ):
            raise ConfigError(f"{name}: {where} refused the connection: {text}") from None
        raise _Outage(name, f"{where} unreachable: {text}") from None


def check_redis(settings: Settings) -> None:
    name, url = env_name("redis_url"), settings.redis_url
    try:
        client = redis.Redis.from_url(url, socket_timeout=CHECK_TIMEOUT_S,
                                      socket_connect_timeout=CHECK_TIMEOUT_S)  # fmt: skip
    except ValueError as exc:
        raise ConfigError(f"{name}: {redact_text(str(exc), (url,))}") from None
    kwargs = client.connection_pool.connection_kwargs
    where = f"Redis at {kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}"
    try:
        client.ping()
    except redis.AuthenticationError:
        raise ConfigError(f"{name}: {where} refused the credentials") from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise ConfigError(f"{name}: {where} refused the credentials") from None
        raise ConfigError(f"{name}: {where}: {type(exc).__name__}") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise _Outage(name, f"{where} unreachable: {type(exc).__name__}") from None
    finally:
        client.close()


def report_boot_failure(index: int, exc: BaseException) -> ExitCode:
    """Log why a worker could not boot (URLs redacted); its exit code: an outage is
    restarted by the supervisor, anything else halts the pod."""
    log.error("worker_boot_failed", worker=index, error_type=type(exc).__name__,
              error=redact_configured(str(exc)))  # fmt: skip
    if isinstance(exc, DependencyUnavailableError):
        return ExitCode.DEPENDENCY_UNAVAILABLE
    return ExitCode.WORKER_BOOT_ERROR


def scrub_worker_environment(environ: os._Environ[str] | dict[str, str] | None = None) -> None:
    """Drop what workers must not inherit (they are spawned from this environment).

    Call in the coordinator after its settings are loaded: the coordinator keeps the
    admin token in its Settings; worker processes never see it.
    """
    env = os.environ if environ is None else environ
    for key in WORKER_ENV_DROP:
        env.pop(key, None)
