"""Wait for the Redis replicas before a write is taken as durable.

Redis replicates asynchronously: a primary that acknowledged an XADD and then fails over
to a replica that never received it has lost the event, while the ledger (committed right
after the publish) says it was published.  So with replicas, a batch counts as published
only once ``WAIT`` says enough replicas hold it; otherwise the publish raises
PublishError, nothing is checkpointed and the batch is retried (a retry that finds its
dedupe keys is a duplicate of the entries that did survive; one that finds them gone
publishes again what the failover lost).  docs/partitions.md has the argument.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from shardworker.config import Settings
from shardworker.errors import PublishError

# How long a replica count read from INFO is trusted.
REPLICAS_CACHE_S = 1.0


def wanted_replicas(settings: Settings) -> int:
    """SHARDWORKER_REDIS_WAIT_REPLICAS, with -1 meaning one when Sentinel is configured."""
    if settings.redis_wait_replicas >= 0:
        return settings.redis_wait_replicas
    return 1 if settings.redis_sentinels else 0


class ReplicaWait:
    """``ensure()`` after each write: raises PublishError until the replicas have it.

    Only replicas the primary sees connected are waited for: a primary left without any
    (its replica failed, or it is the promoted one) has nobody to fail over to, so waiting
    would only stop ingestion.  A replica whose link went silent still counts as connected
    until the primary's ``repl-timeout``, which is exactly when WAIT must hold the batch.
    """

    def __init__(
        self, client: redis.Redis, settings: Settings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._client = client
        self._wanted = wanted_replicas(settings)
        self._timeout_ms = settings.redis_wait_ms
        self._clock = clock
        self._connected: tuple[float, int] | None = None

    @property
    def enabled(self) -> bool:
        return self._wanted > 0

    def ensure(self, operation: str) -> None:
        if not self._wanted:
            return
        try:
            needed = min(self._wanted, self._connected_replicas())
            if not needed:
                return
            acked = int(self._client.wait(needed, self._timeout_ms))
        except redis.RedisError as exc:
            raise PublishError(f"{operation}: WAIT for replicas failed: {exc}") from exc
        if acked < needed:
            self._connected = None  # ask again next time: the replica may be gone
            raise PublishError(
                f"{operation}: {acked} of {needed} Redis replica(s) acknowledged within "
                f"{self._timeout_ms} ms; not checkpointed, retried"
            )

    def _connected_replicas(self) -> int:
        now = self._clock()
        cached = self._connected
        if cached is not None and now - cached[0] < REPLICAS_CACHE_S:
            return cached[1]
        info = self._client.info("replication")
        count = int(info.get("connected_slaves", 0))
        self._connected = (now, count)
        return count
