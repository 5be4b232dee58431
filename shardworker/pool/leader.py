"""The pool leader: one coordinator at a time plans and publishes the assignment.

Every coordinator runs a ``Leader`` thread; the one holding the ``sw:leader`` lease does
the housekeeping each round:

* reads the servable providers (active, unpaused, not leased by Alga's own listener) —
  changes in the database are picked up within a round;
* reads the live members (heartbeats within the grace period; a member that comes back
  within it keeps its providers) and debounces new ones;
* plans with rendezvous hashing and bounded loads (``assign.plan_assignment``), rate-limited;
* publishes the versioned assignment, tagged with its epoch, through a script that checks
  the leader lease first;
* mirrors ownership into Alga's ``lease_owner``/``lease_expires_at`` columns and cleans
  up the assignment keys of departed members.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from shardworker import metrics
from shardworker.config import Settings
from shardworker.db.models import provider_key, split_key
from shardworker.db.ownership import OwnershipStore
from shardworker.errors import LeaseLostError, ShardworkerError
from shardworker.logs import get_logger
from shardworker.pool.assign import plan_assignment
from shardworker.pool.registry import Assignment, Registry

log = get_logger(__name__)


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
        self._first_seen: dict[str, float] = {}
        self._led_since = 0.0
        self._last_mirror = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="leader", daemon=True)
        self._thread.start()

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
            try:
                self.round()
            except (redis.RedisError, ShardworkerError) as exc:
                log.warning("leader_round_failed", error_type=type(exc).__name__, error=str(exc))
                if isinstance(exc, redis.RedisError | LeaseLostError):
                    self._step_down(type(exc).__name__)
            except Exception:
                log.error("leader_round_crashed", exc=True)
            self._stop.wait(max(0.0, self.settings.leader_round_s - (self.clock() - started)))

    # -- one round -----------------------------------------------------------------------

    def round(self) -> None:
        token = self.registry.elect(self.identity, self.settings.leader_ttl_s, self.token)
        if token is None:
            if self.token is not None:
                self._step_down("lease_taken")
            return
        if token != self.token:
            self.token = token
            self._led_since = self.clock()
            self._first_seen.clear()
            self.stats.is_leader = True
            self.stats.transitions += 1
            log.info("leader_elected", identity=self.identity, token=token)
        started = self.clock()
        self.rebalance(token)
        self.stats.last_round_s = self.clock() - started
        metrics.observe_rebalance(self.stats.last_round_s)

    def _step_down(self, reason: str) -> None:
        if self.token is not None:
            log.warning("leader_lost", identity=self.identity, reason=reason)
            self.stats.transitions += 1
        self.token = None
        self.stats.is_leader = False

    def _eligible(self, live: list[str], current: dict[str, str]) -> list[str]:
        """Debounce joins: a member new to this leader waits ``join_debounce_s``.

        Members that already own providers, and every member seen in a new leader's first
        round, count at once, so a failover never orphans anyone.
        """
        now = self.clock()
        owning = set(current.values())
        fresh_leader = now - self._led_since < self.settings.leader_round_s * 1.5
        for member in live:
            self._first_seen.setdefault(member, now - (1e9 if fresh_leader else 0.0))
        for member in list(self._first_seen):
            if member not in live:
                del self._first_seen[member]
        wait = self.settings.join_debounce_s
        return [m for m in live if m in owning or now - self._first_seen[m] >= wait]

    def rebalance(self, token: str) -> None:
        previous = self.registry.read_assignment()
        current = dict(previous.owners) if previous else {}
        live = self.registry.live_members(self.settings.member_grace_s)
        members = self._eligible(live, current)
        servable = self.ownership.servable()
        if len(servable) != self.stats.providers or len(members) != self.stats.members:
            log.info("providers_loaded", providers=len(servable), members=len(members))
        # Provider ids are unique only within a tenant: plan over ``tenant:provider_id``.
        plan = plan_assignment(
            [provider_key(t, p) for t, p in servable], members, current,
            max_rebalance_moves=self.settings.max_rebalance_moves,
        )  # fmt: skip
        self._record(plan.moves, plan.imbalance, len(members), len(servable))
        stale = [m for m in self.registry.assigned_members() if m not in members]
        if plan.assignment != current or stale or previous is None:
            version = (previous.version if previous else 0) + 1
            epoch = int(token.rsplit("|", 1)[1])
            self.registry.publish(
                token, Assignment(version, epoch, plan.assignment), members, stale
            )
            self.stats.version = version
            if plan.moves:
                log.info("assignment_published", version=version, moves=len(plan.moves),
                         members=len(members), providers=len(servable),
                         imbalance=round(plan.imbalance, 3))  # fmt: skip
            self._mirror(plan.assignment, force=True)
        else:
            self._mirror(plan.assignment, force=False)

    def _record(
        self, moves: tuple[object, ...], imbalance: float, members: int, providers: int
    ) -> None:
        for move in moves:
            self.stats.moves[str(getattr(move, "reason", "?"))] += 1
        self.stats.imbalance = imbalance
        self.stats.members = members
        self.stats.providers = providers
        self.stats.unowned = providers if members == 0 else 0

    def _mirror(self, owners: dict[str, str], *, force: bool) -> None:
        """Keep Alga's lease columns saying who serves each provider (and for how long)."""
        now = self.clock()
        if not force and now - self._last_mirror < self.settings.alga_lease_ttl_s / 4:
            return
        self._last_mirror = now
        rows = [(*split_key(key), m) for key, m in owners.items()]
        self.ownership.mirror_leases(rows, self.settings.alga_lease_ttl_s)
        self.ownership.clear_leases([(t, p) for t, p, _ in rows])
