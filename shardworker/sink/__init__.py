"""Where events go: the sink interface (``base``), its implementations, and the one place
that chooses between them (``SHARDWORKER_SINK``).

Adding a sink is one module here with an ``open_sink(settings, redis_client)`` factory
and one entry in :data:`SINKS`; nothing in the engine, the pool or the worker changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import redis

from shardworker.config import Settings, env_name
from shardworker.errors import ConfigError
from shardworker.sink import redis_streams
from shardworker.sink.base import Sink

SinkFactory = Callable[[Settings, redis.Redis], Sink]

# SHARDWORKER_SINK value -> factory.  The Redis client is the worker's own (the one its
# leases live in), so a Redis-backed sink can check the lease token atomically.
SINKS: Mapping[str, SinkFactory] = {
    "redis-streams": redis_streams.open_sink,
}


def sink_factory(settings: Settings, available: Mapping[str, SinkFactory] = SINKS) -> SinkFactory:
    """The factory ``settings.sink`` names; ConfigError naming the choices otherwise."""
    try:
        return available[settings.sink]
    except KeyError:
        raise ConfigError(
            f"{env_name('sink')}: unknown sink {settings.sink!r}; use one of {sorted(available)}"
        ) from None


def open_sink(
    settings: Settings, client: redis.Redis, available: Mapping[str, SinkFactory] = SINKS
) -> Sink:
    return sink_factory(settings, available)(settings, client)
