"""First-sync cursor seeds, committed in groups: one transaction for every folder waiting.

A cold start connects thousands of folders, and each first sync writes its cursor before
the folder may IDLE.  One transaction each cost a PostgreSQL round trip, a pooled
connection's checkout and a commit (a WAL flush) per folder.  :class:`CursorSeeder` is a
group commit: the sync thread that finds no write in flight becomes the writer and takes
every seed waiting (its own among them) into one :meth:`Store.seed_cursors`; the others
wait for that answer, and whoever is still waiting when it lands writes the next group.
Nobody waits for a timer, and no thread of its own has to be stopped.

Each caller still gets its own answer: a stale fence raises :class:`FencedError` for that
seed only, and a group that fails as a whole (a deadlock, a bad row) is retried one seed
at a time, so one seed's error is nobody else's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from shardworker.db.store import CursorSeed, Store
from shardworker.errors import FencedError, ShardworkerError, StoreError
from shardworker.logs import get_logger

log = get_logger(__name__)

MAX_GROUP = 256
WAIT_S = 30.0  # above the pool's checkout timeout (10 s) plus a slow commit


@dataclass(eq=False)
class _Waiting:
    seed: CursorSeed
    done: bool = False
    error: ShardworkerError | None = None
    queued_at: float = field(default_factory=time.monotonic)


class CursorSeeder:
    """Thread-safe; ``seed()`` returns once the cursor is committed (or raises)."""

    def __init__(self, store: Store, *, max_group: int = MAX_GROUP) -> None:
        self._store = store
        self._max_group = max_group
        self._cond = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._writing = False
        self.groups = 0  # plain counters, for tests and benchmarks
        self.seeds = 0

    def seed(self, seed: CursorSeed, timeout_s: float = WAIT_S) -> None:
        me = _Waiting(seed)
        deadline = me.queued_at + timeout_s
        with self._cond:
            self._waiting.append(me)
        while True:
            group = self._wait_turn(me, deadline)
            if group is None:
                break
            try:
                self._write(group)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()
        if me.error is not None:
            raise me.error

    def _wait_turn(self, me: _Waiting, deadline: float) -> list[_Waiting] | None:
        """None once ``me`` is answered; else the group this thread must write now."""
        with self._cond:
            while not me.done and self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._give_up(me)
                    return None
                self._cond.wait(left)
            if me.done:
                return None
            self._writing = True
            group, self._waiting = (
                self._waiting[: self._max_group],
                self._waiting[self._max_group :],
            )
            return group

    def _give_up(self, me: _Waiting) -> None:
        if me in self._waiting:
            self._waiting.remove(me)
        me.done = True
        me.error = StoreError(
            f"first-sync cursor for provider {me.seed.provider_id} not committed within "
            f"{time.monotonic() - me.queued_at:.0f}s"
        )

    def _write(self, group: list[_Waiting]) -> None:
        errors = write_group(self._store, [w.seed for w in group])
        self.groups += 1
        self.seeds += len(group)
        for waiting, error in zip(group, errors, strict=True):
            if waiting.error is None:  # not given up on meanwhile
                waiting.error = error
            waiting.done = True


def write_group(store: Store, seeds: list[CursorSeed]) -> list[ShardworkerError | None]:
    """Commit ``seeds`` in one transaction; each seed's error (None: written).

    A group that fails as a whole is retried one seed at a time.
    """
    try:
        written = store.seed_cursors(seeds)
    except Exception as exc:
        log.warning("cursor_seed_group_failed", seeds=len(seeds), error_type=type(exc).__name__)
        return [_write_one(store, seed) for seed in seeds]
    return [None if ok else _stale(seed) for seed, ok in zip(seeds, written, strict=True)]


def _write_one(store: Store, seed: CursorSeed) -> ShardworkerError | None:
    try:
        [ok] = store.seed_cursors([seed])
    except ShardworkerError as exc:
        return exc
    except Exception as exc:
        return StoreError(f"first-sync cursor not written: {type(exc).__name__}: {exc}")
    return None if ok else _stale(seed)


def _stale(seed: CursorSeed) -> FencedError:
    return FencedError(
        f"provider {seed.provider_id}: fencing epoch {seed.epoch} is stale; "
        "the first-sync cursor was not written"
    )
