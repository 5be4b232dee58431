"""Worker targets for the supervisor tests, and a tiny supervisor entry point.

Targets are top-level functions so the spawn start method can pickle them.  They report
through files in ``$SW_SUP_DIR``: ``slot<i>.pids`` gets ``<pid> <time>`` per start,
``ready-<i>-<pid>`` once ready, ``drained-<i>-<pid>`` (holding the recorded drain signals)
after a graceful drain.

``python -m tests.supervisor_targets <target> <workers> '<json kwargs>'`` runs a Supervisor
with JSON logs on stderr and exits with its result.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from shardworker.exitcodes import ExitCode
from shardworker.pool.childproc import ChildChannel

_POLL_S = 0.02
_DRAIN_WORK_S = 0.2


def _dir() -> Path:
    return Path(os.environ["SW_SUP_DIR"])


def _record_start(index: int) -> None:
    with (_dir() / f"slot{index}.pids").open("a") as f:
        f.write(f"{os.getpid()} {time.time()}\n")


def _ready(index: int, channel: ChildChannel) -> None:
    channel.ready()
    (_dir() / f"ready-{index}-{os.getpid()}").touch()


def serve(index: int, channel: ChildChannel) -> int:
    """Ready, busy until SIGTERM, then a short drain that leaves a marker."""
    _record_start(index)
    _ready(index, channel)
    return serve_until_drained(index, channel)


def serve_until_drained(index: int, channel: ChildChannel) -> int:
    while not channel.draining:
        time.sleep(_POLL_S)
    time.sleep(_DRAIN_WORK_S)
    marker = _dir() / f"drained-{index}-{os.getpid()}"
    marker.write_text(json.dumps(channel.drain_signals))
    return ExitCode.OK


def block_after_ready(index: int, channel: ChildChannel) -> int:
    """Main thread blocked longer than the ping timeout: the responder thread still answers."""
    _record_start(index)
    _ready(index, channel)
    time.sleep(float(os.environ.get("SW_SUP_BLOCK_S", "2.0")))
    return serve_until_drained(index, channel)


def ignore_drain(index: int, channel: ChildChannel) -> int:
    """Ready, then never looks at the drain flag."""
    _record_start(index)
    _ready(index, channel)
    while True:
        time.sleep(_POLL_S)


def boot_fail_slot1(index: int, channel: ChildChannel) -> int:
    """Slot 1 cannot boot; the others serve."""
    if index == 1:
        _record_start(index)
        return ExitCode.WORKER_BOOT_ERROR
    return serve(index, channel)


def dependency_down_at_first_boot(index: int, channel: ChildChannel) -> int:
    """Slot 0's first start finds its stores unreachable; later starts serve."""
    _record_start(index)
    starts = (_dir() / f"slot{index}.pids").read_text().splitlines()
    if index == 0 and len(starts) == 1:
        return ExitCode.DEPENDENCY_UNAVAILABLE
    _ready(index, channel)
    return serve_until_drained(index, channel)


def ready_then_exit(index: int, channel: ChildChannel) -> int:
    """Crashes right after boot, with the boot-error code: that is a crash, not a halt."""
    _record_start(index)
    _ready(index, channel)
    return ExitCode.WORKER_BOOT_ERROR


def thread_dies_once(index: int, channel: ChildChannel) -> int:
    """Ready, then (first start only) a background thread dies of an unexpected error."""
    from shardworker import logs

    logs.configure("INFO")  # a spawned child configures its own logging, as worker_main does
    _record_start(index)
    _ready(index, channel)
    if len((_dir() / f"slot{index}.pids").read_text().splitlines()) == 1:

        def keeper() -> None:
            raise RuntimeError("renewal bug in redis://:hunter2@redis:6379/0")

        threading.Thread(target=keeper, name="keeper", daemon=True).start()
    return serve_until_drained(index, channel)


def never_ready(index: int, channel: ChildChannel) -> int:
    """Boots forever."""
    _record_start(index)
    while True:
        time.sleep(_POLL_S)


def main(argv: list[str]) -> int:
    from shardworker import logs
    from shardworker.pool.supervisor import Supervisor

    logs.configure("INFO")
    module = importlib.import_module("tests.supervisor_targets")
    target = getattr(module, argv[0])
    supervisor = Supervisor(int(argv[1]), target, pod_identity="test-pod", **json.loads(argv[2]))
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
