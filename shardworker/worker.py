"""One worker process: builds its own clients from settings and runs the engine.

Nothing live crosses a process boundary: the Redis client, the PostgreSQL pool and the
IMAP sockets are all made here.  What the worker serves comes from an assignment
source: the whole database (single-process mode) or the pool's lease manager.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shardworker.config import Settings
from shardworker.db.store import ProviderConfig, Store, open_pool
from shardworker.engine.cycle import CycleDeps
from shardworker.engine.loop import Engine
from shardworker.imap.connect import tls_context
from shardworker.logs import get_logger
from shardworker.mime import Caps
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
    pool = open_pool(settings.database_url, max_size=settings.db_pool_max)
    store = Store(pool)
    client = redis_client(settings)
    publisher = Publisher(client, settings)
    publisher.ensure_groups()
    deps = CycleDeps(
        settings=settings,
        store=store,
        secrets=SecretStore(settings, pool),
        publisher=publisher,
        caps=Caps.from_settings(settings),
        ssl_context=tls_context(settings.tls_ca_file),
    )
    engine = Engine(deps, on_released=on_released)

    def close() -> None:
        pool.close()
        client.close()

    return WorkerContext(settings, store, publisher, engine, client, close)


def serve_database(ctx: WorkerContext, stop: threading.Event) -> None:
    """Single-process mode: serve every active, unpaused IMAP provider in the database."""
    interval = ctx.settings.provider_refresh_s
    known: int | None = None
    while not stop.is_set():
        try:
            configs: list[ProviderConfig] = [c for c in ctx.store.load_providers() if not c.paused]
        except Exception:
            log.error("provider_refresh_failed", exc=True)
        else:
            if len(configs) != known:
                log.info("providers_loaded", count=len(configs))
                known = len(configs)
            ctx.engine.update_providers(configs)
        stop.wait(interval)


def install_signal_handlers(engine: Engine) -> None:
    """The first SIGTERM/SIGINT drains; a second one exits at once."""
    seen: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)
        if len(seen) > 1:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        engine.request_stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def run_single(settings: Settings) -> int:
    ctx = build_worker(settings)
    stop = threading.Event()
    refresher = threading.Thread(
        target=serve_database, args=(ctx, stop), name="providers", daemon=True
    )
    install_signal_handlers(ctx.engine)
    refresher.start()
    log.info("worker_started", mode="single")
    try:
        ctx.engine.run(drain_deadline_s=settings.drain_deadline_s)
    finally:
        stop.set()
        refresher.join(timeout=5)
        ctx.close()
    log.info("worker_stopped", published=ctx.engine.stats.published)
    return 0
