"""The per-folder pipeline: fetch → parse → publish exactly once → checkpoint.

Runs on a sync thread with the folder's session selected.  Everything is UID-based.
Under the loop guard's rate action ``skip`` (the default), the sender's rate check travels
in the publish script (``lua/publish.lua``, when the sink ``checks_rates``): the push path
then makes one Redis round trip before and including the XADD.  A message it holds writes
nothing and gets the ledger row ``skipped`` / ``sender_rate_limited``, with the same
counters, metrics and log lines as a guard asked before the publish (``shardworker.gate``).
A backlog drains in batches of ``max_emails_per_sync`` until nothing is left (no per-cycle
cap leaves mail waiting); only backpressure or an error stops it early, and then the
cursor stands exactly after the last committed batch.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shardworker import metrics
from shardworker.budget import DailyByteBudget
from shardworker.config import Settings
from shardworker.db.store import FolderCursor, LedgerEntry, ProviderConfig, Store
from shardworker.engine.claims import MessageIdClaims
from shardworker.errors import ParseError
from shardworker.gate import Assessment, MessageGate
from shardworker.imap.dialects import apply_gmail, wanted_in_all_mail
from shardworker.imap.session import FolderSession, MessageInfo, Prefetch
from shardworker.logs import get_logger
from shardworker.metrics import providers as provider_metrics
from shardworker.mime import (
    Caps,
    ParsedMail,
    build_payload,
    parse_large,
    parse_message,
    plan_large_fetch,
)
from shardworker.sink.base import (
    DeadLetter,
    Fence,
    Outbound,
    PublishResult,
    RateCheck,
    Settled,
    Sink,
)

log = get_logger(__name__)

# Raw bytes fetched in one UID FETCH at most, so a batch of big messages stays bounded.
FETCH_BUDGET_BYTES = 32 * 1024 * 1024
BIG_GROUP_BYTES = 24 * 1024 * 1024 // 7  # 24 MiB a thread / (raw + mime.PARSE_PEAK_FACTOR)
# A push: the UIDs just above the cursor come back, bodies and all, from the command that
# leaves IDLE (``FolderSession.leave_idle_fetching``): at most this many messages, each
# cut at this many bytes (a cut body is dropped and fetched the usual way).
PUSH_FETCH_MESSAGES = 16
PUSH_FETCH_BYTES = 256 * 1024


@dataclass
class SyncResult:
    published: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    skipped: int = 0
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


@dataclass
class _Ready:
    """A batch's admitted messages, waiting for their publish round trip."""

    result: SyncResult
    entries: list[LedgerEntry]
    outbound: list[Outbound] = field(default_factory=list)
    # UID -> the assessment of a message whose publish makes its rate check.
    folded: dict[int, Assessment] = field(default_factory=dict)


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
    # Loop protection (None: every message is published as parsed, tests and tools).
    gate: MessageGate | None = field(default=None, repr=False)
    # Gmail, All Mail watched: the labels of the folders the provider asked for.
    gmail_labels: frozenset[str] | None = None
    # Gmail: the account's daily download budget (live fetches are counted against it).
    budget: DailyByteBudget | None = field(default=None, repr=False)
    # Shared by every sync thread of the process (engine.claims): one provider's folders.
    claims: MessageIdClaims = field(default_factory=MessageIdClaims, repr=False)

    @property
    def epoch(self) -> int | None:
        """The fencing epoch the checkpoint carries (None when running unfenced)."""
        return None if self.fence is None else self.fence.epoch


def push_fetch_limits(max_emails_per_sync: int | None, max_raw_bytes: int) -> tuple[int, int]:
    """(messages, bytes each) of the fetch that leaves IDLE: one batch at most, and never
    more of a message than the size guard lets the usual fetch take whole."""
    batch = max(1, max_emails_per_sync or 50)
    return min(PUSH_FETCH_MESSAGES, batch), max(1, min(PUSH_FETCH_BYTES, max_raw_bytes))


