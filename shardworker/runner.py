"""``shardworker run``: wire the pod together and start it.

The runner is the one place that knows every part: the coordinator (pool), the worker
process it spawns (``worker.worker_main``) and the admin API.  The parts do not know
each other, so the pool never imports admin or the worker, and admin never imports the
coordinator.
"""

from __future__ import annotations

from shardworker import boot, logs
from shardworker.config import Settings


def run(settings: Settings) -> int:
    logs.configure(settings.log_level)
    from shardworker.admin.api import AdminApi, start_admin_api
    from shardworker.pool.coordinator import Coordinator
    from shardworker.sink import sink_factory
    from shardworker.worker import worker_main

    # Configuration first (exit 2 whatever the stores do), then the stores.
    sink_factory(settings)  # an unknown SHARDWORKER_SINK stops start-up, not every worker
    boot.preflight(settings)  # ConfigError (exit 2) or DependencyUnavailableError (exit 7)
    boot.scrub_worker_environment()
    with Coordinator(settings, worker_main) as coordinator:
        admin: AdminApi | None = None
        try:
            # In the coordinator process, on its own address (SHARDWORKER_ADMIN_ADDR).
            admin = start_admin_api(settings)
            return coordinator.run()
        finally:
            if admin is not None:
                admin.close()
