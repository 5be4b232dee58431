"""The per-folder pipeline: fetch → parse → publish exactly once → checkpoint.

Runs on a sync thread with the folder's session selected.  Everything is UID-based.
A backlog drains in batches of ``max_emails_per_sync`` until nothing is left (no per-cycle
cap leaves mail waiting); only backpressure or an error stops it early, and then the
cursor stands exactly after the last committed batch.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from shardworker import metrics
from shardworker.config import Settings
from shardworker.db.store import FolderCursor, LedgerEntry, ProviderConfig, Store
from shardworker.errors import ParseError
from shardworker.imap.session import FolderSession, MessageInfo
from shardworker.logs import get_logger
from shardworker.mime import (
    Caps,
    ParsedMail,
    build_payload,
    parse_large,
    parse_message,
    plan_large_fetch,
)
from shardworker.sink.base import DeadLetter, Fence, Outbound, Sink

log = get_logger(__name__)

# Raw bytes fetched in one UID FETCH at most, so a batch of big messages stays bounded.
FETCH_BUDGET_BYTES = 32 * 1024 * 1024
BIG_GROUP_BYTES = 24 * 1024 * 1024 // 7  # 24 MiB a thread / (raw + mime.PARSE_PEAK_FACTOR)


@dataclass
class SyncResult:
    published: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    bytes: int = 0
    backpressured: bool = False
    reseeded: bool = False
    published_at: list[float] = field(default_factory=list)


@dataclass
class _Collected:
    """What one batch's fetch-and-parse produced."""

    uid_validity: int
    result: SyncResult
    parsed: list[tuple[int, ParsedMail]] = field(default_factory=list)
    dead: list[LedgerEntry] = field(default_factory=list)


@dataclass(frozen=True)
class SyncContext:
    settings: Settings
    store: Store
    sink: Sink
    caps: Caps
    provider: ProviderConfig
    fence: Fence | None
    big_gate: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(2), repr=False
    )

    @property
    def epoch(self) -> int | None:
        """The fencing epoch the checkpoint carries (None when running unfenced)."""
        return None if self.fence is None else self.fence.epoch


def _batches(infos: Sequence[MessageInfo], count: int) -> Iterator[list[MessageInfo]]:
    for start in range(0, len(infos), count):
        yield list(infos[start : start + count])


def _fetch_groups(infos: Sequence[MessageInfo], cap: int) -> Iterator[list[int]]:
    group: list[int] = []
    size = 0
    for info in infos:
        if group and size + info.size > cap:
            yield group
            group, size = [], 0
        group.append(info.uid)
        size += info.size
    if group:
        yield group


