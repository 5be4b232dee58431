"""The one way a process builds its Redis client: bounded timeouts and a short retry."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shardworker.config import Settings


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.net_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        health_check_interval=30,
        # redis-py retries 10 times by default; an outage must surface quickly as a
        # PublishError so the engine backs off instead of blocking a sync thread.
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 2),
    )
