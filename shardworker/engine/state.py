"""Engine-side state of providers and folder slots.

Touched only by the loop thread, except a slot's ``session`` while a job owns it
(``busy``): exactly one owner at a time, so no locks are needed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shardworker.config import Settings
from shardworker.db.store import FolderCursor, ProviderConfig
from shardworker.engine.backoff import Backoff
from shardworker.engine.resync import FolderJob
from shardworker.imap.connect import Credentials
from shardworker.imap.session import FolderSession, FolderStatus, State
from shardworker.oauth import AccessToken
from shardworker.sink.base import Fence


@dataclass(eq=False)
class Slot:
    """One folder of one provider: its connection, cursor and schedule."""

    provider: ProviderRuntime
    session: FolderSession
    backoff: Backoff
    # The first slot of a provider resolves its folder filters before it adopts a folder.
    resolving: bool = False
    state: State = State.NEW
    cursor: FolderCursor | None = None
    status: FolderStatus | None = None
    busy: bool = False
    job_progress_at: float = 0.0
    registered: bool = False
    rerun: bool = False  # activity arrived while a job ran: run another cycle after it
    timer_gen: int = 0
    connecting_host: str | None = None
    exists_seen_at: float | None = None
    last_activity: float = 0.0
    empty_cycles: int = 0  # consecutive cycles that found nothing new (Engine._wake)
    last_error: str | None = None
    want_stop: bool = False
    # Admin resyncs waiting for (or part-way through) this slot's next cycle.  The loop
    # thread appends, the cycle owning the slot pops: list operations are atomic.
    jobs: list[FolderJob] = field(default_factory=list)

    def mark_progress(self) -> None:
        """Called from the sync thread after each checkpoint (a float store is atomic)."""
        self.job_progress_at = time.monotonic()

    @property
    def folder(self) -> str:
        return self.session.folder

    @property
    def connected(self) -> bool:
        return self.session.client is not None

    def log_fields(self) -> dict[str, str]:
        return {"provider_id": self.provider.config.provider_id, "folder": self.folder}


@dataclass(eq=False)
class ProviderRuntime:
    config: ProviderConfig
    fence: Fence | None
    auth_backoff: Backoff
    credentials: Credentials | None = None
    slots: dict[str, Slot] = field(default_factory=dict)
    missing_folders: tuple[str, ...] = ()
    parked_detail: str | None = None
    over_cap: tuple[str, ...] = ()
    paused: bool = False
    stopping: bool = False
    immediate: bool = False
    replacement: ProviderConfig | None = None
    reported_status: str | None = None
    reported_error: str | None = None
    last_sync_write: float = 0.0
    auth_ok_seen: bool = False
    auth_blocked_until: float = 0.0
    # OAuth2: the cached access token (with its expiry); a failed XOAUTH2 login forces a
    # refresh.  The lock keeps two folder slots from refreshing (rotating) at once.
    access_token: AccessToken | None = None
    force_token_refresh: bool = False
    credentials_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Called (True) once a reconnect's replacement runtime started, (False) if dropped.
    after_restart: list[Callable[[bool], None]] = field(default_factory=list, repr=False)

    @property
    def key(self) -> str:
        return self.config.provider_id


def make_backoff(settings: Settings, *, auth: bool) -> Backoff:
    if auth:
        return Backoff(
            settings.auth_backoff_base_s, settings.auth_backoff_max_s, settings.healthy_after_s
        )
    return Backoff(settings.backoff_base_s, settings.backoff_max_s, settings.healthy_after_s)
