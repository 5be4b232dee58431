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

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from shardworker.config import Settings, env_name
from shardworker.errors import ConfigError

# Health checks catch a connection that a NAT or a failover silently dropped.
HEALTH_CHECK_S = 30
# redis-py retries 10 times by default; an outage must surface quickly as a PublishError
# so the engine backs off instead of blocking a sync thread.
RETRIES = 2


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
    options: dict[str, Any] = {
        "socket_timeout": settings.net_timeout_s if timeout_s is None else timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s if timeout_s is None else timeout_s,
        "health_check_interval": HEALTH_CHECK_S,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
    }
    sentinels = sentinel_addresses(settings)
    if not sentinels:
        return redis.Redis.from_url(settings.redis_url, **options)
    url: dict[str, Any] = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
    tls = url.pop("connection_class", None) is not None  # rediss:// (a unix path is refused)
    if "path" in url:
        raise ConfigError(f"{env_name('redis_url')}: a unix socket cannot be used with Sentinel")
    url = {k: v for k, v in url.items() if k not in ("host", "port")}
    # Sentinels answer from memory: the connect timeout bounds a dead one, and redis-py
    # moves on to the next.
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels,
        sentinel_kwargs={
            "socket_timeout": options["socket_connect_timeout"],
            "socket_connect_timeout": options["socket_connect_timeout"],
        },
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, redis_class=redis.Redis, ssl=tls, **url, **options
    )
    return client
