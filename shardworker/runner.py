"""``shardworker run``: start the service."""

from __future__ import annotations

from shardworker import boot, logs
from shardworker.config import Settings


def run(settings: Settings) -> int:
    logs.configure(settings.log_level)
    boot.preflight(settings)  # ConfigError (exit 2) or DependencyUnavailableError (exit 6)
    boot.scrub_worker_environment()
    from shardworker.pool.coordinator import run_pool

    return run_pool(settings)
