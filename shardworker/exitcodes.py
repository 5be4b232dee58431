"""Named process exit codes (the coordinator and the CLI use the same names)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    CONFIG = 2
    UNHEALTHY = 3
    # A worker that cannot boot (bad settings, unreachable stores at start) exits with this;
    # the coordinator then halts the pod instead of respawning it forever.
    WORKER_BOOT_ERROR = 4
    # The coordinator halted because a worker failed at boot.
    HALTED = 5
    # A worker's background thread (lease keeper, assigner, status writer...) died of an
    # unexpected error: the process ends so that the supervisor restarts it whole.
    THREAD_DIED = 6
    # PostgreSQL or Redis stayed unreachable for SHARDWORKER_BOOT_WAIT_S at start: an outage,
    # not a mistake.  A worker exiting with it is restarted; the coordinator exits with it
    # and lets the orchestrator restart the pod.
    DEPENDENCY_UNAVAILABLE = 7
    INTERRUPTED = 130
