"""``shardworker run``: start the service."""

from __future__ import annotations

from shardworker import logs
from shardworker.config import Settings


def run(settings: Settings) -> int:
    logs.configure(settings.log_level)
    from shardworker.pool.coordinator import run_pool

    return run_pool(settings)
