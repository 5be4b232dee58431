"""Mail delivery at a steady rate, straight to Dovecot (never through the fault proxy).

Each message carries a unique Message-ID; its delivery time is taken when APPEND returns
OK (wall clock in ms, the same clock as the stream ids Redis assigns).  An APPEND that
fails is retried; if the failed attempt did store the message, the mailbox holds it
twice under one Message-ID, which the service must publish once — the accounting is by
Message-ID, so that case is counted, never hidden (``ambiguous``).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from tests.harness.dovecot import Dovecot
from tests.support import make_mail

RETRY_S = 0.5


@dataclass
class Delivery:
    sent_ms: dict[str, int] = field(default_factory=dict)  # Message-ID (no <>) → APPEND OK
    to_user: dict[str, str] = field(default_factory=dict)  # Message-ID → mailbox user
    started_ms: int = 0
    ambiguous: int = 0  # APPENDs that failed and were retried
    failed: list[str] = field(default_factory=list)


class Deliverer:
    """Delivers ``per_mailbox`` messages to each user, shuffled, at ``rate_per_s``."""

    def __init__(
        self, dovecot: Dovecot, users: list[str], per_mailbox: int, *, rate_per_s: float,
        rng: random.Random, tag: str,
    ) -> None:  # fmt: skip
        self.dovecot = dovecot
        self.plan = [u for u in users for _ in range(per_mailbox)]
        rng.shuffle(self.plan)
        self.interval_s = 1.0 / rate_per_s
        self.tag = tag
        self.result = Delivery()
        # Held by a fault that takes Dovecot down, so no APPEND is in flight across it.
        self.pause = threading.Lock()
        self._stop = threading.Event()
        self._started = False
        self._thread = threading.Thread(target=self._run, name="deliverer", daemon=True)

    @property
    def total(self) -> int:
        return len(self.plan)

    @property
    def finished(self) -> bool:
        return self._started and not self._thread.is_alive()

    @property
    def delivered(self) -> int:
        return len(self.result.sent_ms)

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        started = time.monotonic()
        self.result.started_ms = int(time.time() * 1000)
        for i, user in enumerate(self.plan):
            due = started + i * self.interval_s
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            mid = f"chaos-{self.tag}-{i}@example.com"
            raw = make_mail(message_id=f"<{mid}>", subject=f"chaos {i}",
                            text=f"message {i} to {user}\n")  # fmt: skip
            self._append(user, mid, raw)

    def _append(self, user: str, mid: str, raw: bytes) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set():
            with self.pause:
                try:
                    self.dovecot.append(user, "INBOX", raw)
                except Exception:
                    self.result.ambiguous += 1
                else:
                    self.result.sent_ms[mid] = int(time.time() * 1000)
                    self.result.to_user[mid] = user
                    return
            if time.monotonic() > deadline:
                self.result.failed.append(mid)
                return
            time.sleep(RETRY_S)
