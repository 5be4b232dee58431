"""Admin resyncs of a folder, run inside a slot's cycle on a sync thread.

Two kinds:

* *to now*: the cursor is reseeded to UIDNEXT-1, so nothing before this moment is ever
  published (the first-sync policy, applied again on request);
* *backfill since a date*: ``UID SEARCH SINCE`` finds older mail at or below the cursor,
  and each batch goes through the normal exactly-once path (ledger pre-check, Redis
  dedupe keys, fenced checkpoint).  A message published before is a duplicate, never a
  second event; the cursor does not move.

On Gmail a backfill pays for each batch from the account's daily byte budget before it
fetches (:mod:`shardworker.budget`); when the budget says no, the job waits in the slot
(state ``waiting_budget``, with the budget's progress) and goes on at a later cycle once
the day has reset.  Live mail keeps flowing meanwhile: it only counts against the budget.

A request may span several folders; :class:`ResyncRequest` adds up their progress and
reports it (state + counters) after every batch, so the command status shows it live.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from shardworker import metrics
from shardworker.db.store import FolderCursor
from shardworker.engine.sync import FolderSync, SyncResult
from shardworker.imap.session import FolderSession, MessageInfo
from shardworker.logs import get_logger

log = get_logger(__name__)

Report = Callable[[str, Mapping[str, Any]], None]
StepState = Literal["done", "more", "backpressure", "budget"]


@dataclass
class ResyncRequest:
    """One admin resync: every matching folder of a provider, counted together."""

    folder: str | None  # None: every folder the provider serves
    since: datetime | None  # None: cursor to now
    report: Report
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _counts: dict[str, int] = field(default_factory=dict, repr=False)
    _folders: dict[str, str] = field(default_factory=dict, repr=False)
    _budget: dict[str, Any] | None = field(default=None, repr=False)

    def matches(self, folder: str) -> bool:
        if self.folder is None:
            return True
        if self.folder.upper() == "INBOX" and folder.upper() == "INBOX":
            return True
        return folder == self.folder

    def expect(self, folders: list[str]) -> None:
        with self._lock:
            self._folders = dict.fromkeys(folders, "pending")

    def fail(self, served: list[str]) -> None:
        self.report("failed", {"error": f"no served folder matches; served: {served}"})

    def add(
        self, folder: str, state: str, *, budget: Mapping[str, Any] | None = None, **counts: int
    ) -> None:
        """Fold one folder's progress in and report the whole request.

        ``budget``: Gmail's daily budget as it stands (``BudgetProgress.as_dict()``).
        """
        with self._lock:
            self._folders[folder] = state
            for name, value in counts.items():
                self._counts[name] = self._counts.get(name, 0) + value
            if budget is not None:
                self._budget = dict(budget)
            states = set(self._folders.values())
            fields: dict[str, Any] = {**self._counts, "folders": dict(self._folders)}
            if self._budget is not None:
                fields["gmail_budget"] = dict(self._budget)
        if "failed" in states:
            overall = "failed" if states <= {"failed", "done"} else "running"
        else:
            overall = "done" if states == {"done"} else "running"
        if overall == "failed":
            fields["error"] = "stopped before finishing: the connection closed or moved"
        self.report(overall, fields)


@dataclass
class FolderJob:
    """The part of a request for one folder; lives in ``Slot.jobs`` until finished."""

    request: ResyncRequest
    folder: str
    pending: list[int] | None = None  # backfill UIDs still to publish

    def abandon(self) -> None:
        log.warning("resync_abandoned", folder=self.folder, remaining=len(self.pending or ()))
        self.request.add(self.folder, "failed")

    def step(
        self, sync: FolderSync, session: FolderSession, cursor: FolderCursor, budget_s: float
    ) -> tuple[FolderCursor, StepState]:
        if self.request.since is None:
            return self._to_now(sync, session, cursor), "done"
        return cursor, self._backfill(sync, session, cursor, budget_s)

    def _to_now(
        self, sync: FolderSync, session: FolderSession, cursor: FolderCursor
    ) -> FolderCursor:
        status = session.examine()
        fresh = FolderCursor(uid_validity=status.uid_validity, last_uid=status.uid_next - 1)
        ctx = sync.ctx
        ctx.store.reseed_folder(
            ctx.provider.tenant, ctx.provider.provider_id, session.folder,
            fresh.uid_validity, fresh.last_uid, ctx.epoch,
        )  # fmt: skip
        log.info("resync_to_now", **sync.log_fields, old_last_uid=cursor.last_uid,
                 last_uid=fresh.last_uid, uid_validity=fresh.uid_validity)  # fmt: skip
        self.request.add(self.folder, "done", skipped=max(0, fresh.last_uid - cursor.last_uid))
        return fresh

    def _backfill(
        self, sync: FolderSync, session: FolderSession, cursor: FolderCursor, budget_s: float
    ) -> StepState:
        since = self.request.since
        assert since is not None
        if self.pending is None:
            # SINCE compares dates in the server's zone: a day early, then the exact time.
            day = since.astimezone(UTC).date() - timedelta(days=1)
            self.pending = _uids_since(session, day, cursor.last_uid)
            log.info("backfill_started", **sync.log_fields, since=since.isoformat(),
                     candidates=len(self.pending), cursor=cursor.last_uid)  # fmt: skip
            self.request.add(self.folder, "running", total=len(self.pending))
        started = time.monotonic()
        batch_size = max(1, sync.ctx.provider.max_emails_per_sync or 50)
        while self.pending:
            if sync.ctx.sink.backpressured():
                return "backpressure"
            if time.monotonic() - started > budget_s:
                return "more"  # give the watchdog and the other work a turn
            chunk = self.pending[:batch_size]
            infos = [i for i in session.message_infos(chunk) if _not_before(i, since)]
            if infos and not _spend(sync, infos):
                self._wait_for_budget(sync)
                return "budget"
            result = SyncResult()
            if infos:
                sync.publish_below_cursor(cursor, infos, result, prepaid=True)
                metrics.record_sync(result, None)
            del self.pending[: len(chunk)]
            self._progress(sync, len(chunk), result)
        log.info("backfill_finished", **sync.log_fields)
        self.request.add(self.folder, "done")
        return "done"

    def _progress(self, sync: FolderSync, scanned: int, result: SyncResult) -> None:
        budget = sync.ctx.budget
        progress = budget.progress().as_dict() if budget is not None else None
        log.info("backfill_progress", **sync.log_fields, scanned=scanned,
                 published=result.published, duplicates=result.duplicates,
                 skipped=result.skipped, remaining=len(self.pending or ()),
                 gmail_budget=progress)  # fmt: skip
        self.request.add(
            self.folder, "running", budget=progress, scanned=scanned,
            published=result.published, duplicates=result.duplicates,
            dead_lettered=result.dead_lettered, skipped=result.skipped,
        )  # fmt: skip

    def _wait_for_budget(self, sync: FolderSync) -> None:
        budget = sync.ctx.budget
        assert budget is not None
        progress = budget.progress().as_dict()
        log.warning("backfill_waiting_budget", **sync.log_fields,
                    remaining=len(self.pending or ()), **progress)  # fmt: skip
        self.request.add(self.folder, "waiting_budget", budget=progress)


def run_jobs(
    jobs: list[FolderJob],
    sync: FolderSync,
    session: FolderSession,
    cursor: FolderCursor,
    budget_s: float,
) -> tuple[FolderCursor, StepState]:
    """Run a slot's pending jobs in order; an unfinished one stays first in ``jobs``."""
    while jobs:
        cursor, state = jobs[0].step(sync, session, cursor, budget_s)
        if state != "done":
            return cursor, state
        jobs.pop(0)
    return cursor, "done"


def _spend(sync: FolderSync, infos: list[MessageInfo]) -> bool:
    """Pay for a batch from Gmail's daily budget before fetching it (True: go ahead)."""
    budget = sync.ctx.budget
    return budget is None or budget.try_spend(sum(i.size for i in infos))


def _uids_since(session: FolderSession, day: date, last_uid: int) -> list[int]:
    """UIDs with INTERNALDATE on or after ``day`` that the cursor has already passed.

    Mail above the cursor is the normal drain's business.
    """
    return [uid for uid in session.uids_since(day) if uid <= last_uid]


def _not_before(info: MessageInfo, since: datetime) -> bool:
    """SEARCH SINCE has day granularity (in the server's zone): compare the exact time."""
    stamp = info.internal_date
    if stamp is None:
        return True
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp >= since
