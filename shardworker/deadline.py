"""Total deadlines for outbound requests, not per-socket-operation timeouts.

A socket timeout restarts with every byte, so a peer that drips one byte a second keeps
a connect, TLS handshake, greeting or token request alive for as long as it likes.
:class:`Deadline` is the wall-clock budget of one request; :func:`watch` arms the
process's one watchdog thread to shut the socket down when the budget is spent, which
fails whatever call is blocked on it at once, in any thread.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator


class Deadline:
    """A point on the monotonic clock by which a whole request must be done."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self.at = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - self._clock())

    @property
    def expired(self) -> bool:
        return self._clock() >= self.at


class Watch:
    """One armed request; ``fired`` tells a caller its failure was the deadline.

    :meth:`track` keeps a duplicate of the request's socket descriptor: shutting the
    duplicate down ends the connection for every descriptor of it, so the watch still
    works after TLS (or STARTTLS) has wrapped and detached the original socket object.
    """

    def __init__(self, at: float) -> None:
        self.at = at
        self.fired = False
        self.cancelled = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            if not self.cancelled:
                self._socks.append(sock.dup())
                if self.fired:
                    self._shutdown()

    def fire(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.fired = True
            self._shutdown()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()

    def _shutdown(self) -> None:
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """A heap of watches and one daemon thread that fires them when due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, watch: Watch) -> None:
        with self._cond:
            heapq.heappush(self._heap, (watch.at, next(self._seq), watch))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="deadline-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._pop_due()
            for watch in due:
                watch.fire()

    def _pop_due(self) -> list[Watch]:
        while True:
            while self._heap and self._heap[0][2].cancelled:
                heapq.heappop(self._heap)
            if not self._heap:
                self._cond.wait()
                continue
            wait_s = self._heap[0][0] - time.monotonic()
            if wait_s <= 0:
                return [heapq.heappop(self._heap)[2]]
            self._cond.wait(wait_s)


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def watch(deadline: Deadline) -> Iterator[Watch]:
    """Shut every socket the block ``track``s down if it is still running at ``deadline``."""
    w = Watch(time.monotonic() + deadline.remaining())
    _WATCHDOG.arm(w)
    try:
        yield w
    finally:
        w.cancel()
