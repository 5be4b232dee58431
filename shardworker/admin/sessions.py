"""Console sessions, CSRF tokens and the login rate limit, held in the admin process.

A session is a random id in an HttpOnly, SameSite=Strict cookie; the server keeps its CSRF
token, its times and its pending notes.  It ends ``idle_s`` after the last page or action
(the live-figure polls do not count, so an open tab does not keep a session forever) and
``max_age_s`` after the login at the latest.

:class:`RedisSessions` keeps them in Redis (``sw:console:session:<sha256 of the id>``,
expiring with the session), so every pod behind the console's Service knows every
session and a restarted coordinator logs nobody out; Redis never sees the cookie value
itself.  :class:`Sessions` keeps them in memory (tests, and the same interface).

Logins are limited per client address and in total, so guessing the token from many
addresses is slowed too (:class:`RedisLoginLimiter` counts across pods).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import redis

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

    def save(self, session: Session) -> None:
        """Store a change of ``flash`` (in memory the object itself is the store)."""

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.seen > self.idle_s or now - session.created > self.max_age_s

    def _expire(self, now: float) -> None:
        for sid in [s.sid for s in self._sessions.values() if self._expired(s, now)]:
            del self._sessions[sid]


SESSION_PREFIX = "sw:console:session:"


class RedisSessions(Sessions):
    """The same sessions, kept in Redis for every pod of the pool."""

    def __init__(
        self, client: redis.Redis, idle_s: float = SESSION_IDLE_S,
        max_age_s: float = SESSION_MAX_AGE_S, clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        super().__init__(idle_s, max_age_s, clock)
        self.client = client

    @staticmethod
    def _key(sid: str) -> str:
        return SESSION_PREFIX + hashlib.sha256(sid.encode()).hexdigest()

    def create(self) -> Session:
        now = self.clock()
        made = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        self._write(made)
        return made

    def get(self, sid: str | None, *, touch: bool = True) -> Session | None:
        if not sid:
            return None
        raw = self.client.hgetall(self._key(sid))
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]
        found = Session(sid, fields["csrf"], float(fields["created"]), float(fields["seen"]),
                        orjson.loads(fields.get("flash", "[]")))  # fmt: skip
        now = self.clock()
        if self._expired(found, now):
            self.drop(sid)
            return None
        if touch:
            found.seen = now
            self._write(found)
        return found

    def drop(self, sid: str | None) -> None:
        if sid:
            self.client.delete(self._key(sid))

    def save(self, session: Session) -> None:
        self._write(session)

    def _write(self, session: Session) -> None:
        key = self._key(session.sid)
        left = min(self.idle_s, self.max_age_s - (self.clock() - session.created))
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"csrf": session.csrf, "created": repr(session.created),
                                    "seen": repr(session.seen),
                                    "flash": orjson.dumps(session.flash)})  # fmt: skip
            pipe.pexpire(key, max(1, int(left * 1000)))
            pipe.execute()


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


LIMIT_PREFIX = "sw:console:login-failures:"


class RedisLoginLimiter(LoginLimiter):
    """The same limits counted in Redis, for all pods together (fixed windows)."""

    def __init__(self, client: redis.Redis, per_client: int = 5, total: int = 50,
                 window_s: float = 60.0) -> None:  # fmt: skip
        super().__init__(per_client, total, window_s)
        self.client = client

    def _keys(self, client: str) -> tuple[str, str]:
        window = int(time.time() // self.window_s)
        mine = hashlib.sha256(client.encode()).hexdigest()[:32]
        return f"{LIMIT_PREFIX}{window}:all", f"{LIMIT_PREFIX}{window}:{mine}"

    def allowed(self, client: str) -> bool:
        every, mine = self.client.mget(self._keys(client))
        return int(every or 0) < self.total and int(mine or 0) < self.per_client

    def failed(self, client: str) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            for key in self._keys(client):
                pipe.incr(key)
                pipe.expire(key, int(self.window_s) + 1)
            pipe.execute()
