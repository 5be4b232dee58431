"""``shardworker run``: start the service."""

from __future__ import annotations

from shardworker import logs
from shardworker.config import Settings


def run(settings: Settings) -> int:
    logs.configure(settings.log_level)
    from shardworker.worker import run_single

    return run_single(settings)
