"""Whether this member reaches PostgreSQL: a probe on its own connection.

An owner whose PostgreSQL is silent cannot checkpoint, yet its lease renewals (Redis)
succeed, so no other member could take its providers over (``pool/agent.py`` decides what
to do about it).  The engine's own failures are a poor gauge of that: a sync waits in a
pool checkout behind other stuck syncs, and a member with nothing to sync has no outcome
at all.  So a thread runs ``SELECT 1`` every ``every_s`` on a connection of its own, outside
the pool, with a short deadline (libpq ``connect_timeout`` and ``tcp_user_timeout``, see
``db/link.py``): a silent link fails a probe within the deadline, a slow server does not
(TCP acknowledges what a busy server has not answered yet).

The libpq bounds only see a silent *link*.  A peer that acknowledges but never answers
(a frozen server, or a connection pooler whose PostgreSQL is cut off) holds a probe for as
long as that lasts, so a probe still unanswered after its deadline counts as failed too;
it ends by itself when the answer comes.

``down_for()`` is how long PostgreSQL has been unreachable: the time since the last
successful probe while the latest one failed (or is overdue), else 0.  The thread has a stop message
(``stop``), a bounded join, and plain counters.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import psycopg

from shardworker.db.link import LinkTimeouts, link_conninfo
from shardworker.logs import get_logger

log = get_logger(__name__)


class DatabaseWatch:
    def __init__(
        self, dsn: str, *, every_s: float, deadline_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        bounds = LinkTimeouts(connect_s=deadline_s, silence_s=deadline_s)
        self._conninfo = link_conninfo(dsn, bounds)
        self.every_s = every_s
        self.deadline_s = deadline_s
        self.clock = clock
        self._inflight_since: float | None = None  # a probe waiting for its answer
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._lock = threading.Lock()
        self._last_ok = clock()  # the worker booted with a working pool
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.probes = 0
        self.failures = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="db-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return  # stuck in a probe: a daemon thread, its connection dies with us
        self._close()

    def healthy(self) -> bool:
        """The latest probe succeeded (and none is overdue)."""
        with self._lock:
            return not self._down()

    def ok_age(self) -> float:
        """Seconds since the last successful probe (however the latest went)."""
        with self._lock:
            return self.clock() - self._last_ok

    def down_for(self) -> float:
        """Seconds since the last successful probe while the latest failed; else 0."""
        with self._lock:
            return self.clock() - self._last_ok if self._down() else 0.0

    def _down(self) -> bool:
        since = self._inflight_since
        return self._failing or (since is not None and self.clock() - since > self.deadline_s)

    def probe_once(self) -> bool:
        self.probes += 1
        with self._lock:
            self._inflight_since = self.clock()
        try:
            if self._conn is None:
                self._conn = psycopg.connect(self._conninfo, autocommit=True)
            self._conn.execute("SELECT 1")
        except psycopg.Error as exc:
            self.failures += 1
            self._close()
            with self._lock:
                self._inflight_since = None
                first = not self._failing
                self._failing = True
            if first:
                log.warning("database_unreachable", error_type=type(exc).__name__)
            return False
        with self._lock:
            recovered, self._failing = self._failing, False
            self._inflight_since = None
            self._last_ok = self.clock()
        if recovered:
            log.info("database_reachable")
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.probe_once()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
