"""The pool leader: one coordinator at a time plans and publishes the assignment.

Every coordinator runs a ``Leader`` thread; the one holding the ``sw:leader`` lease keeps
a *view* (the servable providers and the owners as published) and does, each round, only
the work that something changing calls for:

* provider changes are read incrementally (rows whose ``updated_at`` moved, foreign
  leases that ran out: ``OwnershipStore.changed_since``); every row is read only on
  taking over and at the periodic reconcile (``provider_reconcile_s``), which proves the
  view right;
* the live members are read (heartbeats within the grace period) and joins debounced;
* a plan runs only when providers or members changed (or the last one was rate-limited):
  new and removed providers alone are placed incrementally (``assign.place_new``), a
  member change is an incremental step over the planner state the view keeps
  (``placement.Placement.replan``: consistent hashing with bounded loads, at a cost in
  proportion to what moves); the full plan (``assign.plan_assignment``) runs on the
  first round and at each provider reconcile, after checking the kept state for drift;
* only the difference is published, as a versioned delta (``Registry.publish_delta``),
  and mirrored into Alga's lease columns; the mirror's TTL is refreshed in batches.

A new leader starts from the published owners, so a failover moves nothing that did not
have to move.  A leader whose PostgreSQL has failed its rounds for ``leader_ttl_s`` resigns
(its lease renews through Redis, so it would otherwise stay leader without being able to
read a provider change or move a provider), and stands for election again only once a
query succeeds: a pod cut off from PostgreSQL must not keep the pool from moving its own
members' providers.  After every round while leading, ``housekeeping`` (sink.housekeeping)
trims the streams by consumption and samples what shardworker keeps in Redis.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg
import redis

from shardworker import metrics
from shardworker.config import Settings
from shardworker.db.models import provider_key, split_key
from shardworker.db.ownership import OwnershipStore
from shardworker.errors import LeaseLostError, ShardworkerError
from shardworker.logs import get_logger
from shardworker.pool.assign import Move, load_bounds, place_new, plan_assignment
from shardworker.pool.placement import Placement
from shardworker.pool.registry import Assignment, Delta, Registry
from shardworker.sink.housekeeping import Housekeeper

log = get_logger(__name__)

# Re-read rows changed this long before the last watermark: a transaction that committed
# late carries an ``updated_at`` from before it.  The reconcile catches anything older.
LATE_COMMIT_S = 5.0


@dataclass
class LeaderStats:
    is_leader: bool = False
    transitions: int = 0
    members: int = 0
    providers: int = 0
    unowned: int = 0
    imbalance: float = 1.0
    version: int = 0
    moves: Counter[str] = field(default_factory=Counter)
    last_round_s: float = 0.0
    plans: int = 0
    full_plans: int = 0
    drift: int = 0
    published_ops: int = 0
    reconciles: int = 0


@dataclass
class View:
    """What the leader knows: servable providers, and the owners as published.

    ``placement`` holds the same providers and owners in the planner's terms (ring
    points, ring order, each member's providers); ``full_due`` asks for a full plan."""

    providers: set[str]
    owners: dict[str, str]
    version: int
    epoch: int
    watermark: datetime
    reconciled_at: float
    loads: Counter[str] = field(default_factory=Counter)
    members: tuple[str, ...] = ()
    unsettled: bool = True
    dirty: bool = False  # a publish failed midway: repair before anything else
    placement: Placement | None = None
    full_due: bool = True

    def assign(self, key: str, member: str | None) -> None:
        before = self.owners.pop(key, None)
        if before is not None:
            self.loads[before] -= 1
            if self.loads[before] <= 0:
                del self.loads[before]
        if member is not None:
            self.owners[key] = member
            self.loads[member] += 1