class FolderSync:
    """Drains one folder above its cursor; the engine owns the session and the cursor."""

    def __init__(
        self, ctx: SyncContext, session: FolderSession, progress: Callable[[], None] | None = None
    ) -> None:
        self.ctx = ctx
        self.session = session
        # Called after every checkpoint: the engine's watchdog only aborts a job that has
        # stopped making progress, not a long drain that keeps committing.
        self.progress = progress
        p = ctx.provider
        self.log_fields = {
            "provider_id": p.provider_id,
            "tenant": p.tenant,
            "folder": session.folder,
        }

    def drain(self, cursor: FolderCursor) -> tuple[FolderCursor, SyncResult]:
        result = SyncResult()
        batch_size = max(1, self.ctx.provider.max_emails_per_sync or 50)
        while True:
            infos = metrics.timed_imap("fetch_meta", self.session.new_messages, cursor.last_uid)
            if not infos:
                return cursor, result
            log.info("new_messages", **self.log_fields, count=len(infos))
            with metrics.DrainProgress(len(infos), self.log_fields) as progress:
                for batch in _batches(infos, batch_size):
                    if self.ctx.sink.backpressured():
                        result.backpressured = True
                        return cursor, result
                    cursor = self._process_batch(cursor, batch, result)
                    progress.advance(len(batch))

    def _process_batch(
        self, cursor: FolderCursor, batch: list[MessageInfo], result: SyncResult
    ) -> FolderCursor:
        last_uid = batch[-1].uid
        self._publish_and_commit(cursor, batch, result, checkpoint_uid=last_uid, always=True)
        if self.progress is not None:
            self.progress()
        return FolderCursor(uid_validity=cursor.uid_validity, last_uid=last_uid)

    def publish_below_cursor(
        self, cursor: FolderCursor, batch: list[MessageInfo], result: SyncResult
    ) -> None:
        """A backfill batch (UIDs the cursor already passed), exactly once; the cursor stays.

        The cursor never moves back within a UIDVALIDITY: this records the ledger only.
        """
        self._publish_and_commit(
            cursor, batch, result, checkpoint_uid=cursor.last_uid, always=False, backfill=True
        )

    def _publish_and_commit(
        self, cursor: FolderCursor, batch: list[MessageInfo], result: SyncResult, *,
        checkpoint_uid: int, always: bool, backfill: bool = False,
    ) -> None:  # fmt: skip
        """Publish what the ledger does not know yet, then commit ledger and cursor at once."""
        p, folder = self.ctx.provider, self.session.folder
        known = self.ctx.store.known_uids(
            p.tenant, p.provider_id, folder, cursor.uid_validity, [m.uid for m in batch]
        )
        todo = [m for m in batch if m.uid not in known]
        entries = self._publish(cursor.uid_validity, todo, result) if todo else []
        if not entries and not always:
            return
        self.ctx.store.commit_batch(
            p.tenant, p.provider_id, folder, cursor.uid_validity, entries, checkpoint_uid,
            self.ctx.epoch,
        )  # fmt: skip
        if entries:
            log.info(
                "published", **self.log_fields, count=len(entries), first_uid=batch[0].uid,
                last_uid=batch[-1].uid, epoch=self.ctx.epoch, backfill=backfill,
            )  # fmt: skip

    def _publish(
        self, uid_validity: int, todo: list[MessageInfo], result: SyncResult
    ) -> list[LedgerEntry]:
        parsed, entries = self._fetch_and_parse(uid_validity, todo, result)
        mids = self.ctx.store.known_message_ids(
            self.ctx.provider.tenant,
            self.ctx.provider.provider_id,
            [m.message_id for _, m in parsed],
        )
        outbound: list[Outbound] = []
        for uid, mail in parsed:
            if mail.message_id in mids:
                entries.append(
                    LedgerEntry(uid, mail.message_id, mids[mail.message_id], "duplicate")
                )
                result.duplicates += 1
            else:
                outbound.append(self._outbound(uid_validity, uid, mail))
        if outbound:
            results = self.ctx.sink.publish_batch(outbound, self.ctx.fence)
            done = time.monotonic()
            for out, res in zip(outbound, results, strict=True):
                if res.dead_lettered:
                    # Dead-lettered by an earlier attempt that crashed before its checkpoint.
                    entries.append(LedgerEntry(out.uid, out.message_id, None, "dead_lettered",
                                               "dead-lettered earlier"))  # fmt: skip
                    continue
                status = "duplicate" if res.duplicate else "published"
                entries.append(LedgerEntry(out.uid, out.message_id, res.stream_id, status))
                if res.duplicate:
                    result.duplicates += 1
                else:
                    result.published += 1
                    result.published_at.append(done)
        return entries

    def _outbound(self, uid_validity: int, uid: int, mail: ParsedMail) -> Outbound:
        p = self.ctx.provider
        now = datetime.now(UTC)
        payload = build_payload(
            tenant=p.tenant, provider_id=p.provider_id, email_data=mail.email_data, occurred_at=now
        )
        return Outbound(
            tenant=p.tenant,
            provider_id=p.provider_id,
            mailbox=p.mailbox,
            folder=self.session.folder,
            uid_validity=uid_validity,
            uid=uid,
            message_id=mail.message_id,
            payload=payload,
            event_time=now,
        )

    def _fetch_and_parse(
        self, uid_validity: int, todo: list[MessageInfo], result: SyncResult
    ) -> tuple[list[tuple[int, ParsedMail]], list[LedgerEntry]]:
        caps = self.ctx.caps
        got = _Collected(uid_validity, result)
        by_uid = {m.uid: m for m in todo}
        small = [m for m in todo if m.size <= caps.max_raw_bytes]
        for group in _fetch_groups(small, FETCH_BUDGET_BYTES):
            size = sum(by_uid[uid].size for uid in group)
            # A group costs up to 7x its size (raw + parse peak): big groups take turns, so a
            # burst of large mail across all sync threads cannot multiply that by the pool.
            gate = self.ctx.big_gate if size > BIG_GROUP_BYTES else contextlib.nullcontext()
            with gate:
                bodies = metrics.timed_imap("fetch_body", self.session.fetch_bodies, group)
                for uid in group:
                    self._parse_one(by_uid[uid], bodies.pop(uid, None), got)
        for info in todo:
            if info.size > caps.max_raw_bytes:
                self._parse_large_one(info, got)
        got.parsed.sort(key=lambda item: item[0])
        return got.parsed, got.dead

    def _parse_one(self, info: MessageInfo, raw: bytes | None, got: _Collected) -> None:
        if raw is None:
            # EXISTS announced it but FETCH cannot find it (expunged meanwhile, or a broken
            # server): record why and move on rather than block the folder.
            self._dead_letter(got, info.uid, "fetch_returned_nothing", None)
            return
        got.result.bytes += len(raw)
        try:
            mail = parse_message(
                raw, uid=info.uid, mailbox=self.ctx.provider.mailbox,
                internal_date=info.internal_date, caps=self.ctx.caps,
            )  # fmt: skip
        except ParseError as exc:
            self._dead_letter(got, info.uid, f"parse_error: {exc}", raw)
        except Exception as exc:  # one bad message never blocks a mailbox
            self._dead_letter(got, info.uid, f"parser_crash: {type(exc).__name__}", raw)
        else:
            got.parsed.append((info.uid, mail))

    def _parse_large_one(self, info: MessageInfo, got: _Collected) -> None:
        def sections_for(structure: object) -> list[str]:
            return list(plan_large_fetch(structure).text_sections)

        large = metrics.timed_imap("fetch_large", self.session.fetch_large, info.uid, sections_for)
        if large is None:
            self._dead_letter(got, info.uid, "fetch_returned_nothing", None)
            return
        got.result.bytes += len(large.header) + sum(len(v) for v in large.parts.values())
        try:
            mail = parse_large(
                large.header, plan_large_fetch(large.bodystructure), large.parts,
                size=info.size, uid=info.uid, mailbox=self.ctx.provider.mailbox,
                internal_date=info.internal_date, caps=self.ctx.caps,
            )  # fmt: skip
        except ParseError as exc:
            self._dead_letter(got, info.uid, f"parse_error: {exc}", None)
        except Exception as exc:  # one bad message never blocks a mailbox
            self._dead_letter(got, info.uid, f"parser_crash: {type(exc).__name__}", None)
        else:
            got.parsed.append((info.uid, mail))

    def _dead_letter(self, got: _Collected, uid: int, reason: str, raw: bytes | None) -> None:
        p = self.ctx.provider
        letter = DeadLetter(
            tenant=p.tenant, provider_id=p.provider_id, folder=self.session.folder,
            uid_validity=got.uid_validity, uid=uid, message_id=None, reason=reason, raw=raw,
        )  # fmt: skip
        self.ctx.sink.dead_letter(letter, self.ctx.fence)
        log.warning("dead_lettered", **self.log_fields, uid=uid, reason=reason)
        got.dead.append(LedgerEntry(uid, f"uid:{uid}", None, "dead_lettered", reason))
        got.result.dead_lettered += 1
