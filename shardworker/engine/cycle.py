"""One blocking cycle of a folder slot, run on a sync thread.

connect (if needed) → resolve folders (first slot) → EXAMINE → cursor policy → leave IDLE
→ drain → enter IDLE (or poll).  The cycle returns an outcome; the loop thread decides
what happens next.  Every error is classified here, once.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import redis

from shardworker import metrics
from shardworker.budget import DailyByteBudget
from shardworker.config import Settings
from shardworker.db.seeds import CursorSeeder
from shardworker.db.status import StatusWriter
from shardworker.db.store import CursorSeed, FolderCursor, ProviderConfig, Store
from shardworker.engine.claims import MessageIdClaims
from shardworker.engine.failures import classify_failure
from shardworker.engine.resync import run_jobs
from shardworker.engine.state import ProviderRuntime, Slot
from shardworker.engine.sync import FolderSync, SyncContext, SyncResult, push_fetch_limits
from shardworker.errors import (
    FolderError,
    ImapError,
    ImapThrottledError,
    SecretError,
    ShardworkerError,
)
from shardworker.gate import MessageGate
from shardworker.imap.connect import (
    Credentials,
    capabilities,
    open_client,
    security_mode,
)
from shardworker.imap.dialects import (
    Dialect,
    all_mail_folder,
    classify_provider_answer,
    labels_for_folders,
)
from shardworker.imap.folders import FolderResolution, resolve_folders
from shardworker.imap.guard import literal_cap
from shardworker.imap.session import FolderStatus, Prefetch
from shardworker.logs import get_logger
from shardworker.mime import Caps
from shardworker.netpolicy import OutboundPolicy
from shardworker.oauth import TokenRefresher
from shardworker.secrets.store import SecretStore, secret_name
from shardworker.sink.base import Sink

log = get_logger(__name__)

OutcomeKind = Literal["idle", "poll", "backpressure", "stopped", "error"]


@dataclass
class Outcome:
    kind: OutcomeKind
    buffered: bool = False
    cursor: FolderCursor | None = None
    status: FolderStatus | None = None
    result: SyncResult | None = None
    error: ShardworkerError | None = None
    connected_now: bool = False
    capabilities: tuple[str, ...] = ()
    other_folders: tuple[str, ...] = ()
    missing_folders: tuple[str, ...] = ()


@dataclass(frozen=True)
class CycleDeps:
    settings: Settings
    store: Store
    secrets: SecretStore
    sink: Sink
    caps: Caps
    status: StatusWriter
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    oauth: TokenRefresher | None = field(default=None, repr=False)
    outbound: OutboundPolicy | None = field(default=None, repr=False)
    # Shared by every sync thread of the process: at most two big fetch-and-parse groups.
    big_gate: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(2), repr=False
    )
    # Loop protection, built once per process (None: publish everything as parsed).
    gate: MessageGate | None = field(default=None, repr=False)
    # Where Gmail's daily byte budgets are counted (None: no budget).
    redis: redis.Redis | None = field(default=None, repr=False)
    # Message-IDs between their ledger check and their commit (engine/claims.py).
    claims: MessageIdClaims = field(default_factory=MessageIdClaims, repr=False)


def provider_error(err: ShardworkerError, cfg: ProviderConfig) -> ShardworkerError:
    """``err`` reclassified when the server's answer is a provider's own (Exchange's
    throttling and "authenticated but not connected", Gmail's limits), which the generic
    RFC 5530 rules call rejected credentials, a missing folder or a protocol error."""
    if not isinstance(err, ImapError) or isinstance(err, ImapThrottledError):
        return err
    where = f"{cfg.host}:{cfg.port}"
    found = classify_provider_answer(
        str(err).removeprefix(f"{where}: "), where=where, username=cfg.username,
        auth_type=cfg.auth_type,
    )  # fmt: skip
    return err if found is None else found


def load_credentials(deps: CycleDeps, provider: ProviderRuntime) -> Credentials:
    cfg = provider.config
    if cfg.auth_type == "oauth2":
        return _oauth_credentials(deps, provider)
    cached = provider.credentials
    if cached is not None:
        return cached
    name = secret_name("password", cfg.provider_id)
    creds = Credentials(
        "password", cfg.username, deps.secrets.get(cfg.tenant, cfg.provider_id, name)
    )
    provider.credentials = creds
    return creds


def _oauth_credentials(deps: CycleDeps, provider: ProviderRuntime) -> Credentials:
    """The cached token while fresh; else a stored or refreshed one (this worker owns it)."""
    if deps.oauth is None:
        raise SecretError("auth_type oauth2 needs a token refresher in this process")
    with provider.credentials_lock:
        force = provider.force_token_refresh
        cached = provider.credentials
        if cached is not None and not force and deps.oauth.is_fresh(provider.access_token):
            return cached
        token = deps.oauth.access_token(provider.config, force=force)
        provider.force_token_refresh = False
        provider.access_token = token
        provider.credentials = Credentials("oauth2", provider.config.username, token.value)
        return provider.credentials


def settle_cursor(
    seeder: CursorSeeder,
    provider: ProviderRuntime,
    folder: str,
    known: FolderCursor | None,
    status: FolderStatus,
) -> FolderCursor:
    """Apply the first-sync and UIDVALIDITY policies (docs/DESIGN.md) after EXAMINE.

    The stored cursor stands while its UIDVALIDITY does; otherwise the folder starts from
    now (UIDNEXT-1), committed before it may IDLE, together with every other folder's
    seed waiting at that moment (``CursorSeeder``).
    """
    if known is not None and known.uid_validity == status.uid_validity:
        return known
    fresh = FolderCursor(uid_validity=status.uid_validity, last_uid=status.uid_next - 1)
    cfg, fence = provider.config, provider.fence
    seeder.seed(CursorSeed(cfg.tenant, cfg.provider_id, folder, fresh.uid_validity,
                           fresh.last_uid, None if fence is None else fence.epoch))  # fmt: skip
    log.info(
        "first_sync_from_now" if known is None else "uidvalidity_changed",
        provider_id=cfg.provider_id, tenant=cfg.tenant, folder=folder,
        uid_validity=fresh.uid_validity, last_uid=fresh.last_uid,
        old_uid_validity=None if known is None else known.uid_validity,
    )  # fmt: skip
    return fresh


class Cycle:
    def __init__(self, deps: CycleDeps, on_logged_in: Callable[[Slot], None] | None = None) -> None:
        self.deps = deps
        self.seeder = CursorSeeder(deps.store)
        # Called on the sync thread once a connect has logged in and EXAMINEd: the
        # connection attempt is over (the host's admission slot can go to the next one),
        # though the cursor, the drain and IDLE are still to come.
        self.on_logged_in = on_logged_in

    def run(self, slot: Slot) -> Outcome:
        try:
            return self._run(slot)
        except ShardworkerError as exc:
            err = exc
        except Exception as exc:
            err = classify_failure(exc)
        err = provider_error(err, slot.provider.config)
        return Outcome("error", error=err, cursor=slot.cursor, status=slot.status)

    def _run(self, slot: Slot) -> Outcome:
        out = Outcome("idle", cursor=slot.cursor, status=slot.status)
        prefetch: Prefetch | None = None
        if not slot.connected:
            self._connect(slot, out)
        elif slot.session.idling:
            prefetch = self._leave_idle(slot, out.cursor)
        elif not slot.session.has_idle:
            metrics.timed_imap("noop", slot.session.poll)
        if slot.want_stop:
            metrics.timed_imap("logout", slot.session.close, logout=True)
            out.kind = "stopped"
            return out
        sync = FolderSync(self._context(slot.provider), slot.session, slot.mark_progress)
        assert out.cursor is not None
        if slot.jobs:
            out.cursor, job_state = run_jobs(
                slot.jobs, sync, slot.session, out.cursor, self.deps.settings.net_timeout_s
            )
            if job_state == "backpressure":
                out.kind = "backpressure"
                return out
            out.buffered = job_state == "more"  # come straight back for the rest
        out.cursor, out.result = sync.drain(out.cursor, prefetch)
        if out.result.backpressured:
            out.kind = "backpressure"
            return out
        if slot.session.has_idle:
            out.buffered = metrics.timed_imap("idle_enter", slot.session.enter_idle) or out.buffered
        else:
            out.kind = "poll"
        return out

    def _leave_idle(self, slot: Slot, cursor: FolderCursor | None) -> Prefetch | None:
        """Leave IDLE; when a drain follows, with the push's likely news fetched in the
        same round trip (``FolderSession.leave_idle_fetching``)."""
        if slot.want_stop or slot.jobs or cursor is None:
            metrics.timed_imap("idle_done", slot.session.leave_idle)
            return None
        count, max_bytes = push_fetch_limits(
            slot.provider.config.max_emails_per_sync, self.deps.caps.max_raw_bytes
        )
        return metrics.timed_imap(
            "idle_done_fetch", slot.session.leave_idle_fetching, cursor.last_uid, count, max_bytes
        )

    def _context(self, provider: ProviderRuntime) -> SyncContext:
        d = self.deps
        return SyncContext(
            d.settings,
            d.store,
            d.sink,
            d.caps,
            provider.config,
            provider.fence,
            d.big_gate,
            gate=d.gate,
            gmail_labels=provider.gmail_labels,
            budget=provider.budget,
            claims=d.claims,
        )

    def _connect(self, slot: Slot, out: Outcome) -> None:
        d, cfg = self.deps, slot.provider.config
        creds = load_credentials(d, slot.provider)
        connect_timeout = (
            cfg.connection_timeout_ms / 1000
            if cfg.connection_timeout_ms
            else d.settings.connect_timeout_s
        )
        client = metrics.timed_imap(
            "connect",
            open_client,
            cfg.host,
            cfg.port,
            security_mode(cfg.secure, cfg.allow_starttls),
            creds,
            timeout_s=d.settings.net_timeout_s,
            connect_timeout_s=connect_timeout,
            ssl_context=d.ssl_context,
            max_literal_bytes=literal_cap(d.settings.max_raw_bytes),
            policy=d.outbound,
        )
        caps = capabilities(client)
        slot.session.attach(client, caps)
        out.connected_now, out.capabilities = True, caps
        if slot.session.dialect is Dialect.GMAIL and slot.provider.budget is None:
            slot.provider.budget = self._gmail_budget(cfg)
        if slot.resolving:
            self._adopt_folder(slot, out)
        out.status = metrics.timed_imap("examine", slot.session.examine)
        if self.on_logged_in is not None:
            self.on_logged_in(slot)
        known = (
            slot.cursor
            if slot.cursor is not None
            else slot.provider.config.cursors.get(slot.folder)
        )
        out.cursor = settle_cursor(self.seeder, slot.provider, slot.folder, known, out.status)

    def _adopt_folder(self, slot: Slot, out: Outcome) -> None:
        filters = slot.provider.config.folder_filters
        client = slot.session.client
        assert client is not None
        resolution = resolve_folders(client, filters)
        out.missing_folders = tuple(resolution.missing) + tuple(resolution.unselectable)
        folders = list(resolution.folders)
        if not folders:
            raise FolderError(f"no selectable folder matches {list(filters)}")
        slot.provider.gmail_labels = None
        if self.deps.settings.gmail_all_mail and slot.session.dialect is Dialect.GMAIL:
            folders = self._watch_all_mail(slot, resolution)
        slot.session.folder = folders[0]
        out.other_folders = tuple(folders[1:])

    def _watch_all_mail(self, slot: Slot, resolution: FolderResolution) -> list[str]:
        """One connection on All Mail (by its ``\\All`` flag) instead of one per label
        folder: Gmail allows 15 connections per account.  Its messages are then published
        only when they carry one of the asked folders' labels."""
        folders = list(resolution.folders)
        all_mail = all_mail_folder(resolution.listing)
        if all_mail is None:
            log.warning("gmail_all_mail_missing", **slot.log_fields(), folders=folders)
            return folders
        if all_mail not in folders:  # All Mail itself asked for: everything is wanted
            slot.provider.gmail_labels = labels_for_folders(resolution.listing, folders)
        log.info("gmail_all_mail_watched", **slot.log_fields(), all_mail=all_mail,
                 labels=sorted(slot.provider.gmail_labels or ()))  # fmt: skip
        return [all_mail]

    def _gmail_budget(self, cfg: ProviderConfig) -> DailyByteBudget | None:
        s = self.deps.settings
        if self.deps.redis is None or s.gmail_daily_bytes <= 0:
            return None
        return DailyByteBudget(
            self.deps.redis, cfg.username, limit_bytes=s.gmail_daily_bytes,
            reserve_bytes=s.gmail_live_reserve_bytes,
        )  # fmt: skip
