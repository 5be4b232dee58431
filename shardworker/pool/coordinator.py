"""``shardworker run``: a coordinator (supervisor + leader thread) and W worker processes.

Each worker process is a pool member ``<pod>/<index>``; the identity is stable across
restarts of the process (same slot) and of the pod (``POD_NAME`` from a StatefulSet), so a
member that comes back within the grace period keeps its providers.  What a worker process
runs is given by the caller (``shardworker.worker.worker_main``, wired in the runner), so
the pool never imports the worker it supervises.
"""

from __future__ import annotations

from types import TracebackType

from shardworker import logs, metrics
from shardworker.config import Settings
from shardworker.db.link import LinkTimeouts
from shardworker.db.ownership import OwnershipStore
from shardworker.db.store import open_pool
from shardworker.logs import get_logger
from shardworker.pool.leader import Leader
from shardworker.pool.observer import PodObserver
from shardworker.pool.registry import Registry
from shardworker.pool.supervisor import Supervisor, Target
from shardworker.redisconn import redis_client

log = get_logger(__name__)


class Coordinator:
    """The pod's coordinator process: metrics directory, leader, observer, supervisor.

    ``with Coordinator(...) as c: c.run()``: entering starts the leader and the observer,
    leaving stops them and closes the clients, whatever ``run`` did.
    """

    def __init__(self, settings: Settings, worker_main: Target) -> None:
        self.settings = settings
        self.worker_main = worker_main

    def __enter__(self) -> Coordinator:
        settings, identity = self.settings, self.settings.identity
        logs.set_process_context(pod=identity, role="coordinator")
        # Before any worker is spawned: the children inherit the directory through the
        # environment.
        self._metrics_dir = metrics.use_multiprocess_dir(settings.metrics_dir)
        self._client = redis_client(settings)
        self._pool = open_pool(settings.database_url, 3, link=LinkTimeouts.from_settings(settings))
        self.leader = Leader(settings, Registry(self._client), OwnershipStore(self._pool), identity)
        self.supervisor = Supervisor(
            settings.worker_count, self.worker_main, pod_identity=identity,
            drain_deadline_s=settings.drain_deadline_s,
            ping_timeout_s=settings.worker_ping_timeout_s,
        )  # fmt: skip
        self.observer = PodObserver(settings, self.supervisor, self.leader, self._pool)
        self.supervisor.on_tick = self.observer.tick
        self.observer.start()
        self.leader.start()
        log.info("coordinator_started", workers=settings.worker_count)
        return self

    def run(self) -> int:
        code = self.supervisor.run()
        log.info("coordinator_stopped", code=int(code))
        return code

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.observer.stop()
        self.leader.stop()
        self._pool.close()
        self._client.close()
        self._metrics_dir.close()
