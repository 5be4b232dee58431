"""A worker's membership in the pool: heartbeats, leases, and what its engine serves.

Three threads, none of which ever touches IMAP:

* the *keeper* renews every held lease in one Lua call each ``lease_renew_s``, and does
  nothing else (a renewal never waits behind another call); a lease that is lost (or may
  have expired while Redis was unreachable) stops its provider in the engine at once;
* the *heartbeat* checks PostgreSQL (see below) and heartbeats each ``lease_renew_s``;
* the *assigner* reads this member's share version (one small read) and the share only
  when it moved; it loads the configs of providers new to it by key, picks up config
  changes of its providers by ``updated_at`` (never re-reading every row), acquires the
  leases it lacks, hands the engine exactly the providers it holds leases for, and
  releases a lease only after the engine has drained that provider (finished in-flight
  work, checkpointed, logged out), so the next owner never overlaps with us.

Between rounds the assigner makes one blocking read (:meth:`CommandInbox.wait`) on its
command stream and its assignment note stream together.  While a handoff is in flight
(a lease to take that another member still holds, a drained provider to release, a
drain) it comes back every ``assignment_poll_s``; once settled it waits for the leader's
note that its share changed, an admin command, or at most ``assignment_check_s`` (and the
next config refresh): a missed note delays a change by at most that.

The held-lease map belongs to the :class:`~shardworker.pool.leases.LeaseManager`, which
takes its own lock for every access; the agent only asks it.  Every thread here ends the
process if it dies unexpectedly (``childproc.end_process_on_thread_death``).

On drain the member leaves the registry first (the leader moves its providers at once),
stops serving, and keeps renewing until every lease is released.

A member whose PostgreSQL is unreachable (``pool/dbwatch.py``) cannot checkpoint, while its
renewals (Redis) keep everyone else away from its providers.  Each heartbeat also stamps
when the member's probe last succeeded (``sw:members:db``, Redis's clock), and once its
PostgreSQL has been unreachable for a lease TTL, if another member's stamp is fresh (a
healthy member's is at most two renewal rounds old, one cut off as long as we are at least
a TTL less a round: the midpoint separates them), it *gives up*: it leaves
the registry (the leader moves its providers at once), releases every lease, and only then
drops its providers in the engine.  Releasing before the drain is safe because of the
fence: a publish of ours that comes later finds no token of ours and is refused, and a
late checkpoint is refused by the epoch the successor bumps (or lands before the bump,
and the successor starts from it); waiting for the drain would make the handover wait
for the very PostgreSQL calls it escapes.  While given up the member takes no lease and
does not heartbeat, so it is not assigned providers again; it rejoins when a probe
succeeds.  When no other member's PostgreSQL answered lately (it is down for everyone),
nobody could do better, and it keeps its providers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

import redis

from shardworker import metrics
from shardworker.config import Settings
from shardworker.db.models import split_key
from shardworker.db.store import ProviderConfig, Store
from shardworker.engine.loop import Engine
from shardworker.errors import ShardworkerError
from shardworker.logs import get_logger
from shardworker.pool.dbwatch import DatabaseWatch
from shardworker.pool.inbox import CommandInbox
from shardworker.pool.leases import Lease, LeaseManager
from shardworker.pool.registry import MemberAssignment, Registry, note_stream

log = get_logger(__name__)

ACQUIRE_BATCH = 500
# Config rows changed this long before the last read are read again (late commits).
LATE_COMMIT_S = 5.0


class PoolAgent:
    def __init__(
        self, settings: Settings, member: str, *, registry: Registry, leases: LeaseManager,
        store: Store, engine: Engine, released: queue.SimpleQueue[str],
        database: DatabaseWatch | None = None,
        wait_client: redis.Redis | None = None,
    ) -> None:  # fmt: skip
        """``wait_client`` serves only the blocking read between rounds (its socket timeout
        must exceed ``assignment_check_s``), and :meth:`stop` closes it; without it the
        registry's client does."""
        self.settings = settings
        self.member = member
        self.registry = registry
        self.leases = leases
        self.store = store
        self.engine = engine
        # ``tenant:provider_id`` keys the engine has drained (Engine(on_released=...put)).
        self.released = released
        self.draining = threading.Event()
        # PostgreSQL reachability; None: never give up (a member without a probe).
        self.database = database
        self.given_up = threading.Event()  # set while PostgreSQL is unreachable for us
        self._serve_lock = threading.Lock()  # given_up vs. what the engine is told to serve
        self._stop = threading.Event()
        self._heartbeat_lock = threading.Lock()
        self._configs: dict[str, ProviderConfig] = {}
        self._configs_for: frozenset[str] = frozenset()
        self._configs_at = float("-inf")
        self._configs_since: datetime | None = None  # database time of the last read
        self._share: MemberAssignment | None = None
        self._settled = False  # every config served under its lease, no lease left over
        self._threads: list[threading.Thread] = []
        self.on_lease_lost: Callable[[Lease], None] | None = None
        # Admin commands addressed to this member, served between assignment reads.
        self.commands = CommandInbox(registry.client, store, engine, member, owner=self,
                                     reader=wait_client)  # fmt: skip
        self._notes = note_stream(member)
        self._wait_client = wait_client

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.registry.heartbeat(self.member, self._database_ok_age())
        if self.database is not None:
            self.database.start()
        threads = (("keeper", self._keep), ("heartbeat", self._beat), ("assigner", self._assign))
        for name, target in threads:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def begin_drain(self) -> None:
        if self.draining.is_set():
            return
        log.info("member_leaving", member=self.member, leases=self.leases.count())
        try:
            # Under the heartbeat lock: a heartbeat already in flight would otherwise land
            # after the goodbye and keep us "live" for a whole grace period.
            with self._heartbeat_lock:
                self.draining.set()
                self.registry.leave(self.member)
        except Exception:
            log.warning("member_leave_failed", member=self.member)
        self.engine.request_stop()
        self._wake("drain")  # drained providers' leases are released every poll from now

    def stop(self, timeout_s: float = 5.0) -> None:
        """After the engine stopped: end both threads, then release what is left.

        In that order: an assign round still under way could otherwise acquire leases
        after the release, which nobody would give back before their TTL ran out."""
        self._stop.set()
        self._wake("stop")
        for thread in self._threads:
            thread.join(timeout_s)
        self._release_drained()
        try:
            self.leases.release_all()
        except ShardworkerError as exc:
            log.warning("lease_release_failed", error=str(exc))
        if self.database is not None:
            self.database.stop()
        if self._wait_client is not None:
            self._wait_client.close()

    def _wake(self, reason: str) -> None:
        """End the assigner's blocking wait now; if Redis cannot be told, it ends by itself
        within ``assignment_check_s``."""
        try:
            self.registry.wake(self.member, reason)
        except Exception as exc:
            log.warning("wake_failed", member=self.member, error_type=type(exc).__name__)

    # -- keeper --------------------------------------------------------------------------

    def _keep(self) -> None:
        """Renewals only: nothing that can block (a heartbeat stuck in a slow Redis, a
        give-up's releases) runs between two of them."""
        while not self._stop.wait(self.settings.lease_renew_s):
            lost = self.leases.renew()
            metrics.lease_renewal(self.leases.count(), len(lost))
            for lease in lost:
                log.warning("lease_lost", provider_id=lease.provider_id, tenant=lease.tenant,
                            member=self.member, epoch=lease.epoch)  # fmt: skip
                self.engine.drop_provider_now(lease.provider)
                if self.on_lease_lost is not None:
                    self.on_lease_lost(lease)
            if lost:
                self._wake("lease_lost")  # take it back at once if it is still ours

    def _beat(self) -> None:
        """Liveness on its own thread: the PostgreSQL check, then the heartbeat."""
        while not self._stop.wait(self.settings.lease_renew_s):
            self.check_database()
            try:
                with self._heartbeat_lock:
                    if not self.draining.is_set() and not self.given_up.is_set():
                        self.registry.heartbeat(self.member, self._database_ok_age())
            except Exception:
                log.warning("heartbeat_failed", member=self.member)

    # -- PostgreSQL unreachable ----------------------------------------------------------

    def _database_ok_age(self) -> float | None:
        return None if self.database is None else self.database.ok_age()

    def check_database(self) -> None:
        """Give the providers up, or take part again, as the probe says (see module doc)."""
        if self.database is None:
            return
        if self.given_up.is_set():
            if self.database.healthy():
                self.given_up.clear()
                log.info("member_rejoining", member=self.member)
            return
        down_s = self.database.down_for()
        if down_s < self.settings.lease_ttl_s or self.draining.is_set():
            return
        if not self._peers_with_database():
            return
        self.give_up(down_s)

    def _peers_with_database(self) -> list[str]:
        """Other members whose PostgreSQL answered lately, so they can checkpoint."""
        within_s = (self.settings.lease_ttl_s + self.settings.lease_renew_s) / 2
        try:
            recent = self.registry.members_with_database(within_s)
        except Exception:
            return []  # Redis cannot tell: a successor could not take the leases either
        return [m for m in recent if m != self.member]

    def give_up(self, down_s: float) -> None:
        """Leave, release every lease, then drop the providers (in that order)."""
        with self._serve_lock:
            self.given_up.set()
            held = list(self.leases.held())
        log.warning("database_unreachable_giving_up", member=self.member, leases=len(held),
                    down_s=round(down_s, 1))  # fmt: skip
        try:
            with self._heartbeat_lock:
                self.registry.leave(self.member)
        except Exception:
            log.warning("member_leave_failed", member=self.member)
        self._release_now(held)
        for provider in held:
            self.engine.drop_provider_now(provider, reason="database_unreachable")

    def _release_now(self, providers: list[str]) -> None:
        try:
            count = self.leases.release(providers)
        except ShardworkerError as exc:  # the TTL frees them; successors wait longer
            log.warning("lease_release_failed", error=str(exc))
            return
        metrics.leases_released(count)
        if count:
            log.info("leases_released", count=count, member=self.member)

    # -- assigner ------------------------------------------------------------------------

    def _assign(self) -> None:
        while not self._stop.is_set():
            try:
                self.assign_once()
            except Exception as exc:
                log.warning("assign_failed", member=self.member, error_type=type(exc).__name__,
                            error=str(exc))  # fmt: skip
            self._wait_for_wake(self._pause_s())

    def _pause_s(self) -> float:
        """Short while a handoff is in flight; settled, until the safety-net read or the
        next config refresh, whichever comes first."""
        poll = self.settings.assignment_poll_s
        if self.draining.is_set() or not self._settled:
            return poll
        refresh_in = self._configs_at + self.settings.provider_refresh_s - self.leases.clock()
        return max(poll, min(self.settings.assignment_check_s, refresh_in))

    def _wait_for_wake(self, timeout_s: float) -> None:
        """The pause between rounds: one blocking read of commands and share notes."""
        try:
            self.commands.wait(timeout_s, self._notes)
        except Exception as exc:
            log.warning("commands_failed", member=self.member, error_type=type(exc).__name__,
                        error=str(exc))  # fmt: skip
            self._stop.wait(timeout_s)

    # -- what the command inbox asks -----------------------------------------------------

    def holds(self, provider: str) -> bool:
        """Whether this member holds the lease of ``provider`` (``tenant:provider_id``)."""
        return self.leases.holds(provider)

    def invalidate_configs(self) -> None:
        """Forget the cached configs: the next assign reads the whole share's rows again."""
        self._configs_for = frozenset()
        self._configs_at = float("-inf")

    def assign_once(self) -> None:
        self._settled = False
        self._release_drained()
        if self.draining.is_set():
            return
        if self.given_up.is_set():
            self._release_now(list(self.leases.held()))  # taken by a round already under way
            return
        desired = self._read_share()
        configs = self._load_configs(desired)
        if self.draining.is_set():
            return  # began while this round read: take nothing (stop releases what is held)
        held = self.leases.held()
        wanted = [(c.tenant, c.provider_id) for p, c in configs.items() if p not in held]
        for start in range(0, len(wanted), ACQUIRE_BATCH):
            got = self.leases.acquire(wanted[start : start + ACQUIRE_BATCH])
            metrics.leases_acquired(len(got))
            for lease in got:
                log.info("lease_acquired", provider_id=lease.provider_id, tenant=lease.tenant,
                         epoch=lease.epoch)  # fmt: skip
        held_now = self.leases.held()
        metrics.set_leases_held(len(held_now))
        serve = [c for p, c in configs.items() if p in held_now]
        fences = {p: lease.fence for p, lease in held_now.items()}
        with self._serve_lock:
            if not self.given_up.is_set():
                self.engine.update_providers(serve, fences)
                self._settled = len(serve) == len(configs) == len(held_now)
                return
        self._release_now(list(self.leases.held()))

    def _read_share(self) -> frozenset[str]:
        """This member's share: one version read, the share itself only when it moved."""
        version = self.registry.member_version(self.member)
        if version is None:
            self._share = None
        elif self._share is None or self._share.version != version:
            self._share = self.registry.member_assignment(self.member)
        return self._share.providers if self._share is not None else frozenset()

    def _load_configs(self, desired: frozenset[str]) -> dict[str, ProviderConfig]:
        """Configs of the desired providers, unpaused: new ones read by key, changes of
        the others picked up every ``provider_refresh_s`` by ``updated_at``."""
        now = self.leases.clock()
        if not self._configs_for or self._configs_since is None:
            self._configs = {}
            new = desired
        else:
            new = desired - self._configs_for
        configs = {k: c for k, c in self._configs.items() if k in desired}
        if new:
            since = self._configs_since or self.store.db_now()
            for config in self.store.load_providers_for([split_key(k) for k in sorted(new)]):
                configs[config.key] = config
            self._configs_since = since
        if now - self._configs_at >= self.settings.provider_refresh_s and self._configs_since:
            changed, db_now = self.store.providers_changed_since(
                self._configs_since - timedelta(seconds=LATE_COMMIT_S)
            )
            configs.update({c.key: c for c in changed if c.key in desired})
            self._configs_since, self._configs_at = db_now, now
        self._configs = configs
        self._configs_for = desired
        return {k: c for k, c in configs.items() if not c.paused}

    def _release_drained(self) -> None:
        done: list[str] = []
        while True:
            try:
                done.append(self.released.get_nowait())
            except queue.Empty:
                break
        if not done:
            return
        count = self.leases.release(done)
        metrics.leases_released(count)
        if count:
            log.info("leases_released", count=count, member=self.member)
