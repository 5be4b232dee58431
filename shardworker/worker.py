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

from shardworker.config import Settings
from shardworker.db.status import StatusWriter
from shardworker.db.store import Store, open_pool
from shardworker.engine.cycle import CycleDeps
from shardworker.engine.loop import Engine
from shardworker.imap.connect import tls_context
from shardworker.logs import get_logger
from shardworker.mime import Caps
from shardworker.oauth import TokenRefresher
from shardworker.publish import Publisher
from shardworker.redisconn import redis_client as redis_client  # noqa: PLC0414 (re-export)
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


def build_worker(
    settings: Settings, *, on_released: Callable[[str], None] | None = None
) -> WorkerContext:
    pool = open_pool(settings.database_url, max_size=settings.db_pool_max)
    store = Store(pool)
    client = redis_client(settings)
    publisher = Publisher(client, settings)
    publisher.ensure_groups()
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
        oauth=TokenRefresher(settings, pool, store, secrets),
    )
    engine = Engine(deps, on_released=on_released)

    def close() -> None:
        status.close()
        pool.close()
        client.close()

    return WorkerContext(settings, store, publisher, engine, client, pool, close)
