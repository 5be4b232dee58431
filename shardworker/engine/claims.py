"""Message-IDs being published right now, per provider, in this process.

The ledger in PostgreSQL is the durable dedupe: a sync thread asks it which Message-IDs
the provider already published, then publishes the rest, commits them to the ledger, and
lets the sink drop its own dedupe state (docs/DESIGN.md, "Lean dedupe state").  Two
folders of one provider run on two sync threads of the same worker, so the same message
filed in both could pass both threads' ledger checks before either commits.  A thread
therefore claims its batch's Message-IDs *before* it asks the ledger and holds them until
its commit is done: the second thread waits, then asks the ledger, and finds the first
thread's row.  A batch claims all its Message-IDs at once or waits holding none, so two
threads never deadlock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from shardworker.errors import PublishError

CLAIM_WAIT_S = 120.0  # longer than one batch's publish + commit, bounded all the same

_Key = tuple[str, str, str]


class MessageIdClaims:
    """Shared by every sync thread of a worker process."""

    def __init__(self, wait_s: float = CLAIM_WAIT_S) -> None:
        self._wait_s = wait_s
        self._held: set[_Key] = set()
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, tenant: str, provider_id: str, message_ids: Iterable[str]) -> Iterator[None]:
        """Claim every non-empty Message-ID of a batch for its check, publish and commit.

        Raises PublishError (nothing published yet, the batch is retried) when another
        thread holds one of them for longer than the wait allows.
        """
        keys = {(tenant, provider_id, mid) for mid in message_ids if mid}
        deadline = time.monotonic() + self._wait_s
        with self._changed:
            while not self._held.isdisjoint(keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PublishError(
                        f"Message-IDs of provider {provider_id} stayed claimed by another "
                        f"folder for {self._wait_s:.0f} s"
                    )
                self._changed.wait(left)
            self._held |= keys
        try:
            yield
        finally:
            with self._changed:
                self._held -= keys
                self._changed.notify_all()

    def held(self) -> int:
        with self._changed:
            return len(self._held)