def _identity(info: MessageInfo, mail: ParsedMail) -> str:
    """The cross-folder dedupe identity: Gmail's X-GM-MSGID (one message in two labels is
    one message), else the Message-ID."""
    return info.gmail.dedupe_key if info.gmail is not None else mail.message_id


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
        self.prepaid = False  # the current batch's bytes are already counted (a backfill)
        p = ctx.provider
        self.log_fields = {
            "provider_id": p.provider_id,
            "tenant": p.tenant,
            "folder": session.folder,
        }

    def drain(
        self, cursor: FolderCursor, prefetch: Prefetch | None = None
    ) -> tuple[FolderCursor, SyncResult]:
        """Everything above the cursor; ``prefetch`` (what left IDLE with the push) first.

        The prefetch holds the lowest UIDs above the cursor, so committing up to its last
        skips nothing; whatever lies above it is the loop's ``new_messages`` as always.
        """
        result = SyncResult()
        if prefetch is not None and prefetch.infos and prefetch.after_uid == cursor.last_uid:
            cursor = self._drain_prefetched(cursor, prefetch, result)
        while not result.backpressured:
            infos = metrics.timed_imap("fetch_meta", self.session.new_messages, cursor.last_uid)
            if not infos:
                break
            log.info("new_messages", **self.log_fields, count=len(infos))
            cursor = self._drain_infos(cursor, infos, result)
        return cursor, result

    def _drain_prefetched(
        self, cursor: FolderCursor, prefetch: Prefetch, result: SyncResult
    ) -> FolderCursor:
        """A push's batch (at most ``PUSH_FETCH_MESSAGES``), checked for backpressure after
        its XADD rather than before: the last reading, however old, decides before it,
        so a push pays no Redis round trip for the reading.  The lag bound can overshoot by
        one push batch per sync thread beyond what ``backpressure_check_s`` allows."""
        self._count_download(prefetch.nbytes)
        infos = list(prefetch.infos)
        log.info("new_messages", **self.log_fields, count=len(infos), prefetched=True)
        if self.ctx.sink.last_backpressure():
            result.backpressured = True
            return cursor
        batch_size = max(1, self.ctx.provider.max_emails_per_sync or 50)
        first, rest = infos[:batch_size], infos[batch_size:]
        with metrics.DrainProgress(len(first), self.log_fields) as progress:
            cursor = self._process_batch(cursor, first, result, prefetch.bodies)
            progress.advance(len(first))
        if rest:  # never with the session's own limits; checked before each batch then
            return self._drain_infos(cursor, rest, result, prefetch.bodies)
        result.backpressured = self.ctx.sink.backpressured()
        return cursor

    def _drain_infos(
        self, cursor: FolderCursor, infos: list[MessageInfo], result: SyncResult,
        bodies: Mapping[int, bytes] | None = None,
    ) -> FolderCursor:  # fmt: skip
        batch_size = max(1, self.ctx.provider.max_emails_per_sync or 50)
        with metrics.DrainProgress(len(infos), self.log_fields) as progress:
            for batch in _batches(infos, batch_size):
                if self.ctx.sink.backpressured():
                    result.backpressured = True
                    return cursor
                cursor = self._process_batch(cursor, batch, result, bodies)
                progress.advance(len(batch))
        return cursor

    def _process_batch(
        self, cursor: FolderCursor, batch: list[MessageInfo], result: SyncResult,
        bodies: Mapping[int, bytes] | None = None,
    ) -> FolderCursor:  # fmt: skip
        last_uid = batch[-1].uid
        self._publish_and_commit(
            cursor, batch, result, checkpoint_uid=last_uid, always=True, bodies=bodies
        )
        if self.progress is not None:
            self.progress()
        return FolderCursor(uid_validity=cursor.uid_validity, last_uid=last_uid)

    def publish_below_cursor(
        self, cursor: FolderCursor, batch: list[MessageInfo], result: SyncResult, *,
        prepaid: bool = False,
    ) -> None:  # fmt: skip
        """A backfill batch (UIDs the cursor already passed), exactly once; the cursor stays.

        The cursor never moves back within a UIDVALIDITY: this records the ledger only.
        ``prepaid``: the batch's bytes were already spent from the Gmail budget.
        """
        self.prepaid = prepaid
        try:
            self._publish_and_commit(
                cursor, batch, result, checkpoint_uid=cursor.last_uid, always=False, backfill=True
            )
        finally:
            self.prepaid = False

    def _publish_and_commit(
        self, cursor: FolderCursor, batch: list[MessageInfo], result: SyncResult, *,
        checkpoint_uid: int, always: bool, backfill: bool = False,
        bodies: Mapping[int, bytes] | None = None,
    ) -> None:  # fmt: skip
        """Publish what the ledger does not know yet, then commit ledger and cursor at once.

        ``bodies``: raw messages already fetched (a push).  When they cover the batch, it
        is parsed first and the ledger answers its UIDs and Message-IDs in one query.
        """
        p, folder = self.ctx.provider, self.session.folder
        have = bodies or {}
        with contextlib.ExitStack() as claims:
            if have and all(self._usable(m, have) for m in batch):
                entries = self._publish_in_hand(cursor.uid_validity, batch, have, result, claims)
            else:
                entries = self._publish_unknown(cursor.uid_validity, batch, result, claims, have)
            if not entries and not always:
                return
            self.ctx.store.commit_batch(
                p.tenant, p.provider_id, folder, cursor.uid_validity, entries, checkpoint_uid,
                self.ctx.epoch,
            )  # fmt: skip
            self._settle(cursor.uid_validity, entries)
        if entries:
            # Logged after the checkpoint; the stream id dates the first XADD (Redis's clock).
            first = next((e.stream_id for e in entries if e.status == "published"), None)
            log.info(
                "published", **self.log_fields, count=len(entries), first_uid=batch[0].uid,
                last_uid=batch[-1].uid, epoch=self.ctx.epoch, backfill=backfill,
                first_stream_id=first,
            )  # fmt: skip

    def _settle(self, uid_validity: int, entries: list[LedgerEntry]) -> None:
        """The ledger holds these now: the sink may drop its dedupe state for them."""
        p, folder = self.ctx.provider, self.session.folder
        settled = [
            Settled(p.tenant, p.provider_id, folder, uid_validity, e.uid,
                    "" if e.status == "dead_lettered" else e.message_id)
            for e in entries
        ]  # fmt: skip
        if settled:
            self.ctx.sink.settle(settled)

    def _usable(self, info: MessageInfo, have: Mapping[int, bytes]) -> bool:
        """An in-hand body stands for the fetch only where the fetch would take it whole."""
        return info.uid in have and info.size <= self.ctx.caps.max_raw_bytes

    def _publish_unknown(
        self, uid_validity: int, batch: list[MessageInfo], result: SyncResult,
        claims: contextlib.ExitStack, have: Mapping[int, bytes],
    ) -> list[LedgerEntry]:  # fmt: skip
        """The ledger's known UIDs first, so that no body of theirs is fetched."""
        p = self.ctx.provider
        known = self.ctx.store.known_uids(
            p.tenant, p.provider_id, self.session.folder, uid_validity, [m.uid for m in batch]
        )
        todo = [m for m in batch if m.uid not in known]
        return self._publish(uid_validity, todo, result, claims, have) if todo else []

    def _publish(
        self, uid_validity: int, todo: list[MessageInfo], result: SyncResult,
        claims: contextlib.ExitStack, have: Mapping[int, bytes],
    ) -> list[LedgerEntry]:  # fmt: skip
        parsed, entries = self._fetch_and_parse(uid_validity, todo, result, have)
        info_of = {m.uid: m for m in todo}
        keyed = [(info_of[uid], mail, _identity(info_of[uid], mail)) for uid, mail in parsed]
        p = self.ctx.provider
        # Claimed before the ledger is asked, held until the commit (engine/claims.py).
        claims.enter_context(
            self.ctx.claims.hold(p.tenant, p.provider_id, [key for _, _, key in keyed])
        )
        mids = self.ctx.store.known_message_ids(
            p.tenant, p.provider_id, [key for _, _, key in keyed]
        )
        return self._publish_keyed(uid_validity, keyed, mids, result, entries)

    def _publish_in_hand(
        self, uid_validity: int, batch: list[MessageInfo], have: Mapping[int, bytes],
        result: SyncResult, claims: contextlib.ExitStack,
    ) -> list[LedgerEntry]:  # fmt: skip
        """A push whose bodies came with it: parse, claim, then one ledger query for the
        known UIDs and the known Message-IDs together.  A known UID's body is discarded
        unread by anyone, and a parse failure is dead-lettered only once the ledger says
        the UID is new."""
        p = self.ctx.provider
        outcomes = [(info, self._parse(info, have[info.uid])) for info in batch]
        keyed = [(info, mail, _identity(info, mail))
                 for info, mail in outcomes if isinstance(mail, ParsedMail)]  # fmt: skip
        keys = [key for _, _, key in keyed]
        claims.enter_context(self.ctx.claims.hold(p.tenant, p.provider_id, keys))
        known, mids = self.ctx.store.known_uids_and_message_ids(
            p.tenant, p.provider_id, self.session.folder, uid_validity,
            [m.uid for m in batch], keys,
        )  # fmt: skip
        got = _Collected(uid_validity, result)
        for info, mail in outcomes:
            if info.uid in known:
                continue
            if isinstance(mail, ParsedMail):
                result.bytes += len(have[info.uid])
            else:
                self._dead_letter(got, info.uid, mail, have[info.uid])
        fresh = [item for item in keyed if item[0].uid not in known]
        return self._publish_keyed(uid_validity, fresh, mids, result, got.dead)

    def _publish_keyed(
        self, uid_validity: int, keyed: list[tuple[MessageInfo, ParsedMail, str]],
        mids: Mapping[str, str | None], result: SyncResult, entries: list[LedgerEntry],
    ) -> list[LedgerEntry]:  # fmt: skip
        """Admit and publish parsed messages the ledger does not hold by Message-ID."""
        ready = _Ready(result, entries)
        for info, mail, key in keyed:
            if key in mids:
                entries.append(LedgerEntry(info.uid, key, mids[key], "duplicate"))
                result.duplicates += 1
                continue
            skipped = self._admit(uid_validity, info, mail, key, ready)
            if skipped is not None:
                entries.append(skipped)
                result.skipped += 1
        self._publish_ready(ready)
        return entries

    def _publish_ready(self, ready: _Ready) -> None:
        """One publish round trip for the admitted messages, then their ledger entries."""
        outbound, folded = ready.outbound, ready.folded
        if not outbound:
            return
        ready.outbound, ready.folded = [], {}
        results = self.ctx.sink.publish_batch(outbound, self.ctx.fence)
        done = time.monotonic()
        for out, res in zip(outbound, results, strict=True):
            assessment = folded.get(out.uid)
            if assessment is not None and not self._rate_answered(out, res, assessment, ready):
                continue
            if res.dead_lettered:
                # Dead-lettered by an earlier attempt that crashed before its checkpoint.
                ready.entries.append(LedgerEntry(out.uid, out.identity, None, "dead_lettered",
                                                 "dead-lettered earlier"))  # fmt: skip
                continue
            status = "duplicate" if res.duplicate else "published"
            ready.entries.append(LedgerEntry(out.uid, out.identity, res.stream_id, status))
            if res.duplicate:
                ready.result.duplicates += 1
            else:
                ready.result.published += 1
                ready.result.published_at.append(done)

    def _rate_answered(
        self, out: Outbound, res: PublishResult, assessment: Assessment, ready: _Ready
    ) -> bool:
        """The publish made the message's rate check: count its answer as the gate's own;
        False when it held the message (then nothing was written)."""
        assert self.ctx.gate is not None
        adm = self.ctx.gate.record(assessment, rank=res.rank, first_trip=res.first_trip)
        provider_metrics.loop_message(adm.decision.verdict.klass.value, adm.decision.action.value)
        if adm.publish:
            return True
        log.info("message_skipped", **self.log_fields, uid=out.uid, reason=adm.ledger_reason)
        ready.entries.append(LedgerEntry(out.uid, out.identity, None, "skipped",
                                         adm.ledger_reason))  # fmt: skip
        ready.result.skipped += 1
        return False

    def _admit(
        self, uid_validity: int, info: MessageInfo, mail: ParsedMail, key: str, ready: _Ready
    ) -> LedgerEntry | None:
        """Queue the message's event in ``ready``, or the ledger row that says why not.

        Only messages about to be published get here (never a duplicate), so a retried
        batch or a second folder never counts against the sender's rate.  Under the rate
        action ``skip`` the publish itself makes the rate check (``MessageGate.folds``);
        a guard asked here is asked after the messages before it were published, so the
        sender's window counts in batch order either way.
        """
        labels, gmail = self.ctx.gmail_labels, info.gmail
        if labels is not None and gmail is not None and not wanted_in_all_mail(gmail, labels):
            # All Mail also holds sent and archived mail: only the watched labels count.
            return LedgerEntry(info.uid, key, None, "skipped", "gmail_label_not_watched")
        gate, p = self.ctx.gate, self.ctx.provider
        if gate is None:
            data = mail.email_data if gmail is None else apply_gmail(mail.email_data, gmail)
            ready.outbound.append(self._outbound(uid_validity, info.uid, mail, data, key))
            return None
        assessment = gate.assess(
            tenant=p.tenant, provider_id=p.provider_id, mailbox=p.mailbox, message_key=key,
            email_data=mail.email_data, gmail=gmail,
        )  # fmt: skip
        if gate.folds(assessment) and self.ctx.sink.checks_rates():
            data = gate.conclude(assessment, held=False).email_data
            out = self._outbound(uid_validity, info.uid, mail, data, key, rate=assessment.rate)
            ready.outbound.append(out)
            ready.folded[info.uid] = assessment
            return None
        if assessment.rate is not None and ready.folded:
            self._publish_ready(ready)
        adm = gate.ask(assessment)
        provider_metrics.loop_message(adm.decision.verdict.klass.value, adm.decision.action.value)
        if not adm.publish:
            log.info("message_skipped", **self.log_fields, uid=info.uid,
                     reason=adm.ledger_reason)  # fmt: skip
            return LedgerEntry(info.uid, key, None, "skipped", adm.ledger_reason)
        ready.outbound.append(self._outbound(uid_validity, info.uid, mail, adm.email_data, key))
        return None

    def _outbound(
        self, uid_validity: int, uid: int, mail: ParsedMail, email_data: dict[str, Any], key: str,
        *, rate: RateCheck | None = None,
    ) -> Outbound:  # fmt: skip
        p = self.ctx.provider
        now = datetime.now(UTC)
        payload = build_payload(
            tenant=p.tenant, provider_id=p.provider_id, email_data=email_data, occurred_at=now
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
            dedupe_key=key,
            rate=rate,
        )

    def _fetch_and_parse(
        self, uid_validity: int, todo: list[MessageInfo], result: SyncResult,
        have: Mapping[int, bytes],
    ) -> tuple[list[tuple[int, ParsedMail]], list[LedgerEntry]]:  # fmt: skip
        caps = self.ctx.caps
        got = _Collected(uid_validity, result)
        by_uid = {m.uid: m for m in todo}
        in_hand = [m for m in todo if self._usable(m, have)]
        for info in in_hand:
            self._parse_one(info, have[info.uid], got)
        parsed_uids = {m.uid for m in in_hand}
        fetch = [m for m in todo if m.uid not in parsed_uids]
        small = [m for m in fetch if m.size <= caps.max_raw_bytes]
        for group in _fetch_groups(small, FETCH_BUDGET_BYTES):
            size = sum(by_uid[uid].size for uid in group)
            # A group costs up to 7x its size (raw + parse peak): big groups take turns, so a
            # burst of large mail across all sync threads cannot multiply that by the pool.
            gate = self.ctx.big_gate if size > BIG_GROUP_BYTES else contextlib.nullcontext()
            with gate:
                bodies = metrics.timed_imap("fetch_body", self.session.fetch_bodies, group)
                for uid in group:
                    self._parse_one(by_uid[uid], bodies.pop(uid, None), got)
        for info in fetch:
            if info.size > caps.max_raw_bytes:
                self._parse_large_one(info, got)
        got.parsed.sort(key=lambda item: item[0])
        if not self.prepaid:  # an in-hand body was counted when it came (drain)
            self._count_download(sum(m.size for m in fetch))
        return got.parsed, got.dead

    def _count_download(self, nbytes: int) -> None:
        """Live fetches always run, but count against Gmail's daily budget (the backfill
        pays before it fetches: ``FolderJob``)."""
        budget = self.ctx.budget
        if budget is None or nbytes <= 0:
            return
        used = budget.record(nbytes)
        if budget.limit_bytes > 0:
            provider_metrics.gmail_budget_used(used / budget.limit_bytes)

    def _parse_one(self, info: MessageInfo, raw: bytes | None, got: _Collected) -> None:
        if raw is None:
            # EXISTS announced it but FETCH cannot find it (expunged meanwhile, or a broken
            # server): record why and move on rather than block the folder.
            self._dead_letter(got, info.uid, "fetch_returned_nothing", None)
            return
        got.result.bytes += len(raw)
        mail = self._parse(info, raw)
        if isinstance(mail, ParsedMail):
            got.parsed.append((info.uid, mail))
        else:
            self._dead_letter(got, info.uid, mail, raw)

    def _parse(self, info: MessageInfo, raw: bytes) -> ParsedMail | str:
        """The parsed message, or why it cannot be published (the dead letter's reason)."""
        try:
            return parse_message(
                raw, uid=info.uid, mailbox=self.ctx.provider.mailbox,
                internal_date=info.internal_date, caps=self.ctx.caps,
            )  # fmt: skip
        except ParseError as exc:
            return f"parse_error: {exc}"
        except Exception as exc:  # one bad message never blocks a mailbox
            return f"parser_crash: {type(exc).__name__}"

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
