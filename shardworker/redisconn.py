"""The one place that builds Redis clients: a plain URL, or a primary found through Sentinel.

With ``SHARDWORKER_REDIS_SENTINELS=host:port[,host:port...]`` and
``SHARDWORKER_REDIS_SENTINEL_MASTER=<name>``, every client asks the Sentinels for the
current primary of ``<name>`` and asks again after a connection error or a ``READONLY``
reply (a demoted primary), so a failover costs the callers one failed call each, never a
restart.  ``SHARDWORKER_REDIS_URL`` still supplies the database index, user and password
(its host and port are ignored then).  The Sentinels themselves are asked without a
password: redis-sentinel's ``requirepass`` is a separate setting this service does not use.

A failover can lose the primary's last writes (replication is asynchronous): leases,
dedupe keys and stream entries.  Leases and the PostgreSQL fencing epoch keep a stale owner
from acting on what is left; docs/partitions.md says what this means for exactly-once.
"""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from shardworker.config import Settings, env_name
from shardworker.errors import ConfigError

# Health checks catch a connection that a NAT or a failover silently dropped.
HEALTH_CHECK_S = 30
# redis-py retries 10 times by default; an outage must surface quickly as a PublishError
# so the engine backs off instead of blocking a sync thread, and a silent Redis must not
# hold the lease keeper (heartbeat, then renewal) past the lease TTL.
RETRIES = 1
SENTINEL_TIMEOUT_S = 0.5
BLOCK_MARGIN_S = 1.0  # above an XREAD BLOCK: the waits between a worker's assignment rounds
# A request sent on a connection that then failed (timed out, was cut) is not gone: the
# kernel retransmits it, after redis-py has closed the socket too, and Redis runs it when
# it arrives.  TCP_USER_TIMEOUT bounds that: data unacknowledged this long aborts the
# connection and is discarded.  Without it Linux retransmits an orphaned socket's data for
# about 100 s.  It counts only unacknowledged bytes, so a slow Redis or a long blocking
# read is not affected.
TCP_USER_TIMEOUT_S = 10
# How long after a failed call a request it sent may still reach Redis: the TCP user
# timeout plus generous room for packets queued in the network.  The sink keeps dedupe
# keys at least this long after such a failure (sink/redis_streams.py, settle).
STALE_REQUEST_S = 6 * TCP_USER_TIMEOUT_S
# Linux names; a platform without one of them just does without it.
_KEEPALIVE = {
    getattr(socket, name): value
    for name, value in (
        ("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_S * 1000),
        ("TCP_KEEPIDLE", 30),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
    )
    if hasattr(socket, name)
}

T = TypeVar("T")


class FailureRecord:
    """When a call on a client last failed without an answer (monotonic seconds).

    Such a call's request may still be on its way and run later, even after a retry of it
    succeeded: see ``STALE_REQUEST_S``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.last_failure: float | None = None

    def note(self) -> None:
        self.last_failure = self._clock()

    def within(self, seconds: float) -> bool:
        """Did a call fail in the last ``seconds``?"""
        last = self.last_failure
        return last is not None and self._clock() - last < seconds


class RecordingRetry(Retry):
    """redis-py's Retry that notes every failed attempt, retried ones included.

    redis-py deep-copies a client's Retry into each connection; the copies share the
    record, so one record covers every connection of the client.
    """

    def __init__(self, backoff: Any, retries: int, record: FailureRecord) -> None:
        super().__init__(backoff, retries)
        self.record = record

    @classmethod
    def wrapping(cls, retry: Retry | None, record: FailureRecord) -> RecordingRetry:
        if retry is None:
            return cls(NoBackoff(), 0, record)
        out = cls(retry._backoff, retry.get_retries(), record)
        out._supported_errors = retry._supported_errors
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> RecordingRetry:
        out = RecordingRetry(copy.deepcopy(self._backoff, memo), self._retries, self.record)
        out._supported_errors = self._supported_errors
        return out

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def noted(*args: Any) -> Any:
            self.record.note()
            return fail(*args)

        return super().call_with_retry(do, noted, is_retryable, with_failure_count)


def watch_failures(client: redis.Redis) -> FailureRecord:
    """The client's failure record; installs one (keeping its retry policy) if it has none."""
    retry = client.get_retry()
    if isinstance(retry, RecordingRetry):
        return retry.record
    record = FailureRecord()
    client.set_retry(RecordingRetry.wrapping(retry, record))
    return record


def call_timeout_s(settings: Settings) -> float:
    """Socket timeout of a worker's Redis calls: within one renewal period.

    Redis answers in milliseconds or not at all; what matters is that the keeper's
    heartbeat and renewal, (1 + RETRIES) attempts each, fit in the lease TTL (at least two
    renewal periods, checked by config), so a partitioned owner notices its lost leases
    and closes its IMAP sessions before a successor opens its own.
    """
    bound = max(settings.lease_renew_s / (1 + RETRIES), settings.assignment_poll_s + BLOCK_MARGIN_S)
    return min(settings.net_timeout_s, bound)


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    """``SHARDWORKER_REDIS_SENTINELS`` as (host, port) pairs; ConfigError naming a bad entry."""
    out = []
    for entry in settings.redis_sentinels:
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{env_name('redis_sentinels')}: expected host:port, got {entry!r}")
        out.append((host.strip("[]"), int(port)))
    if out and not settings.redis_sentinel_master:
        raise ConfigError(
            f"{env_name('redis_sentinel_master')}: required when "
            f"{env_name('redis_sentinels')} is set"
        )
    return out


def redis_client(
    settings: Settings, *, timeout_s: float | None = None, retries: int = RETRIES
) -> redis.Redis:
    """A client for the configured Redis; ``timeout_s`` overrides the network timeouts."""
    call_s = call_timeout_s(settings) if timeout_s is None else timeout_s
    options: dict[str, Any] = {
        "socket_timeout": call_s,
        "socket_connect_timeout": min(settings.connect_timeout_s, call_s),
        "health_check_interval": HEALTH_CHECK_S,
        "retry": RecordingRetry(ExponentialBackoff(cap=1.0, base=0.05), retries, FailureRecord()),
        "socket_keepalive": True,
        "socket_keepalive_options": _KEEPALIVE,
    }
    sentinels = sentinel_addresses(settings)
    if not sentinels:
        return redis.Redis.from_url(settings.redis_url, **options)
    url: dict[str, Any] = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
    tls = url.pop("connection_class", None) is not None  # rediss:// (a unix path is refused)
    if "path" in url:
        raise ConfigError(f"{env_name('redis_url')}: a unix socket cannot be used with Sentinel")
    url = {k: v for k, v in url.items() if k not in ("host", "port")}
    # Sentinels answer from memory, in milliseconds: each is asked once, briefly, and
    # redis-py moves on to the next (redis-py's default retries made one call against
    # three silent Sentinels block for 100 s).
    sentinel_s = min(call_s, SENTINEL_TIMEOUT_S)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels,
        sentinel_kwargs={
            "socket_timeout": sentinel_s,
            "socket_connect_timeout": sentinel_s,
            "retry": Retry(NoBackoff(), 0),
        },
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, redis_class=redis.Redis, ssl=tls, **url, **options
    )
    return client
