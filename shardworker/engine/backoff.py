"""Exponential backoff with full jitter, a cap, and a reset that must be earned.

The attempt counter resets only after the connection has stayed healthy for
``healthy_after_s``: a server that accepts a login and drops us a second later must not
be hammered at the base delay forever.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base_s: float
    max_s: float
    healthy_after_s: float
    rand: Callable[[], float] = field(default=random.random, repr=False)
    attempts: int = 0
    healthy_since: float | None = None

    def mark_healthy(self, now: float) -> None:
        """The connection is up; the backoff resets once it has stayed up long enough."""
        if self.healthy_since is None:
            self.healthy_since = now

    def failure(self, now: float) -> float:
        """Record a failure and return the delay before the next attempt."""
        if self.healthy_since is not None and now - self.healthy_since >= self.healthy_after_s:
            self.attempts = 0
        self.healthy_since = None
        ceiling = min(self.max_s, self.base_s * float(2 ** min(self.attempts, 32)))
        self.attempts += 1
        # Half fixed, half jitter: spreads a herd yet keeps the delay growing.
        return ceiling / 2 + self.rand() * ceiling / 2

    def reset(self) -> None:
        self.attempts = 0
        self.healthy_since = None