class Leader:
    def __init__(
        self, settings: Settings, registry: Registry, ownership: OwnershipStore, identity: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.registry = registry
        self.ownership = ownership
        self.identity = identity
        self.clock = clock
        self.token: str | None = None
        self.stats = LeaderStats()
        self.view: View | None = None
        self._first_seen: dict[str, float] = {}
        self._led_since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._db_ok_at = clock()  # end of the last round PostgreSQL did not fail
        self.sitting_out = False  # resigned for PostgreSQL; elections resume when it answers
        # Leader-only chores after each round (stream trimming, Redis memory sampling).
        self.housekeeping = Housekeeper(registry.client, settings, clock)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="leader", daemon=True)
        self._thread.start()
        renewer = threading.Thread(target=self._keep_lease, name="leader-lease", daemon=True)
        renewer.start()

    def _keep_lease(self) -> None:
        """Renew the leader lease on its own clock: a long round (a cold start's plan over
        every provider) must not let it lapse and hand the work to a standby that would
        start over.  Publishing still checks the token, so this cannot keep a deposed
        leader writing."""
        every = self.settings.leader_ttl_s / 3
        while not self._stop.wait(every):
            token = self.token
            if token is None:
                continue
            try:
                if self.registry.elect(self.identity, self.settings.leader_ttl_s, token) != token:
                    log.warning("leader_lease_lost", identity=self.identity)
            except redis.RedisError as exc:
                log.warning("leader_lease_renew_failed", error_type=type(exc).__name__)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.token is not None:
            with contextlib.suppress(redis.RedisError):  # else the lease expires by itself
                self.registry.resign(self.token)
            self._step_down("stopped")

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self.clock()
            self.run_round()
            self._stop.wait(max(0.0, self.settings.leader_round_s - (self.clock() - started)))

    def run_round(self) -> None:
        """One round, its failures answered (the thread's body; tests call it directly)."""
        try:
            self.round()
            self._db_ok_at = self.clock()
        except psycopg.OperationalError as exc:  # PoolTimeout included
            log.warning("leader_round_failed", error_type=type(exc).__name__)
            self._database_failed()
        except (redis.RedisError, ShardworkerError) as exc:
            log.warning("leader_round_failed", error_type=type(exc).__name__, error=str(exc))
            if isinstance(exc, redis.RedisError | LeaseLostError):
                self._step_down(type(exc).__name__)
        except Exception:
            log.error("leader_round_crashed", exc=True)

    def _database_failed(self) -> None:
        if self.token is None or self.clock() - self._db_ok_at < self.settings.leader_ttl_s:
            return
        with contextlib.suppress(redis.RedisError):  # else the lease expires by itself
            self.registry.resign(self.token)
        self._step_down("database_unreachable")
        self.sitting_out = True

    def _stand_again(self) -> None:
        """After resigning for PostgreSQL: raises while it is still unreachable."""
        self.ownership.db_now()
        self.sitting_out = False
        log.info("leader_database_reachable", identity=self.identity)

    # -- one round -----------------------------------------------------------------------

    def round(self) -> None:
        if self.sitting_out:
            self._stand_again()
        token = self.registry.elect(self.identity, self.settings.leader_ttl_s, self.token)
        if token is None:
            if self.token is not None:
                self._step_down("lease_taken")
            return
        if token != self.token:
            self.token = token
            self.view = None
            self._led_since = self.clock()
            self._first_seen.clear()
            self.stats.is_leader = True
            self.stats.transitions += 1
            log.info("leader_elected", identity=self.identity, token=token)
        started = self.clock()
        self.rebalance(token)
        self.stats.last_round_s = self.clock() - started
        metrics.observe_rebalance(self.stats.last_round_s)
        try:
            self.housekeeping.run_due()
        except Exception as exc:  # a chore never stops the leader
            log.warning("housekeeping_failed", error_type=type(exc).__name__, error=str(exc))

    def _step_down(self, reason: str) -> None:
        if self.token is not None:
            log.warning("leader_lost", identity=self.identity, reason=reason)
            self.stats.transitions += 1
        self.token = None
        self.view = None
        self.stats.is_leader = False

    def _eligible(self, live: list[str], owning: Collection[str]) -> list[str]:
        """Debounce joins: a member new to this leader waits ``join_debounce_s``.

        Members that already own providers, and every member seen in a new leader's first
        round, count at once, so a failover never orphans anyone.
        """
        now = self.clock()
        fresh_leader = now - self._led_since < self.settings.leader_round_s * 1.5
        for member in live:
            self._first_seen.setdefault(member, now - (1e9 if fresh_leader else 0.0))
        for member in list(self._first_seen):
            if member not in live:
                del self._first_seen[member]
        wait = self.settings.join_debounce_s
        return [m for m in live if m in owning or now - self._first_seen[m] >= wait]

    def rebalance(self, token: str) -> None:
        view = self.view or self._take_over(token)
        self.view = view
        self._check_published(view)
        members = tuple(self._eligible(self.registry.live_members(self.settings.member_grace_s),
                                       view.loads))  # fmt: skip
        added, removed = self._refresh_providers(view)
        if added or removed or len(view.providers) != self.stats.providers:
            log.info("providers_changed", providers=len(view.providers), added=len(added),
                     removed=len(removed), members=len(members))  # fmt: skip
        epoch = int(token.rsplit("|", 1)[1])
        stale = [m for m in self.registry.assigned_members() if m not in members]
        if view.dirty:
            self._repair(token, view, members, stale, epoch)
        elif view.full_due:
            changes = self._replan(view, members)
            self._publish(token, view, changes, members=members, stale=stale, epoch=epoch)
            view.full_due = False
        elif members != view.members or view.unsettled or stale:
            changes = self._step(view, members, removed)
            self._publish(token, view, changes, members=members, stale=stale, epoch=epoch)
        elif added or removed:
            changes = self._place(view, members, added, removed)
            self._publish(token, view, changes, members=members, stale=stale, epoch=epoch)
        self._record(view, members)
        self._refresh_mirror(view)

    # -- the view ------------------------------------------------------------------------

    def _take_over(self, token: str) -> View:
        """Start from the published state: owners as they are, every provider read once."""
        meta = self.registry.read_meta()
        owners = self.registry.read_owners() if meta is not None else {}
        watermark = self.ownership.db_now()
        providers = {provider_key(t, p) for t, p in self.ownership.servable()}
        view = View(providers, {}, meta[0] if meta else 0, int(token.rsplit("|", 1)[1]),
                    watermark, self.clock(), dirty=meta is None)  # fmt: skip
        for key, member in owners.items():
            view.assign(key, member)
        view.placement = Placement(providers, view.owners)
        self.stats.version = view.version
        log.info("leader_view_loaded", providers=len(providers), owners=len(owners),
                 version=view.version)  # fmt: skip
        return view

    def _check_published(self, view: View) -> None:
        """A Redis restart (or a foreign writer) shows as a version we did not write."""
        meta = self.registry.read_meta()
        if meta is None or meta[0] != view.version:
            if not view.dirty:
                log.warning("assignment_state_lost", expected=view.version,
                            found=None if meta is None else meta[0])  # fmt: skip
            view.dirty = True

    def _refresh_providers(self, view: View) -> tuple[set[str], set[str]]:
        """Apply provider changes to the view: incremental, or the periodic full read."""
        if self.clock() - view.reconciled_at >= self.settings.provider_reconcile_s:
            view.watermark = self.ownership.db_now()
            every = {provider_key(t, p) for t, p in self.ownership.servable()}
            added, removed = every - view.providers, view.providers - every
            view.providers = every
            view.reconciled_at = self.clock()
            view.full_due = True
            self.stats.reconciles += 1
            if added or removed:
                log.warning("reconcile_found_drift", added=len(added), removed=len(removed))
            self._track(view, added, removed)
            return added, removed
        since = view.watermark - timedelta(seconds=LATE_COMMIT_S)
        rows, view.watermark = self.ownership.changed_since(since)
        added, removed = set(), set()
        for tenant, pid, servable in rows:
            key = provider_key(tenant, pid)
            if servable and key not in view.providers:
                added.add(key)
            elif not servable and key in view.providers:
                removed.add(key)
        view.providers |= added
        view.providers -= removed
        self._track(view, added, removed)
        return added, removed

    @staticmethod
    def _track(view: View, added: set[str], removed: set[str]) -> None:
        if view.placement is not None:
            view.placement.remove(removed)
            view.placement.add(added)

    # -- planning ------------------------------------------------------------------------

    def _replan(self, view: View, members: tuple[str, ...]) -> dict[str, str | None]:
        """The full planner over every provider (first round, reconcile, repair), once
        the kept planner state is proven against the view; returns the changed keys."""
        placement = self._checked_placement(view)
        plan = plan_assignment(view.providers, members, view.owners, points=placement.point,
                               max_rebalance_moves=self.settings.max_rebalance_moves)  # fmt: skip
        self.stats.full_plans += 1
        changes: dict[str, str | None] = {k: None for k in view.owners if k not in plan.assignment}
        return self._planned(view, members, plan.moves, plan.imbalance, changes)

    def _step(
        self, view: View, members: tuple[str, ...], removed: set[str]
    ) -> dict[str, str | None]:
        """A member change between full plans: only what moves (``Placement.replan``)."""
        assert view.placement is not None  # built on taking over
        changes: dict[str, str | None] = {k: None for k in removed if k in view.owners}
        if not members:
            changes.update(dict.fromkeys(view.owners))
            return self._planned(view, members, (), 1.0, changes)
        step = view.placement.replan(members, max_rebalance_moves=self.settings.max_rebalance_moves)
        return self._planned(view, members, step.moves, step.imbalance, changes)

    def _planned(
        self, view: View, members: tuple[str, ...], moves: tuple[Move, ...], imbalance: float,
        changes: dict[str, str | None],
    ) -> dict[str, str | None]:  # fmt: skip
        self.stats.plans += 1
        for move in moves:
            self.stats.moves[move.reason] += 1
        rebalanced = sum(1 for m in moves if m.reason == "rebalance")
        view.unsettled = rebalanced >= self.settings.max_rebalance_moves > 0
        view.members = members
        self.stats.imbalance = imbalance
        changes.update({m.provider: m.dst for m in moves})
        return changes

    def _checked_placement(self, view: View) -> Placement:
        """The kept planner state, rebuilt if it disagrees with the view in anything."""
        placement = view.placement
        if placement is not None:
            drift = placement.drift(view.providers, view.owners)
            if not drift:
                return placement
            log.warning("placement_drift", providers=drift)
            self.stats.drift += drift
        view.placement = Placement(view.providers, view.owners)
        return view.placement

    def _place(
        self, view: View, members: tuple[str, ...], added: set[str], removed: set[str]
    ) -> dict[str, str | None]:
        """Only providers came or went: place the new ones, each on the first member
        clockwise from it below the cap; nothing else moves."""
        changes: dict[str, str | None] = {k: None for k in removed if k in view.owners}
        if not members:
            return changes
        cap = load_bounds(len(view.providers), len(members), 0.1)[1]
        loads = {m: view.loads.get(m, 0) for m in members}
        todo = [k for k in added if view.owners.get(k) not in loads]
        placed = place_new(todo, members, loads, cap)
        changes.update(placed)
        self.stats.moves["new"] += len(placed)
        return changes

    # -- publishing ----------------------------------------------------------------------

    def _publish(
        self, token: str, view: View, changes: dict[str, str | None], *,
        members: tuple[str, ...], stale: list[str], epoch: int,
    ) -> None:  # fmt: skip
        changes = {k: m for k, m in changes.items() if view.owners.get(k) != m}
        if not changes and not stale and members == view.members and not view.unsettled:
            return
        new = [m for m in members if m not in view.loads]
        previous = {k: view.owners[k] for k in changes if k in view.owners}
        version = view.version + 1
        view.dirty = True  # until every chunk landed
        ops = self.registry.publish_delta(
            token, Delta(version, epoch, changes, previous, touch=new, drop=stale)
        )
        for key, member in changes.items():
            view.assign(key, member)
        if view.placement is not None:
            view.placement.apply(changes)
        view.version, view.epoch, view.dirty = version, epoch, False
        view.members = members
        self.stats.version = version
        self.stats.published_ops += ops
        if changes:
            log.info("assignment_published", version=version, moves=len(changes),
                     members=len(members), providers=len(view.providers))  # fmt: skip
        self._mirror(previous, changes)

    def _repair(
        self, token: str, view: View, members: tuple[str, ...], stale: list[str], epoch: int
    ) -> None:
        """Make Redis hold the view again (after a failed publish or a Redis restart)."""
        changes = self._replan(view, members)
        for key, member in changes.items():
            view.assign(key, member)
        version = view.version + 1
        self.registry.publish(token, Assignment(version, epoch, dict(view.owners)), members,
                              stale)  # fmt: skip
        view.version, view.epoch, view.dirty = version, epoch, False
        view.full_due = False  # that was one
        if view.placement is not None:
            view.placement.reset(view.owners)
        self.stats.version = version
        log.warning("assignment_repaired", version=version, owners=len(view.owners))
        rows = [(*split_key(k), m) for k, m in view.owners.items()]
        self.ownership.mirror_leases(rows, self.settings.alga_lease_ttl_s)

    def _record(self, view: View, members: tuple[str, ...]) -> None:
        self.stats.members = len(members)
        self.stats.providers = len(view.providers)
        self.stats.unowned = len(view.providers) - len(view.owners)

    # -- Alga's lease columns ------------------------------------------------------------

    def _mirror(self, previous: dict[str, str], changes: dict[str, str | None]) -> None:
        """Write exactly what changed into Alga's lease columns."""
        gone = [split_key(k) for k, m in changes.items() if m is None and k in previous]
        rows = [(*split_key(k), m) for k, m in changes.items() if m is not None]
        self.ownership.mirror_leases(rows, self.settings.alga_lease_ttl_s)
        self.ownership.clear_pairs(gone)

    def _refresh_mirror(self, view: View) -> None:
        """Each round, push out the expiry of the oldest mirrored leases: every row is
        refreshed once per half TTL, spread evenly over the rounds."""
        ttl = self.settings.alga_lease_ttl_s
        rounds = max(1.0, (ttl / 2) / self.settings.leader_round_s)
        batch = 2 * math.ceil(len(view.owners) / rounds) + 100
        self.ownership.refresh_leases(ttl, batch)
