"""The child side of the supervisor protocol: ready signal, ping answers, drain flag.

A worker process gets a :class:`ChildChannel`.  It calls ``ready()`` once it has booted
(clients built, stores reachable); from then on the supervisor pings it over the pipe and
replaces it if it stops answering.  Answers come from a daemon thread, so a worker whose
main thread is busy still counts as alive, while a stopped or wedged process does not.

SIGTERM only records itself (``draining``); the worker's own loop notices and drains.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import FrameType

from shardworker.exitcodes import ExitCode
from shardworker.logs import get_logger, set_process_context

log = get_logger(__name__)
_URL_CREDENTIALS = re.compile(r"(//)[^/@\s]*@")

PING = b"ping"
PONG = b"pong"
READY = b"ready"

# How often the responder looks up from the pipe to notice close(): its stop path.
_POLL_S = 0.5
_JOIN_S = 1.0
_PR_SET_DUMPABLE = 4


class ChildChannel:
    """What a worker process knows about its supervisor."""

    def __init__(self, index: int, pod_identity: str, conn: Connection) -> None:
        self.index = index
        self.pod_identity = pod_identity
        self.drain_signals: list[int] = []
        self.supervisor_gone = False
        self._conn = conn
        self._send_lock = threading.Lock()
        self._closed = threading.Event()
        self._responder: threading.Thread | None = None

    @property
    def draining(self) -> bool:
        """True once SIGTERM arrived, or the supervisor went away (nobody would restart us)."""
        return bool(self.drain_signals) or self.supervisor_gone

    def ready(self) -> None:
        """Boot succeeded: from now on an exit is a crash, not a boot failure."""
        self.start_ping_responder()
        self._send(READY)

    def start_ping_responder(self) -> None:
        if self._responder is None:
            self._responder = threading.Thread(
                target=self._answer_pings, name="supervisor-ping", daemon=True
            )
            self._responder.start()

    def record_signal(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: record only; the worker's loop decides what to do."""
        self.drain_signals.append(signum)

    def close(self) -> None:
        self._closed.set()
        if self._responder is not None:
            self._responder.join(_JOIN_S)
        self._conn.close()

    def _answer_pings(self) -> None:
        while not self._closed.is_set():
            try:
                if not self._conn.poll(_POLL_S):
                    continue
                message = self._conn.recv_bytes()
            except (EOFError, OSError):
                self.supervisor_gone = not self._closed.is_set()
                return
            if message == PING:
                self._send(PONG)

    def _send(self, message: bytes) -> None:
        # ready() runs on the main thread while the responder answers pings.
        # OSError means the supervisor is gone; the responder records that when it reads EOF.
        with self._send_lock, contextlib.suppress(OSError):
            self._conn.send_bytes(message)


def _scrub(text: str) -> str:
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def end_process_on_thread_death(exit_process: Callable[[int], object] = os._exit) -> None:
    """Make a background thread that dies of an unexpected error end the whole process.

    A worker without its lease keeper or assigner would go on half-alive (leases
    unrenewed, assignments unread) with nobody noticing; ended, it is restarted by the
    supervisor in the same slot, and its leases pass on after their TTL (the fence keeps
    the old process from publishing meanwhile).  The log line says which thread and why.
    """

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        trace = "".join(
            traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
        )
        log.error("thread_died", thread=name, error_type=args.exc_type.__name__,
                  error=_scrub(str(args.exc_value)), traceback=_scrub(trace),
                  exit_code=int(ExitCode.THREAD_DIED))  # fmt: skip
        exit_process(ExitCode.THREAD_DIED)

    threading.excepthook = hook


def make_non_dumpable() -> None:
    """No core dumps and no ptrace/`/proc/<pid>/mem` for same-uid processes.

    A worker parses untrusted mail and holds decrypted passwords and tokens: a crash must
    not write them to disk, and a compromised neighbour must not read them.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def run_child(
    target: Callable[[int, ChildChannel], int], index: int, pod_identity: str, conn: Connection
) -> None:
    """Entry point of a spawned worker: exits with whatever ``target`` returns."""
    make_non_dumpable()
    channel = ChildChannel(index, pod_identity, conn)
    signal.signal(signal.SIGTERM, channel.record_signal)
    # Ctrl-C reaches the whole process group; the supervisor turns it into one SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_process_context(worker=index, pod=pod_identity)
    end_process_on_thread_death()
    try:
        code = target(index, channel)
    finally:
        channel.close()
    sys.exit(code)
