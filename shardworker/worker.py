"""What a worker process builds for itself: clients, stores and the engine.

Nothing live crosses a process boundary: the Redis client, the PostgreSQL pool and the
IMAP sockets are all made here, from settings.  What the engine serves is decided by the
pool agent (shardworker.pool.agent).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis
from psycopg_pool import ConnectionPool
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shardworker.config import Settings
from shardworker.db.status import StatusWriter
from shardworker.db.store import Store, open_pool
from shardworker.engine.cycle import CycleDeps
from shardworker.engine.loop import Engine
from shardworker.imap.connect import tls_context
from shardworker.logs import get_logger
from shardworker.mime import Caps
from shardworker.netpolicy import OutboundPolicy
from shardworker.oauth import TokenRefresher
from shardworker.publish import Publisher
from shardworker.secrets.store import SecretStore

log = get_logger(__name__)


@dataclass
class WorkerContext:
    settings: Settings
    store: Store
    publisher: Publisher
    engine: Engine
    redis: redis.Redis
    pool: ConnectionPool
    close: Callable[[], None]


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


def build_worker(
    settings: Settings, *, on_released: Callable[[str], None] | None = None
) -> WorkerContext:
    # Redis first: a boot retried through a Redis outage then leaks no PostgreSQL pool.
    client = redis_client(settings)
    publisher = Publisher(client, settings)
    publisher.ensure_groups()
    pool = open_pool(settings.database_url, max_size=settings.db_pool_max)
    store = Store(pool)
    secrets = SecretStore(settings, pool)
    status = StatusWriter(pool)
    status.start()
    deps = CycleDeps(
        settings=settings,
        store=store,
        secrets=secrets,
        publisher=publisher,
        caps=Caps.from_settings(settings),
        status=status,
        ssl_context=tls_context(settings.tls_ca_file),
        oauth=(oauth := TokenRefresher(settings, pool, store, secrets)),
        outbound=OutboundPolicy.from_settings(settings),
    )
    engine = Engine(deps, on_released=on_released)

    def close() -> None:
        oauth.close()
        status.close()
        pool.close()
        client.close()

    return WorkerContext(settings, store, publisher, engine, client, pool, close)
