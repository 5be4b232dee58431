"""Engine-side state of providers and folder slots, and the slot's life as a state machine.

Touched only by the loop thread, except a slot's ``session`` while a job owns it
(``busy``): exactly one owner at a time, so no locks are needed.

A slot's life is :class:`SlotState`, changed only through :meth:`Slot.move`, which checks
the move against :data:`MOVES`::

    NEW ──> CONNECTING ──> SYNCING ──> IDLE | POLL_WAIT | BACKOFF | PARKED ──> (again)
     any ──> STOPPING (log out) ──> STOPPED;   any ──> STOPPED (abort, drain deadline)

Beside the state a slot keeps what is not a phase of its life: whether a sync job owns
the session right now (``busy``), whether its socket sits in the selector
(``registered``), activity that arrived while a job ran (``rerun``), and whether it is
the provider's first slot, resolving folder filters (``resolving``).
"""

from __future__ import annotations

import enum
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardworker.budget import DailyByteBudget
from shardworker.config import Settings
from shardworker.db.store import FolderCursor, ProviderConfig
from shardworker.engine.backoff import Backoff
from shardworker.engine.resync import FolderJob
from shardworker.imap.connect import Credentials
from shardworker.imap.session import FolderSession, FolderStatus
from shardworker.logs import get_logger
from shardworker.oauth import AccessToken
from shardworker.sink.base import Fence

log = get_logger(__name__)

_JITTER = random.Random()


