"""The console's overview figures, read from Redis and PostgreSQL on request.

Pods and members come from the registry (heartbeats), the leader from its key, ownership
from the leader's assignment.  The ingest rate is the workflow stream's ``entries-added``
between two reads of this object (the live page polls every few seconds), so it needs no
state in the workers.  Every read has the clients' own timeouts; a failing dependency
shows as an error in the figures, never as a failed page.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import redis

from shardworker.admin import queries
from shardworker.config import Settings
from shardworker.db.store import Pool
from shardworker.logs import get_logger
from shardworker.pool.registry import Registry
from shardworker.sink.redis_streams import WORKFLOW_STREAM, RedisStreamsSink

log = get_logger(__name__)


class Overview:
    def __init__(self, settings: Settings, pool: Pool, client: redis.Redis) -> None:
        self.settings = settings
        self.pool = pool
        self.client = client
        self.registry = Registry(client)
        self.publisher = RedisStreamsSink(client, settings)
        self._last_added: tuple[float, int] | None = None
        self._rate = 0.0
        self._lock = threading.Lock()

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"errors": []}
        try:
            out.update(self._pool_figures())
        except redis.RedisError as exc:
            out["errors"].append(f"redis: {type(exc).__name__}")
        try:
            counts = queries.provider_counts(self.pool)
            out["providers"] = counts
            out["unowned"] = max(0, counts["eligible"] - int(out.get("owned", 0)))
        except Exception as exc:
            log.warning("overview_db_failed", error_type=type(exc).__name__)
            out["errors"].append(f"database: {type(exc).__name__}")
        return out

    def _pool_figures(self) -> dict[str, Any]:
        live = sorted(self.registry.live_members(self.settings.member_grace_s))
        meta = self.registry.read_meta()
        per_member = Counter(self.registry.share_sizes())
        shares = [per_member.get(m, 0) for m in live]
        pods: dict[str, list[dict[str, Any]]] = {}
        for member in sorted(set(live) | set(per_member)):
            pod = member.rsplit("/", 1)[0]
            pods.setdefault(pod, []).append(
                {"member": member, "owned": per_member.get(member, 0), "live": member in live}
            )
        backlog = self.publisher.backlog()
        leader, _, term = (self.registry.current_leader() or "").partition("|")
        return {
            "leader": leader or None,
            "leader_term": term or None,
            "pods": [{"pod": p, "members": ms} for p, ms in sorted(pods.items())],
            "members": len(live),
            "owned": sum(per_member.values()),
            "imbalance": (max(shares) - min(shares)) if shares else 0,
            "lag": backlog,
            "backpressure": backlog > self.settings.backpressure_max_lag,
            "dead_letters": int(self.client.xlen(self.settings.dlq_stream)),
            "ingest_per_s": self._ingest_rate(),
            "assignment_version": None if meta is None else meta[0],
        }

    def _ingest_rate(self) -> float:
        try:
            added = int(self.client.xinfo_stream(WORKFLOW_STREAM)["entries-added"])
        except redis.ResponseError:
            added = 0  # no stream yet
        now = time.monotonic()
        with self._lock:
            last, self._last_added = self._last_added, (now, added)
            if last is not None and now - last[0] >= 0.5:
                self._rate = max(0.0, (added - last[1]) / (now - last[0]))
            return round(self._rate, 2)
