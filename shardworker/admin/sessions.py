"""Console sessions, CSRF tokens and the login rate limit, held in the admin process.

A session is a random id in an HttpOnly, SameSite=Strict cookie; the server keeps its CSRF
token and its times.  It ends ``idle_s`` after the last page or action (the live-figure
polls do not count, so an open tab does not keep a session forever) and ``max_age_s``
after the login at the latest.  Sessions live in memory: a restarted coordinator logs
everyone out, which is what an operator expects of a restarted admin listener.

Logins are limited per client address and in total, so guessing the token from many
addresses is slowed too; a refused attempt looks like any other wrong token.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

SESSION_IDLE_S = 1800.0
SESSION_MAX_AGE_S = 12 * 3600.0
MAX_SESSIONS = 1000


@dataclass
class Session:
    sid: str
    csrf: str
    created: float
    seen: float
    flash: list[str] = field(default_factory=list)


class Sessions:
    def __init__(
        self, idle_s: float = SESSION_IDLE_S, max_age_s: float = SESSION_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self) -> Session:
        now = self.clock()
        made = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._expire(now)
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions.values(), key=lambda s: s.seen)
                del self._sessions[oldest.sid]
            self._sessions[made.sid] = made
        return made

    def get(self, sid: str | None, *, touch: bool = True) -> Session | None:
        if not sid:
            return None
        now = self.clock()
        with self._lock:
            found = self._sessions.get(sid)
            if found is None:
                return None
            if self._expired(found, now):
                del self._sessions[sid]
                return None
            if touch:
                found.seen = now
            return found

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.seen > self.idle_s or now - session.created > self.max_age_s

    def _expire(self, now: float) -> None:
        for sid in [s.sid for s in self._sessions.values() if self._expired(s, now)]:
            del self._sessions[sid]


def csrf_ok(session: Session, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(session.csrf.encode(), (given or "").encode())


class LoginLimiter:
    """At most ``per_client`` failed logins per client and ``total`` overall per window."""

    def __init__(
        self, per_client: int = 5, total: int = 50, window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.per_client = per_client
        self.total = total
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()
        self._lock = threading.Lock()

    def allowed(self, client: str) -> bool:
        now = self.clock()
        with self._lock:
            self._trim(self._all, now)
            mine = self._failures.get(client)
            if mine is not None:
                self._trim(mine, now)
                if not mine:
                    del self._failures[client]
            return len(self._all) < self.total and (mine is None or len(mine) < self.per_client)

    def failed(self, client: str) -> None:
        now = self.clock()
        with self._lock:
            self._all.append(now)
            if len(self._failures) < 10_000 or client in self._failures:
                self._failures.setdefault(client, deque()).append(now)

    def _trim(self, times: deque[float], now: float) -> None:
        while times and now - times[0] > self.window_s:
            times.popleft()