class SlotState(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"  # a connect job runs, or waits for the host's admission
    SYNCING = "syncing"  # a cycle runs on the open session
    IDLE = "idle"
    POLL_WAIT = "poll_wait"  # no IDLE on this server: waiting for the next poll
    BACKOFF = "backoff"
    PARKED = "parked"  # folder missing or unselectable: re-probed later
    STOPPING = "stopping"  # asked to stop: its last cycle logs out
    STOPPED = "stopped"


_S = SlotState
_WAITING = frozenset({_S.IDLE, _S.POLL_WAIT, _S.BACKOFF, _S.PARKED})
# Where each state may go next.  STOPPED is the end; STOPPING and STOPPED are reachable
# from every live state (a stop, or the drain deadline's abort).
MOVES: dict[SlotState, frozenset[SlotState]] = {
    _S.NEW: frozenset({_S.CONNECTING, _S.PARKED}),
    _S.CONNECTING: frozenset({_S.CONNECTING, _S.SYNCING}) | _WAITING,
    _S.SYNCING: _WAITING,
    _S.IDLE: frozenset({_S.SYNCING, _S.CONNECTING}),
    _S.POLL_WAIT: frozenset({_S.SYNCING, _S.CONNECTING}),
    _S.BACKOFF: frozenset({_S.SYNCING, _S.CONNECTING}),
    _S.PARKED: frozenset({_S.SYNCING, _S.CONNECTING}),
    _S.STOPPING: frozenset(),
    _S.STOPPED: frozenset(),
}
for _state in SlotState:
    if _state is not _S.STOPPED:
        MOVES[_state] |= {_S.STOPPED} | ({_S.STOPPING} if _state is not _S.STOPPING else set())


def may_move(current: SlotState, to: SlotState) -> bool:
    return to in MOVES[current]


@dataclass(eq=False)
class Slot:
    """One folder of one provider: its connection, cursor and schedule."""

    provider: ProviderRuntime
    session: FolderSession
    backoff: Backoff
    # The first slot of a provider resolves its folder filters before it adopts a folder.
    resolving: bool = False
    state: SlotState = SlotState.NEW
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
    # Admin resyncs waiting for (or part-way through) this slot's next cycle.  The loop
    # thread appends, the cycle owning the slot pops: list operations are atomic.
    jobs: list[FolderJob] = field(default_factory=list)

    def move(self, to: SlotState) -> None:
        """The one way a slot changes state.  A move outside :data:`MOVES` is an engine bug:
        logged, and made anyway, so that one confused slot never silences its mailbox."""
        if to is not self.state and not may_move(self.state, to):
            provider_id, folder = self.provider.config.provider_id, self.folder
            log.error("slot_move_illegal", provider_id=provider_id, folder=folder,
                      current=self.state.value, to=to.value)  # fmt: skip
        self.state = to

    @property
    def want_stop(self) -> bool:
        """Asked to stop (the sync thread reads it to log out instead of idling)."""
        return self.state in (SlotState.STOPPING, SlotState.STOPPED)

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
    auth_ok_seen: bool = False
    auth_failure_counted: bool = False  # a failure was counted since the last good login
    auth_blocked_until: float = 0.0
    # OAuth2: the cached access token (with its expiry); a failed XOAUTH2 login forces a
    # refresh.  The lock keeps two folder slots from refreshing (rotating) at once.
    access_token: AccessToken | None = None
    force_token_refresh: bool = False
    credentials_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Gmail: the folder labels watched through All Mail (None: folders watched directly),
    # and the account's daily download budget (None: not Gmail, or no Redis).
    gmail_labels: frozenset[str] | None = None
    budget: DailyByteBudget | None = field(default=None, repr=False)
    # Called (True) once a reconnect's replacement runtime started, (False) if dropped.
    after_restart: list[Callable[[bool], None]] = field(default_factory=list, repr=False)

    @property
    def key(self) -> str:
        """``<tenant>:<provider_id>``: what the engine's provider map is keyed by."""
        return self.config.key

    def update_parked(self) -> None:
        """Missing folders are an error on the provider row, but never stop the others."""
        parts = []
        if self.missing_folders:
            parts.append(f"folders missing or unselectable: {list(self.missing_folders)}")
        if self.over_cap:
            parts.append(f"folders over the connection cap: {list(self.over_cap)}")
        detail = "; ".join(parts) or None
        if detail != self.parked_detail:
            self.parked_detail = detail
            if detail:
                log.warning("folders_parked", provider_id=self.config.provider_id, detail=detail)


@dataclass(slots=True)
class SlotSample:
    """One slot in a snapshot: plain values, safe to read on any thread."""

    key: int
    state: str
    busy: bool
    backfill: int
    exists_seen_at: float | None


@dataclass(frozen=True)
class EngineSnapshot:
    """What the engine hands out (``Engine.snapshot()``, on its loop thread) for metrics."""

    providers: int
    providers_in_error: int
    sync_threads: int
    slots: tuple[SlotSample, ...]


def snapshot(providers: dict[str, ProviderRuntime], sync_threads: int) -> EngineSnapshot:
    slots = tuple(
        SlotSample(
            id(slot),
            slot.state.value,
            slot.busy,
            sum(len(job.pending or ()) for job in slot.jobs),
            slot.exists_seen_at,
        )
        for rt in providers.values()
        for slot in rt.slots.values()
    )
    in_error = sum(rt.reported_status == "error" for rt in providers.values())
    return EngineSnapshot(len(providers), in_error, sync_threads, slots)


@dataclass
class EngineStats:
    published: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    bytes: int = 0
    connects: int = 0
    idle_refreshes: int = 0
    keepalives: int = 0  # idle wakes that were a bare "* OK", handled without a cycle
    peak_host_connecting: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))


def idle_refresh_delay(
    refresh_s: float, connected_now: bool, rng: random.Random = _JITTER
) -> float:
    """When to re-issue IDLE: at a random point of the interval's last half after a connect,
    of its last fifth after that, never later than ``refresh_s``.

    Slots that connected together would otherwise refresh together, every interval: the
    soak (10,000 folders, connected within 70 s) saw pushes queue behind those refresh
    waves and arrive up to 47 s late.
    """
    return refresh_s * rng.uniform(0.5 if connected_now else 0.8, 1.0)


def config_fingerprint(cfg: ProviderConfig) -> tuple[Any, ...]:
    """What, when changed, needs the provider's connections reopened (not its cursors)."""
    return (
        cfg.host,
        cfg.port,
        cfg.secure,
        cfg.allow_starttls,
        cfg.auth_type,
        cfg.username,
        cfg.folder_filters,
        cfg.max_emails_per_sync,
        cfg.connection_timeout_ms,
    )


def make_backoff(settings: Settings, *, auth: bool) -> Backoff:
    if auth:
        return Backoff(
            settings.auth_backoff_base_s, settings.auth_backoff_max_s, settings.healthy_after_s
        )
    return Backoff(settings.backoff_base_s, settings.backoff_max_s, settings.healthy_after_s)
