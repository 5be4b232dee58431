"""Every Prometheus metric of shardworker; no other module imports prometheus_client.

Core code calls the small hooks below (``leases_acquired(n)``, ``record_sync(...)``) or keeps
plain counters that :class:`PodCollector` reads at scrape time (supervisor and leader stats).

Processes: the coordinator calls :func:`use_multiprocess_dir` before it spawns a worker.
That exports ``PROMETHEUS_MULTIPROC_DIR`` (``SHARDWORKER_METRICS_DIR``, or a private
temporary directory), so every spawned worker writes its samples to mmap files there, and the
coordinator's ``/metrics`` merges them (prometheus_client's multiprocess mode).  Every gauge
names its merge mode: ``livesum`` for per-worker counts that add up to the pod's, ``livemax``
for ages and lags (the worst worker counts), ``liveall`` where a reader needs the value per
process.  "live" modes forget a worker once the coordinator calls :func:`mark_process_dead`;
counters and histograms of dead workers stay, so totals never go backwards.

Metric objects are built lazily, on first use, because the value class (in-memory or mmap)
is chosen when a metric is created: the coordinator imports this module before it knows the
directory.  Label values are bounded by construction: never a mailbox, address or provider id.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.registry import Collector

from shardworker import errors
from shardworker.logs import get_logger
from shardworker.metrics import footprint, providers
from shardworker.metrics.footprint import dead_letters_trimmed as dead_letters_trimmed

log = get_logger(__name__)
# `_created` series only exist in single-process mode; they would make in-process (test)
# expositions differ from the pod's, and dashboards never use them.
disable_created_metrics()  # type: ignore[no-untyped-call]

P = ParamSpec("P")
T = TypeVar("T")

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Slot states (shardworker.engine.state.SlotState values) exported even when zero.
CONNECTION_STATES = (
    "new", "connecting", "syncing", "idle", "poll_wait", "backoff", "parked", "stopping",
)  # fmt: skip
# A folder in these states is up to date (or making progress); any other state ages.
_HEALTHY_STATES = frozenset({"idle", "poll_wait", "syncing"})
_IGNORED_STATES = frozenset({"parked", "stopping", "stopped"})
MESSAGE_RESULTS = ("published", "duplicate", "dead_lettered", "skipped")
PUBLISH_RESULTS = ("ok", "fenced", "error")
DEAD_LETTER_REASONS = ("parse_error", "parser_crash", "fetch_returned_nothing")
IMAP_COMMANDS = ("connect", "examine", "fetch_meta", "fetch_body", "fetch_large", "idle_enter",
                 "idle_done", "idle_done_fetch", "noop", "logout")  # fmt: skip
MOVE_REASONS = ("new", "orphaned", "rebalance")
# Rejected logins (by response code) and secret trouble exist from the start, so increase()
# sees the first failure: a counter series born at 1 hides it.
AUTH_FAILURE_REASONS = (
    "auth_failed", "authenticationfailed", "authorizationfailed", "expired", "privacyrequired",
    "contactadmin", "secret_missing", "secret_unreadable",
)  # fmt: skip
PAUSE_REASONS = ("auth_failure", "manual", "tenant_cancelled", "other")
_LABEL_VALUE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_ERROR_CLASSES = frozenset(
    name for name, obj in vars(errors).items() if isinstance(obj, type) and name.endswith("Error")
)

IMAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Dovecot holds IDLE notifications for 500 ms: the buckets are dense around that floor.
PUSH_BUCKETS = (0.1, 0.25, 0.5, 0.6, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REBALANCE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

PROGRESS_EVERY_MESSAGES = 1000
PROGRESS_EVERY_S = 5.0


class _Families:
    """The metric objects of this process, all in one private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._pool(self.registry)
        self._imap(self.registry)
        self._ingest(self.registry)
        self.providers = providers.ProviderFamilies(self.registry)
        self._preset()

    def _pool(self, r: CollectorRegistry) -> None:
        self.providers_owned = Gauge(
            "shardworker_providers_owned", "Providers this pod serves (leases held).",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.leases_held = Gauge(
            "shardworker_leases_held", "Provider leases held, per worker process.",
            multiprocess_mode="liveall", registry=r,
        )  # fmt: skip
        self.leases_acquired = Counter(
            "shardworker_leases_acquired", "Provider leases acquired.", registry=r
        )
        self.leases_renewed = Counter(
            "shardworker_leases_renewed", "Provider lease renewals that succeeded.", registry=r
        )
        self.leases_lost = Counter(
            "shardworker_leases_lost",
            "Provider leases lost (taken over or expired) rather than released.",
            registry=r,
        )
        self.leases_released = Counter(
            "shardworker_leases_released", "Provider leases released after a drain.", registry=r
        )
        self.fencing_rejections = Counter(
            "shardworker_fencing_rejections",
            "Writes rejected because this owner's lease or fencing epoch was stale.",
            registry=r,
        )

    def _imap(self, r: CollectorRegistry) -> None:
        self.connections = Gauge(
            "shardworker_connections", "Folder connections by state.", ["state"],
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.providers_in_error = Gauge(
            "shardworker_providers_in_error",
            "Served providers whose status is error (credentials, network, server).",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.connects = Counter(
            "shardworker_imap_connects",
            "Connect and login attempts by result (ok, or the failure reason).",
            ["result"], registry=r,
        )  # fmt: skip
        self.imap_duration = Histogram(
            "shardworker_imap_command_duration_seconds",
            "Duration of IMAP commands (connect includes TCP, TLS and login).",
            ["command"], buckets=IMAP_BUCKETS, registry=r,
        )  # fmt: skip
        self.session_errors = Counter(
            "shardworker_session_errors", "Folder session errors by class and reason.",
            ["error_type", "reason"], registry=r,
        )  # fmt: skip
        self.auth_failures = Counter(
            "shardworker_auth_failures",
            "Credential failures: rejected logins, missing or unreadable secrets.",
            ["reason"], registry=r,
        )  # fmt: skip

    def _ingest(self, r: CollectorRegistry) -> None:
        self.sync_jobs_busy = Gauge(
            "shardworker_sync_jobs_busy", "Folder cycles running on sync threads.",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.sync_threads = Gauge(
            "shardworker_sync_threads", "Sync threads (the cap on concurrent folder cycles).",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.sync_lag = Gauge(
            "shardworker_sync_lag_seconds",
            "Age of the oldest new-mail notification not yet synced (0 when none waits).",
            multiprocess_mode="livemax", registry=r,
        )  # fmt: skip
        self.oldest_sync_age = Gauge(
            "shardworker_oldest_sync_age_seconds",
            "How long the least up-to-date folder has been out of idle/poll (0 when none).",
            multiprocess_mode="livemax", registry=r,
        )  # fmt: skip
        self.backlog = Gauge(
            "shardworker_sync_backlog_messages",
            "Messages found above folder cursors and not yet processed (draining a backlog).",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.backfill = Gauge(
            "shardworker_backfill_pending_messages",
            "Messages an admin backfill has still to go through.",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.messages = Counter(
            "shardworker_messages", "Messages ingested by result.", ["result"], registry=r
        )
        self.bytes = Counter(
            "shardworker_ingested_bytes", "Raw message bytes fetched for ingestion.", registry=r
        )
        self.push_latency = Histogram(
            "shardworker_push_latency_seconds",
            "From an IDLE notification seen to the message's XADD done.",
            buckets=PUSH_BUCKETS, registry=r,
        )  # fmt: skip
        self.publish_batches = Counter(
            "shardworker_publish_batches", "Publish round trips by result.", ["result"], registry=r
        )
        self.publish_duration = Histogram(
            "shardworker_publish_duration_seconds", "Duration of one publish round trip.",
            buckets=PUBLISH_BUCKETS, registry=r,
        )  # fmt: skip
        self.dead_letters = Counter(
            "shardworker_dead_letters", "Messages written to the dead-letter stream.", ["reason"],
            registry=r,
        )  # fmt: skip

    def _preset(self) -> None:
        """Create the known label values, so a dashboard shows 0 rather than no data."""
        for state in CONNECTION_STATES:
            self.connections.labels(state)
        for result in MESSAGE_RESULTS:
            self.messages.labels(result)
        for result in PUBLISH_RESULTS:
            self.publish_batches.labels(result)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)
        for command in IMAP_COMMANDS:
            self.imap_duration.labels(command)
        self.connects.labels("ok")
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)


class _LeaderFamilies:
    """The coordinator's own (the leader thread's): never created in a worker."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rebalance_duration = Histogram(
            "shardworker_rebalance_duration_seconds",
            "Duration of one leader round: plan, publish and mirror the assignment.",
            buckets=REBALANCE_BUCKETS, registry=self.registry,
        )  # fmt: skip


_lock = threading.Lock()
_families: _Families | None = None
_leader_families: _LeaderFamilies | None = None


def _m() -> _Families:
    global _families
    if _families is None:
        with _lock:
            if _families is None:
                _families = _Families()
    return _families


providers.bind(lambda: _m().providers)


def _leader_m() -> _LeaderFamilies:
    global _leader_families
    if _leader_families is None:
        with _lock:
            if _leader_families is None:
                _leader_families = _LeaderFamilies()
    return _leader_families


# ------------------------------------------------------------------ multiprocess setup


@dataclass
class MultiprocessDir:
    """Where worker processes write their samples; ``close()`` removes a private one."""

    path: str
    private: bool

    def close(self) -> None:
        if self.private:
            shutil.rmtree(self.path, ignore_errors=True)


def use_multiprocess_dir(configured: str) -> MultiprocessDir:
    """Put this process (and every child spawned later) in multiprocess mode.

    Called by the coordinator at start, before any worker exists.  Stale ``*.db`` files of
    an earlier run are deleted (only those: the directory may be shared with nothing else,
    but a mistaken path must not lose anything else).
    """
    global _families, _leader_families
    if configured:
        try:
            os.makedirs(configured, exist_ok=True)
            for stale in glob.glob(os.path.join(configured, "*.db")):
                os.remove(stale)
        except OSError as exc:
            raise errors.ConfigError(
                f"SHARDWORKER_METRICS_DIR: cannot use {configured!r}: {exc.strerror}"
            ) from None
        target = MultiprocessDir(configured, private=False)
    else:
        target = MultiprocessDir(tempfile.mkdtemp(prefix="shardworker-metrics-"), private=True)
    os.environ[ENV_DIR] = target.path
    with _lock:
        # The value class is chosen per metric at creation: rebuild with the mmap one.
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        _families = _leader_families = None
    footprint.reset()
    return target


def mark_process_dead(pid: int) -> None:
    """A worker was reaped: forget its live gauges (its counters keep counting)."""
    path = os.environ.get(ENV_DIR)
    if path:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def render(extra: Collector | None = None) -> bytes:
    """The text exposition of this pod: every process's metrics, plus ``extra``."""
    registry = CollectorRegistry()
    path = os.environ.get(ENV_DIR)
    if path:
        multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    else:
        registry.register(_m().registry)
        if _leader_families is not None:
            registry.register(_leader_families.registry)
        registry.register(footprint.families().registry)
    if extra is not None:
        registry.register(extra)
    return generate_latest(registry)


def leases_held_by_pid() -> dict[int, int]:
    """``shardworker_leases_held`` per live worker pid, read from the multiprocess files."""
    path = os.environ.get(ENV_DIR)
    if not path:
        return {}
    files = glob.glob(os.path.join(path, "gauge_liveall_*.db"))
    out: dict[int, int] = {}
    for metric in multiprocess.MultiProcessCollector.merge(files, accumulate=False):  # type: ignore[no-untyped-call]
        if metric.name != "shardworker_leases_held":
            continue
        for sample in metric.samples:
            with contextlib.suppress(KeyError, ValueError):
                out[int(sample.labels["pid"])] = int(sample.value)
    return out


# ------------------------------------------------------------------ bounded labels


def bounded(value: object, fallback: str = "other") -> str:
    text = str(value).lower()
    return text if _LABEL_VALUE.fullmatch(text) else fallback


def error_reason(err: BaseException) -> str:
    """A short, bounded reason for an error (never its message)."""
    if isinstance(err, errors.SecretNotFoundError):
        return "secret_missing"
    if isinstance(err, errors.SecretError):
        return "secret_unreadable"
    for attr in ("code", "reason"):
        value = getattr(err, attr, None)
        if isinstance(value, str) and value:
            return bounded(value)
    names = {
        errors.FolderError: "folder", errors.FencedError: "fenced",
        errors.LeaseLostError: "lease_lost", errors.PublishError: "publish",
        errors.StoreError: "store", errors.ParseError: "parse",
    }  # fmt: skip
    for cls, name in names.items():
        if isinstance(err, cls):
            return name
    return "other"


def _error_type(err: BaseException) -> str:
    name = type(err).__name__
    return name if name in _ERROR_CLASSES else "other"


# ------------------------------------------------------------------ hooks: pool agent


def set_leases_held(count: int) -> None:
    m = _m()
    m.providers_owned.set(count)
    m.leases_held.set(count)


def leases_acquired(count: int) -> None:
    if count:
        _m().leases_acquired.inc(count)


def lease_renewal(renewed: int, lost: int) -> None:
    m = _m()
    if renewed:
        m.leases_renewed.inc(renewed)
    if lost:
        m.leases_lost.inc(lost)
    set_leases_held(renewed)


def leases_released(count: int) -> None:
    if count:
        _m().leases_released.inc(count)


def observe_rebalance(seconds: float) -> None:
    _leader_m().rebalance_duration.observe(seconds)


# ------------------------------------------------------------------ hooks: engine


class SyncCounts(Protocol):
    """What one drain produced (``shardworker.engine.sync.SyncResult`` reads as one)."""

    @property
    def published(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def dead_lettered(self) -> int: ...
    @property
    def skipped(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def published_at(self) -> Sequence[float]: ...


class SlotView(Protocol):
    """One folder slot as the engine's snapshot shows it."""

    @property
    def key(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def busy(self) -> bool: ...
    @property
    def backfill(self) -> int: ...
    @property
    def exists_seen_at(self) -> float | None: ...


class EngineView(Protocol):
    """What the engine hands out on its loop thread (``Engine.snapshot()``)."""

    @property
    def providers(self) -> int: ...
    @property
    def providers_in_error(self) -> int: ...
    @property
    def sync_threads(self) -> int: ...
    @property
    def slots(self) -> Sequence[SlotView]: ...


def connect_finished(connected: bool, error: BaseException | None) -> None:
    """Count the result of a connect+login attempt."""
    if connected:
        _m().connects.labels("ok").inc()
    elif error is not None:
        _m().connects.labels(error_reason(error)).inc()


def session_error(err: BaseException) -> None:
    m, reason = _m(), error_reason(err)
    m.session_errors.labels(_error_type(err), reason).inc()
    if isinstance(err, errors.ImapAuthError | errors.SecretError):
        m.auth_failures.labels(reason).inc()
    if isinstance(err, errors.FencedError):
        m.fencing_rejections.inc()


def record_sync(result: SyncCounts, exists_seen_at: float | None) -> None:
    m = _m()
    for label, count in zip(
        MESSAGE_RESULTS,
        (result.published, result.duplicates, result.dead_lettered, result.skipped),
        strict=True,
    ):
        if count:
            m.messages.labels(label).inc(count)
    if result.bytes:
        m.bytes.inc(result.bytes)
    if exists_seen_at is not None:
        for done in result.published_at:
            m.push_latency.observe(max(0.0, done - exists_seen_at))


def timed_imap(command: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)``, its duration observed as IMAP ``command`` (failures too)."""
    started = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        _m().imap_duration.labels(command).observe(time.perf_counter() - started)


@contextlib.contextmanager
def publish_round_trip() -> Iterator[None]:
    started = time.perf_counter()
    result = "error"
    try:
        yield
        result = "ok"
    except errors.FencedError:
        result = "fenced"
        raise
    finally:
        m = _m()
        m.publish_duration.observe(time.perf_counter() - started)
        m.publish_batches.labels(result).inc()


def dead_lettered(reason: str) -> None:
    _m().dead_letters.labels(bounded(reason.split(":", 1)[0])).inc()


@dataclass
class _EngineView:
    """What the loop thread last saw; kept between observations for ages and progress."""

    unhealthy_since: dict[int, float] = field(default_factory=dict)
    progress_logged_at: float = 0.0


_engine_view = _EngineView()


def observe_engine(engine: EngineView, now: float) -> None:
    """Export a snapshot of the engine's folder slots (taken every watchdog turn)."""
    states: Tally[str] = Tally()
    busy = backfill = 0
    lag = age = 0.0
    seen: set[int] = set()
    view = _engine_view
    for slot in engine.slots:
        states[slot.state] += 1
        busy += slot.busy
        backfill += slot.backfill
        if slot.exists_seen_at is not None:
            lag = max(lag, now - slot.exists_seen_at)
        if slot.state in _HEALTHY_STATES or slot.state in _IGNORED_STATES:
            continue
        seen.add(slot.key)
        age = max(age, now - view.unhealthy_since.setdefault(slot.key, now))
    view.unhealthy_since = {k: v for k, v in view.unhealthy_since.items() if k in seen}
    m = _m()
    for state in CONNECTION_STATES:
        m.connections.labels(state).set(states.get(state, 0))
    m.providers_in_error.set(engine.providers_in_error)
    m.sync_jobs_busy.set(busy)
    m.sync_threads.set(engine.sync_threads)
    m.sync_lag.set(lag)
    m.oldest_sync_age.set(age)
    m.backfill.set(backfill)
    _log_connect_progress(states, engine.providers, now)


def _log_connect_progress(states: Mapping[str, int], providers: int, now: float) -> None:
    """During start-up (or a large hand-over) say how far connecting has come."""
    pending = states.get("new", 0) + states.get("connecting", 0)
    view = _engine_view
    if pending and now - view.progress_logged_at >= PROGRESS_EVERY_S:
        view.progress_logged_at = now
        log.info("connect_progress", providers=providers, pending=pending,
                 idle=states.get("idle", 0), backoff=states.get("backoff", 0))  # fmt: skip


class DrainProgress:
    """A folder's backlog: the pod's backlog gauge, and a progress line for long drains.

    Every ``PROGRESS_EVERY_MESSAGES`` messages or ``PROGRESS_EVERY_S`` seconds a drain
    logs how far it got; a drain that logged progress also logs its end.
    """

    def __init__(self, total: int, fields: Mapping[str, object]) -> None:
        self.total = total
        self.done = 0
        self.fields = dict(fields)
        self._started = self._logged_at = time.monotonic()
        self._logged_done = 0
        self._logged = False
        _m().backlog.inc(total)

    def __enter__(self) -> DrainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        _m().backlog.dec(self.total - self.done)
        if self._logged:
            log.info("drain_finished", **self.fields, done=self.done, total=self.total,
                     seconds=round(time.monotonic() - self._started, 3))  # fmt: skip

    def advance(self, count: int) -> None:
        count = min(count, self.total - self.done)
        self.done += count
        _m().backlog.dec(count)
        now = time.monotonic()
        if (
            self.done - self._logged_done >= PROGRESS_EVERY_MESSAGES
            or now - self._logged_at >= PROGRESS_EVERY_S
        ) and self.done < self.total:
            self._logged, self._logged_at, self._logged_done = True, now, self.done
            rate = self.done / max(now - self._started, 1e-6)
            log.info("drain_progress", **self.fields, done=self.done, total=self.total,
                     per_s=round(rate, 1))  # fmt: skip
