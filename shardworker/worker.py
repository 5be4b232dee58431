"""One worker process: what it builds for itself, and its main function.

Nothing live crosses a process boundary: the Redis client, the PostgreSQL pool and the
IMAP sockets are all made here, from settings.  What the engine serves is decided by the
pool agent (shardworker.pool.agent); the coordinator spawns :func:`worker_main`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis
from psycopg_pool import ConnectionPool

from shardworker import boot, logs
from shardworker.config import Settings, load_settings
from shardworker.db.link import LinkTimeouts
from shardworker.db.ownership import OwnershipStore
from shardworker.db.status import StatusWriter
from shardworker.db.store import Store, open_pool
from shardworker.engine.cycle import CycleDeps
from shardworker.engine.loop import Engine
from shardworker.exitcodes import ExitCode
from shardworker.gate import MessageGate
from shardworker.imap.connect import tls_context
from shardworker.logs import get_logger
from shardworker.metrics import providers as provider_metrics
from shardworker.mime import Caps
from shardworker.netpolicy import OutboundPolicy
from shardworker.oauth import TokenRefresher
from shardworker.pool.agent import PoolAgent
from shardworker.pool.childproc import ChildChannel
from shardworker.pool.dbwatch import DatabaseWatch
from shardworker.pool.leases import LeaseManager
from shardworker.pool.registry import Registry
from shardworker.redisconn import BLOCK_MARGIN_S, redis_client
from shardworker.secrets.store import SecretStore
from shardworker.sink import SINKS, SinkFactory, open_sink
from shardworker.sink.base import Sink

log = get_logger(__name__)


@dataclass
class WorkerContext:
    settings: Settings
    store: Store
    sink: Sink
    engine: Engine
    redis: redis.Redis
    pool: ConnectionPool
    close: Callable[[], None]


def build_worker(
    settings: Settings,
    *,
    on_released: Callable[[str], None] | None = None,
    sinks: Mapping[str, SinkFactory] = SINKS,
) -> WorkerContext:
    # Redis first: a boot retried through a Redis outage then leaks no PostgreSQL pool.
    client = redis_client(settings)
    sink = open_sink(settings, client, sinks)
    sink.prepare()
    pool = open_pool(
        settings.database_url, settings.db_pool_max, link=LinkTimeouts.from_settings(settings)
    )
    store = Store(pool)
    secrets = SecretStore(settings, pool)
    status = StatusWriter(pool)
    status.start()
    deps = CycleDeps(
        settings=settings,
        store=store,
        secrets=secrets,
        sink=sink,
        caps=Caps.from_settings(settings),
        status=status,
        ssl_context=tls_context(settings.tls_ca_file),
        oauth=(oauth := TokenRefresher(settings, pool, status, secrets)),
        outbound=OutboundPolicy.from_settings(settings),
        gate=MessageGate.from_settings(
            settings, client, on_trip=provider_metrics.loop_guard_tripped,
            on_held=provider_metrics.loop_guard_held,
        ),
        redis=client,
    )  # fmt: skip
    engine = Engine(deps, on_released=on_released)

    def close() -> None:
        oauth.close()
        status.close()
        pool.close()
        client.close()

    return WorkerContext(settings, store, sink, engine, client, pool, close)


def member_id(settings: Settings, index: int) -> str:
    return f"{settings.identity}/{index}"


def engine_drain_deadline(settings: Settings) -> float:
    return max(0.5, min(settings.drain_deadline_s * 0.75, settings.drain_deadline_s - 2.0))


def _boot(settings: Settings, member: str) -> tuple[WorkerContext, PoolAgent]:
    released: queue.SimpleQueue[str] = queue.SimpleQueue()
    ctx = build_worker(settings, on_released=released.put)
    leases = LeaseManager(ctx.redis, OwnershipStore(ctx.pool), member, settings.lease_ttl_s)
    # libpq's connect deadline has a floor of 2 s; a renewal round is the probe's cadence.
    database = DatabaseWatch(settings.database_url, every_s=settings.lease_renew_s,
                             deadline_s=max(2.0, settings.lease_renew_s))  # fmt: skip
    # The pause between assignment rounds blocks for up to assignment_check_s: on a
    # connection of its own, so the keeper's calls keep their short timeout.
    waiter = redis_client(settings, timeout_s=settings.assignment_check_s + BLOCK_MARGIN_S)
    agent = PoolAgent(
        settings, member, registry=Registry(ctx.redis), leases=leases, store=ctx.store,
        engine=ctx.engine, released=released, database=database, wait_client=waiter,
    )  # fmt: skip
    return ctx, agent


def _watch_drain(channel: ChildChannel, agent: PoolAgent, stop: threading.Event) -> None:
    while not stop.wait(0.1):
        if channel.draining:
            agent.begin_drain()
            return


def worker_main(index: int, channel: ChildChannel) -> int:
    """One worker process (spawned): boot, report ready, serve until drained."""
    try:
        settings = load_settings()
        logs.configure(settings.log_level)
        logs.set_process_context(pid=os.getpid())
        member = member_id(settings, index)
        ctx, agent = boot.with_retries(lambda: _boot(settings, member), settings)
    except Exception as exc:
        return boot.report_boot_failure(index, exc)
    channel.ready()
    agent.start()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_drain, args=(channel, agent, stop), daemon=True)
    watcher.start()
    log.info("worker_started", member=member)
    try:
        # The engine must finish (and release its leases) before the supervisor's own
        # deadline SIGKILLs the process, or successors wait for the lease TTLs.
        ctx.engine.run(drain_deadline_s=engine_drain_deadline(settings))
    finally:
        stop.set()
        agent.stop()
        ctx.close()
    log.info("worker_stopped", member=member, published=ctx.engine.stats.published)
    return ExitCode.OK
