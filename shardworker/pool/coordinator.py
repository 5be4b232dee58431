"""``shardworker run``: a coordinator (supervisor + leader thread) and W worker processes.

Each worker process is a pool member ``<pod>/<index>``; the identity is stable across
restarts of the process (same slot) and of the pod (``POD_NAME`` from a StatefulSet), so a
member that comes back within the grace period keeps its providers.
"""

from __future__ import annotations

import os
import queue
import threading

from shardworker import boot, logs, metrics
from shardworker.admin.api import AdminApi, start_admin_api
from shardworker.config import Settings, load_settings
from shardworker.db.ownership import OwnershipStore
from shardworker.db.store import open_pool
from shardworker.exitcodes import ExitCode
from shardworker.logs import get_logger
from shardworker.pool.agent import PoolAgent
from shardworker.pool.childproc import ChildChannel
from shardworker.pool.leader import Leader
from shardworker.pool.leases import LeaseManager
from shardworker.pool.observer import PodObserver
from shardworker.pool.registry import Registry
from shardworker.pool.supervisor import Supervisor
from shardworker.worker import WorkerContext, build_worker, redis_client

log = get_logger(__name__)


def member_id(settings: Settings, index: int) -> str:
    return f"{settings.identity}/{index}"


def engine_drain_deadline(settings: Settings) -> float:
    return max(0.5, min(settings.drain_deadline_s * 0.75, settings.drain_deadline_s - 2.0))


def _boot(settings: Settings, member: str) -> tuple[WorkerContext, PoolAgent]:
    released: queue.SimpleQueue[str] = queue.SimpleQueue()
    ctx = build_worker(settings, on_released=released.put)
    leases = LeaseManager(ctx.redis, OwnershipStore(ctx.pool), member, settings.lease_ttl_s)
    agent = PoolAgent(
        settings, member, registry=Registry(ctx.redis), leases=leases, store=ctx.store,
        engine=ctx.engine, released=released,
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


def run_pool(settings: Settings) -> int:
    identity = settings.identity
    logs.set_process_context(pod=identity, role="coordinator")
    # Before any worker is spawned: the children inherit the directory through the environment.
    metrics_dir = metrics.use_multiprocess_dir(settings.metrics_dir)
    client = redis_client(settings)
    pool = open_pool(settings.database_url, max_size=3)
    leader = Leader(settings, Registry(client), OwnershipStore(pool), identity)
    supervisor = Supervisor(
        settings.worker_count, worker_main, pod_identity=identity,
        drain_deadline_s=settings.drain_deadline_s, ping_timeout_s=settings.worker_ping_timeout_s,
    )  # fmt: skip
    observer = PodObserver(settings, supervisor, leader, pool)
    supervisor.on_tick = observer.tick
    observer.start()
    leader.start()
    log.info("coordinator_started", workers=settings.worker_count)
    admin: AdminApi | None = None
    try:
        # In the coordinator, on its own address (SHARDWORKER_ADMIN_ADDR, not the metrics one).
        admin = start_admin_api(settings)
        code = supervisor.run()
    finally:
        if admin is not None:
            admin.close()
        observer.stop()
        leader.stop()
        pool.close()
        client.close()
        metrics_dir.close()
    log.info("coordinator_stopped", code=int(code))
    return code
