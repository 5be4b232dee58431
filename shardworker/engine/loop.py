"""The worker's engine: thousands of folder sessions on one ``selectors`` loop.

The loop thread owns all scheduling state.  Idle sockets sit in the selector; when one
becomes readable the loop reads what is waiting without blocking: a bare ``* OK``
keepalive only proves liveness and is consumed right there; anything else (an EXISTS,
EXPUNGE, FETCH, or whatever it does not understand) hands the slot to a sync thread for
one cycle (leave IDLE → drain → IDLE again), so slow fetching, parsing and publishing
never stall the other mailboxes.  Threads report back through ``post``.

Per-host admission caps concurrent connection attempts so a restart does not storm a
server.  A watchdog aborts jobs that stop making progress and idle connections that went
silent, from outside, by shutting their socket down.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import selectors
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from shardworker import metrics
from shardworker.db.store import ProviderConfig
from shardworker.engine.cycle import Cycle, CycleDeps, Outcome
from shardworker.engine.failures import (
    Action,
    Decision,
    FailurePolicy,
    error_reason,
    scrub_secret,
)
from shardworker.engine.resync import FolderJob, ResyncRequest
from shardworker.engine.state import (
    EngineSnapshot,
    EngineStats,
    ProviderRuntime,
    Slot,
    SlotState,
    config_fingerprint,
    idle_refresh_delay,
    make_backoff,
    snapshot,
)
from shardworker.errors import (
    ImapAuthError,
    ImapThrottledError,
    ShardworkerError,
    TokenRefreshError,
)
from shardworker.imap.idlewake import Wake, read_idle_wake
from shardworker.imap.session import FolderSession
from shardworker.logs import get_logger
from shardworker.metrics import providers as provider_metrics
from shardworker.secrets.store import secret_name
from shardworker.sink.base import Fence

log = get_logger(__name__)

WATCHDOG_EVERY_S = 2.0
BACKPRESSURE_RETRY_S = 1.0
# Once two cycles in a row found nothing new, the next wake-up waits this long after the
# last cycle: a server answering every IDLE with an EXISTS for mail FETCH never finds must
# not make a slot spin.  Dovecot coalesces its own notifications over 0.5 s anyway.
EMPTY_WAKE_GAP_S = 0.25
SECRET_PREFETCH_CHUNK = 500


class Engine:
    def __init__(
        self,
        deps: CycleDeps,
        *,
        on_released: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.cycle = Cycle(deps, on_logged_in=self._attempt_over)
        self.clock = clock
        self.on_released = on_released
        self.stats = EngineStats()
        self.failures = FailurePolicy(self.settings)
        self.providers: dict[str, ProviderRuntime] = {}
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._posted: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, int, Slot]] = []
        self._seq = itertools.count()
        self._executor = ThreadPoolExecutor(self.settings.sync_threads, thread_name_prefix="sync")
        self._host_inflight: Counter[str] = Counter()
        self._host_queue: dict[str, deque[Slot]] = {}
        self._stopping = False
        self._next_watchdog = 0.0
        self.stopped = threading.Event()

    # -- thread-safe API ---------------------------------------------------------------

    def post(self, fn: Callable[[], None]) -> None:
        self._posted.append(fn)
        # A full pipe means the loop is already due to wake.
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def update_providers(
        self,
        configs: Sequence[ProviderConfig],
        fences: Mapping[str, Fence] | None = None,
    ) -> None:
        """Serve exactly these providers; stop the others gracefully.  ``fences`` is keyed
        by ``tenant:provider_id`` (``ProviderConfig.key``), as the pool agent holds them."""
        snapshot = list(configs)
        self.post(lambda: self._apply_desired(snapshot, dict(fences or {})))

    def drop_provider_now(self, key: str, reason: str = "lease_lost") -> None:
        """The lease is gone (or given up): stop acting for this provider
        (``tenant:provider_id``) at once."""
        self.post(lambda: self._drop_now(key, reason))

    def request_stop(self) -> None:
        self.post(self._begin_stop)

    def reconnect_provider(
        self, key: str, config: ProviderConfig | None, on_done: Callable[[bool], None]
    ) -> None:
        """Log out every connection and open them again (fresh credentials, ``config`` if
        given); ``on_done(True)`` once reopening started, ``on_done(False)`` if not served."""
        self.post(lambda: self._reconnect(key, config, on_done))

    def resync_provider(self, key: str, request: ResyncRequest) -> None:
        """Queue an admin resync on the provider's (``tenant:provider_id``) folder slots."""
        self.post(lambda: self._resync(key, request))

    def snapshot(self) -> EngineSnapshot:
        """The slots as they stand; call on the loop thread (it is not locked)."""
        return snapshot(self.providers, self.settings.sync_threads)

    # -- loop --------------------------------------------------------------------------

    def run(self, drain_deadline_s: float | None = None) -> None:
        deadline: float | None = None
        try:
            while not (self._stopping and not self.providers):
                if self._stopping and deadline is None and drain_deadline_s is not None:
                    deadline = self.clock() + drain_deadline_s
                if deadline is not None and self.clock() > deadline:
                    self._abort_all()
                self._loop_once()
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self.selector.close()
            self._wake_r.close()
            self._wake_w.close()
            self.stopped.set()

    def _loop_once(self) -> None:
        timeout = self._next_timeout()
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self._drain_wakeups()
            else:
                self._on_readable(key.data)
        self._run_posted()
        self._run_timers()
        now = self.clock()
        if now >= self._next_watchdog:
            self._next_watchdog = now + WATCHDOG_EVERY_S
            self._watchdog(now)
            metrics.observe_engine(self.snapshot(), now)

    def _next_timeout(self) -> float:
        if self._posted:
            return 0.0
        horizon = WATCHDOG_EVERY_S
        if self._timers:
            horizon = min(horizon, self._timers[0][0] - self.clock())
        return max(0.0, horizon)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_posted(self) -> None:
        while self._posted:
            fn = self._posted.popleft()
            try:
                fn()
            except Exception:
                log.error("engine_callback_failed", exc=True)

    def _run_timers(self) -> None:
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, gen, slot = heapq.heappop(self._timers)
            if gen == slot.timer_gen and not slot.want_stop:
                if slot.registered:
                    self.stats.idle_refreshes += 1  # re-issue IDLE before servers or NATs drop it
                self._unregister(slot)
                self._dispatch(slot)

    def _set_timer(self, slot: Slot, delay_s: float) -> None:
        slot.timer_gen += 1
        heapq.heappush(
            self._timers, (self.clock() + delay_s, next(self._seq), slot.timer_gen, slot)
        )

    # -- providers ---------------------------------------------------------------------

    def _apply_desired(self, configs: list[ProviderConfig], fences: dict[str, Fence]) -> None:
        if self._stopping:
            return
        desired = {c.key: c for c in configs}
        for pid, rt in list(self.providers.items()):
            cfg = desired.get(pid)
            if cfg is None:
                rt.replacement = None
                self._stop_provider(rt, immediate=False)
            elif config_fingerprint(cfg) != config_fingerprint(rt.config) and not rt.stopping:
                log.info("provider_config_changed", provider_id=rt.config.provider_id)
                rt.replacement = cfg
                self._stop_provider(rt, immediate=False)
            elif rt.stopping and rt.replacement is not None:
                rt.replacement = cfg
        fresh = [cfg for pid, cfg in desired.items() if pid not in self.providers]
        self._prefetch_secrets(fresh)
        for cfg in fresh:
            self._start_provider(cfg, fences.get(cfg.key))  # keyed as the agent keys them

    def _prefetch_secrets(self, configs: list[ProviderConfig]) -> None:
        """Many providers at once (a cold start, a failover): their passwords in a few
        queries, queued ahead of their connects, instead of one query per connect."""
        wanted = [(c.tenant, secret_name("password", c.provider_id))
                  for c in configs if c.auth_type == "password"]  # fmt: skip
        if len(wanted) < 2:
            return
        for start in range(0, len(wanted), SECRET_PREFETCH_CHUNK):
            self._background(
                self.deps.secrets.prefetch, wanted[start : start + SECRET_PREFETCH_CHUNK]
            )

    def _start_provider(self, cfg: ProviderConfig, fence: Fence | None) -> None:
        rt = ProviderRuntime(cfg, fence, make_backoff(self.settings, auth=True))
        self.providers[cfg.key] = rt
        if cfg.folder_filters:
            slot = self._new_slot(rt, "", resolving=True)
        else:
            slot = self._new_slot(rt, "INBOX")
        self._dispatch(slot)

    def _new_slot(self, rt: ProviderRuntime, folder: str, *, resolving: bool = False) -> Slot:
        slot = Slot(
            rt,
            FolderSession(folder),
            make_backoff(self.settings, auth=False),
            resolving=resolving,
            last_activity=self.clock(),
        )
        rt.slots[folder] = slot
        return slot

    def _stop_provider(self, rt: ProviderRuntime, *, immediate: bool) -> None:
        rt.stopping = True
        rt.immediate = rt.immediate or immediate
        for slot in list(rt.slots.values()):
            self._stop_slot(slot)
        if not rt.slots:
            self._provider_released(rt)

    def _drop_now(self, key: str, reason: str) -> None:
        rt = self.providers.get(key)
        if rt is not None:
            rt.replacement = None
            log.warning("provider_dropped", provider_id=rt.config.provider_id,
                        tenant=rt.config.tenant, reason=reason)  # fmt: skip
            self._stop_provider(rt, immediate=True)

    def _reconnect(
        self, key: str, config: ProviderConfig | None, on_done: Callable[[bool], None]
    ) -> None:
        rt = self.providers.get(key)
        if rt is None or self._stopping or (rt.stopping and rt.replacement is None):
            self._background(on_done, False)
            return
        log.info("provider_reconnecting", provider_id=rt.config.provider_id)
        rt.replacement = config or rt.replacement or rt.config
        rt.after_restart.append(on_done)
        self._stop_provider(rt, immediate=False)

    def _resync(self, key: str, request: ResyncRequest) -> None:
        rt = self.providers.get(key)
        served = {} if rt is None or rt.stopping else {f: s for f, s in rt.slots.items() if f}
        slots = [s for f, s in served.items() if request.matches(f)]
        if not slots:
            self._background(request.fail, sorted(served))
            return
        request.expect([s.folder for s in slots])
        for slot in slots:
            slot.jobs.append(FolderJob(request, slot.folder))
            if slot.busy:
                slot.rerun = True
            elif slot.registered or slot.state is SlotState.POLL_WAIT:
                self._unregister(slot)
                self._dispatch(slot)

    def _stop_slot(self, slot: Slot) -> None:
        if not slot.want_stop:
            slot.move(SlotState.STOPPING)
        slot.timer_gen += 1
        if slot.provider.immediate:
            slot.session.abort()
        if slot.busy:
            return
        self._unregister(slot)
        if slot.connected and not slot.provider.immediate:
            self._dispatch(slot)
        else:
            if slot.connected:
                log.info("disconnected", **slot.log_fields(), reason="dropped")
            slot.session.close(logout=False)
            self._slot_closed(slot)

    def _slot_closed(self, slot: Slot) -> None:
        slot.move(SlotState.STOPPED)
        for job in slot.jobs:  # an admin resync cut short: say so rather than hang
            self._background(job.abandon)
        slot.jobs.clear()
        rt = slot.provider
        if rt.slots.get(slot.folder) is slot:
            del rt.slots[slot.folder]
        if rt.stopping and not rt.slots:
            self._provider_released(rt)

    def _provider_released(self, rt: ProviderRuntime) -> None:
        if self.providers.get(rt.key) is not rt:
            return
        del self.providers[rt.key]
        restarted, rt.after_restart = rt.after_restart, []
        if rt.replacement is not None and not self._stopping:
            # A config change: the same owner serves it on, so the lease stays.
            self._start_provider(rt.replacement, rt.fence)
            for callback in restarted:
                self._background(callback, True)
            return
        for callback in restarted:
            self._background(callback, False)
        log.info("provider_released", provider_id=rt.config.provider_id)
        if self.on_released is not None:
            self.on_released(rt.key)

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("engine_draining", providers=len(self.providers))
        for rt in list(self.providers.values()):
            rt.replacement = None
            self._stop_provider(rt, immediate=False)

    def _abort_all(self) -> None:
        for rt in list(self.providers.values()):
            rt.immediate = True
            for slot in list(rt.slots.values()):
                slot.session.abort()
                if not slot.busy:
                    slot.session.close(logout=False)
                    self._slot_closed(slot)
            if not rt.slots:
                self._provider_released(rt)

    # -- dispatch ----------------------------------------------------------------------

    def _dispatch(self, slot: Slot) -> None:
        if slot.busy:
            slot.rerun = True
            return
        now = self.clock()
        if not slot.connected and not slot.want_stop:
            wait = slot.provider.auth_blocked_until - now
            if wait > 0:
                self._set_timer(slot, wait)
                return
            if not self._admit(slot):
                return
        slot.busy = True
        slot.job_progress_at = now
        if not slot.want_stop:  # a stopping slot's last cycle logs out; it stays STOPPING
            slot.move(SlotState.SYNCING if slot.connected else SlotState.CONNECTING)
        future = self._executor.submit(self.cycle.run, slot)
        future.add_done_callback(lambda f: self.post(lambda: self._on_done(slot, f)))

    def _admit(self, slot: Slot) -> bool:
        if slot.connecting_host is not None:
            return True
        host = slot.provider.config.host
        if self._host_inflight[host] >= self.settings.connect_concurrency_per_host:
            self._host_queue.setdefault(host, deque()).append(slot)
            slot.move(SlotState.CONNECTING)
            return False
        self._host_inflight[host] += 1
        self.stats.peak_host_connecting = max(
            self.stats.peak_host_connecting, self._host_inflight[host]
        )
        slot.connecting_host = host
        return True

    def _attempt_over(self, slot: Slot) -> None:
        """On the sync thread: logged in and EXAMINEd.  The host's admission slot goes to
        the next connect now, not after this one's cursor write and backlog drain."""
        self.post(lambda: self._release_host(slot))

    def _release_host(self, slot: Slot) -> None:
        host, slot.connecting_host = slot.connecting_host, None
        if host is None:
            return
        self._host_inflight[host] -= 1
        queue = self._host_queue.get(host)
        while queue:
            waiting = queue.popleft()
            if not waiting.want_stop and not waiting.busy:
                self._dispatch(waiting)
                break
            if waiting.want_stop and not waiting.busy:
                self._slot_closed(waiting)

    # -- outcomes ----------------------------------------------------------------------

    def _on_done(self, slot: Slot, future: Future[Outcome]) -> None:
        slot.busy = False
        self._release_host(slot)
        outcome = future.result()
        if slot.state is SlotState.CONNECTING:
            metrics.connect_finished(outcome.connected_now, outcome.error)
        slot.cursor, slot.status = outcome.cursor, outcome.status
        if outcome.connected_now:
            self._on_connected(slot, outcome)
        if outcome.result is not None:
            self._account(slot, outcome)
        slot.exists_seen_at = None
        slot.last_activity = self.clock()
        if outcome.kind == "stopped" or (
            slot.want_stop and (outcome.kind == "error" or not slot.connected)
        ):
            # A stop that fails half-way (dead server) closes without logging out.
            log.info("disconnected", **slot.log_fields(), reason="stopped")
            slot.session.close(logout=False)
            self._slot_closed(slot)
        elif slot.want_stop:
            self._dispatch(slot)
        elif outcome.kind == "error":
            assert outcome.error is not None
            self._on_error(slot, outcome.error)
        else:
            self._continue(slot, outcome)

    def _continue(self, slot: Slot, outcome: Outcome) -> None:
        if outcome.kind == "idle":
            slot.move(SlotState.IDLE)
            if outcome.buffered or slot.rerun:
                slot.rerun = False
                self._wake(slot)
                return
            self._register(slot)
            (log.info if outcome.connected_now else log.debug)("idle_started", **slot.log_fields())
            refresh = idle_refresh_delay(self.settings.idle_refresh_s, outcome.connected_now)
            self._set_timer(slot, refresh)
        elif outcome.kind == "poll":
            slot.move(SlotState.POLL_WAIT)
            self._set_timer(slot, 0.0 if slot.rerun else self.settings.poll_interval_s)
            slot.rerun = False
        else:
            slot.move(SlotState.BACKOFF)
            self._set_timer(slot, BACKPRESSURE_RETRY_S)
        self._report(slot.provider, "connected", slot.provider.parked_detail)

    # -- failures ----------------------------------------------------------------------

    def _on_error(self, slot: Slot, err: ShardworkerError) -> None:
        decision = self.failures.decide(slot, err, self.clock())
        if decision.action is Action.WAIT:
            slot.move(SlotState.BACKOFF)
            self._set_timer(slot, decision.delay_s)
            return
        if isinstance(err, ImapThrottledError):
            self._on_throttled(slot, err, decision)
            return
        rt, reason = slot.provider, error_reason(err)
        self.stats.errors[reason] += 1
        metrics.session_error(err)
        was_connected = slot.connected
        text = scrub_secret(str(err), rt)
        slot.last_error = f"{type(err).__name__}: {text}"
        log.warning("session_error", **slot.log_fields(), error_type=type(err).__name__,
                    reason=reason, error=text)  # fmt: skip
        self._apply_failure(slot, err, decision)
        if was_connected and not slot.connected:
            log.info("disconnected", **slot.log_fields(), reason=reason)

    def _on_throttled(self, slot: Slot, err: ImapThrottledError, decision: Decision) -> None:
        """The server asked us to wait: not an error (no error count, no error status)."""
        provider_metrics.imap_throttled()
        log.info("imap_throttled", **slot.log_fields(), retry_after_s=err.retry_after_s,
                 error=scrub_secret(str(err), slot.provider))  # fmt: skip
        self._apply_failure(slot, err, decision)

    def _apply_failure(self, slot: Slot, err: ShardworkerError, decision: Decision) -> None:
        rt, action = slot.provider, decision.action
        if action is Action.STOP_PROVIDER:
            self._stop_provider(rt, immediate=True)
            return
        if action is not Action.RETRY_DRAIN:
            slot.session.close(logout=False)
        slot.move(SlotState.PARKED if action is Action.PARK else SlotState.BACKOFF)
        self._set_timer(slot, decision.delay_s)
        if action is Action.PARK:
            if slot.folder not in rt.missing_folders:
                rt.missing_folders += (slot.folder,)
            rt.update_parked()
            self._report(rt, "connected", rt.parked_detail)
        elif action is Action.RECONNECT:
            self._report(rt, "error", slot.last_error)
        elif action is Action.THROTTLE:
            self._report(rt, "connected", rt.parked_detail)
        elif action is Action.AUTH_BACKOFF:
            # What the server said (Exchange's "not connected" names its causes) is what
            # the operator needs to fix the login.
            self._report(rt, "error", slot.last_error)
            rt.credentials = None
            rt.force_token_refresh = True  # an OAuth2 token may have expired or been revoked
            if decision.count_auth_failure:
                rt.auth_blocked_until = self.clock() + decision.delay_s
                assert isinstance(err, ImapAuthError)
                self._background(self._record_auth_failure, rt, err)

    def _record_auth_failure(self, rt: ProviderRuntime, err: ImapAuthError) -> None:
        """On a background thread: count the failure; pause the provider at the threshold."""
        cfg, threshold = rt.config, self.settings.auth_failure_pause_threshold
        paused = self.deps.store.record_auth_failure(
            cfg.tenant, cfg.provider_id, err.code, threshold
        )
        # A rejected refresh token has already paused the provider (shardworker.oauth).
        paused = paused or (isinstance(err, TokenRefreshError) and err.code == "invalid_grant")
        self.post(lambda: self._after_auth_record(rt, paused))

    def _after_auth_record(self, rt: ProviderRuntime, paused: bool) -> None:
        # The count means failed logins since the last good one: the runtime's next good
        # login resets it again, not only its first.
        rt.auth_failure_counted = True
        current = self.providers.get(rt.key)
        if current is not None and current is not rt and current.auth_ok_seen:
            # A replaced runtime (old credentials) counted after its successor had logged
            # in with the new ones: that failure says nothing about the provider now.
            cfg = current.config
            self.deps.status.clear_auth_failures(cfg.tenant, cfg.provider_id)
            return
        if paused and current is rt:
            log.warning("provider_paused", provider_id=rt.config.provider_id, reason="auth_failure")
            rt.paused = True
            rt.replacement = None
            self._stop_provider(rt, immediate=False)

    def _on_connected(self, slot: Slot, outcome: Outcome) -> None:
        rt = slot.provider
        self.stats.connects += 1
        slot.backoff.mark_healthy(self.clock())
        rt.auth_backoff.mark_healthy(self.clock())
        if not rt.auth_ok_seen or rt.auth_failure_counted:
            rt.auth_ok_seen, rt.auth_failure_counted = True, False
            cfg = rt.config
            self.deps.status.connected(cfg.tenant, cfg.provider_id, outcome.capabilities)
        log.info("connected", **slot.log_fields(), idle=slot.session.has_idle)
        if slot.resolving:
            self._adopt(slot, outcome)
        elif slot.folder in rt.missing_folders:
            rt.missing_folders = tuple(f for f in rt.missing_folders if f != slot.folder)
            rt.update_parked()

    def _adopt(self, slot: Slot, outcome: Outcome) -> None:
        rt = slot.provider
        slot.resolving = False
        rt.slots.pop("", None)
        rt.slots[slot.folder] = slot
        cap = max(1, self.settings.max_connections_per_account)
        for folder in outcome.other_folders[: cap - 1]:
            if folder not in rt.slots:
                self._dispatch(self._new_slot(rt, folder))
        skipped = outcome.other_folders[cap - 1 :]
        rt.missing_folders = outcome.missing_folders
        for folder in outcome.missing_folders:
            parked = self._new_slot(rt, folder)
            parked.move(SlotState.PARKED)
            self._set_timer(parked, self.settings.folder_reprobe_s)
        rt.over_cap = tuple(skipped)
        rt.update_parked()

    def _account(self, slot: Slot, outcome: Outcome) -> None:
        result = outcome.result
        assert result is not None
        found = result.published or result.duplicates or result.dead_lettered
        slot.empty_cycles = 0 if found else slot.empty_cycles + 1
        st = self.stats
        st.published += result.published
        st.duplicates += result.duplicates
        st.dead_lettered += result.dead_lettered
        st.bytes += result.bytes
        if slot.exists_seen_at is not None:
            st.latencies.extend(t - slot.exists_seen_at for t in result.published_at)
        metrics.record_sync(result, slot.exists_seen_at)

    def _report(self, rt: ProviderRuntime, status: str, error: str | None) -> None:
        if (rt.reported_status, rt.reported_error) == (status, error):
            return
        rt.reported_status, rt.reported_error = status, error
        self.deps.status.status(rt.config.tenant, rt.config.provider_id, status, error)

    def _background(self, fn: Callable[..., Any], *args: Any) -> None:
        def call() -> None:
            try:
                fn(*args)
            except Exception:
                log.error("background_write_failed", exc=True, call=getattr(fn, "__name__", "?"))

        self._executor.submit(call)

    # -- selector and watchdog ---------------------------------------------------------

    def _register(self, slot: Slot) -> None:
        sock = slot.session.sock
        if sock is not None and not slot.registered:
            self.selector.register(sock, selectors.EVENT_READ, slot)
            slot.registered = True

    def _unregister(self, slot: Slot) -> None:
        if slot.registered:
            slot.registered = False
            sock = slot.session.sock
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(sock)

    def _on_readable(self, slot: Slot) -> None:
        if read_idle_wake(slot.session) is Wake.KEEPALIVE:
            # Liveness only: the folder did not change, so no cycle; it stays registered.
            # last_activity stays "the last cycle" (_wake's gap); the IDLE refresh cycles
            # keep it fresh for the watchdog (dead_after_s > idle_refresh_s).
            self.stats.keepalives += 1
            return
        self._unregister(slot)
        self._wake(slot)
        slot.exists_seen_at = slot.last_activity = self.clock()

    def _wake(self, slot: Slot) -> None:
        """Activity on an idle slot: a cycle now, unless wake-ups keep finding nothing."""
        wait = slot.last_activity + EMPTY_WAKE_GAP_S - self.clock()  # since the last cycle
        if slot.empty_cycles >= 2 and wait > 0:
            self._set_timer(slot, wait)
        else:
            self._dispatch(slot)

    def _watchdog(self, now: float) -> None:
        stall = self.settings.net_timeout_s * 4
        for rt in self.providers.values():
            for slot in rt.slots.values():
                if slot.busy and now - slot.job_progress_at > stall:
                    log.warning(
                        "job_stalled",
                        **slot.log_fields(),
                        seconds=round(now - slot.job_progress_at),
                    )
                    slot.session.abort()
                    slot.job_progress_at = now
                elif slot.registered and now - slot.last_activity > self.settings.dead_after_s:
                    log.warning("connection_silent", **slot.log_fields())
                    self._unregister(slot)
                    slot.session.abort()
                    self._dispatch(slot)
