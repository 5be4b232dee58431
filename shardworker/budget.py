"""Gmail's daily download budget, shared by every process that reads one account.

Gmail stops serving an account over IMAP for the rest of the day once it has downloaded
about 2,500 MB (Workspace; 500 MB for consumer accounts is commonly reported): a backfill of
a large mailbox would otherwise cut off the live mail of the same account.  A backfill
asks :meth:`DailyByteBudget.try_spend` before each fetch and stops (to resume after the
reset) when it says no; live fetches only :meth:`record` what they downloaded, so they
always run but are counted.  The backfill may use the limit minus ``reserve_bytes``, which
stays for live mail.

State: one Redis counter per account and UTC day,
``sw:gmail-bytes:{<sha1(account)>}:<YYYY-MM-DD>``, expiring two days later.  The account
is the login name: Google counts per account, so two providers (of any tenants) on the
same account share one budget, as they share Google's limit.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from redis.exceptions import RedisError

from shardworker.errors import PublishError

MIB = 1024 * 1024
DEFAULT_DAILY_BYTES = 2500 * MIB
KEY_TTL_MS = 2 * 86400 * 1000

# KEYS[1] the day's counter.  ARGV[1] bytes wanted, ARGV[2] the backfill cap, ARGV[3] TTL ms.
# Returns {granted (0/1), bytes used after}.  The first fetch of a day is always granted,
# so a cap smaller than one message still makes progress.
SPEND = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local want, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
if used > 0 and used + want > cap then
  return {0, used}
end
used = redis.call('INCRBY', KEYS[1], want)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, used}
"""


@dataclass(frozen=True)
class BudgetProgress:
    """Where an account stands today; ``as_dict`` for logs and the admin API."""

    used_bytes: int
    limit_bytes: int
    backfill_limit_bytes: int
    resets_at: datetime

    @property
    def backfill_remaining_bytes(self) -> int:
        return max(0, self.backfill_limit_bytes - self.used_bytes)

    @property
    def exhausted(self) -> bool:
        return self.backfill_remaining_bytes == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "used_bytes": self.used_bytes,
            "limit_bytes": self.limit_bytes,
            "backfill_limit_bytes": self.backfill_limit_bytes,
            "backfill_remaining_bytes": self.backfill_remaining_bytes,
            "used_percent": round(100 * self.used_bytes / self.limit_bytes, 1)
            if self.limit_bytes
            else 0.0,
            "resets_at": self.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def budget_key(account: str, day: str) -> str:
    digest = hashlib.sha1(account.strip().lower().encode()).hexdigest()
    return f"sw:gmail-bytes:{{{digest}}}:{day}"


class DailyByteBudget:
    """One account's bytes today.  ``limit_bytes`` 0 disables the budget (always granted)."""

    def __init__(
        self, client: redis.Redis, account: str, *, limit_bytes: int = DEFAULT_DAILY_BYTES,
        reserve_bytes: int = 0, clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.client = client
        self.account = account
        self.limit_bytes = limit_bytes
        self.backfill_limit_bytes = max(0, limit_bytes - reserve_bytes)
        self.clock = clock
        self._spend = client.register_script(SPEND)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _key(self) -> str:
        return budget_key(self.account, self._now().strftime("%Y-%m-%d"))

    def resets_at(self) -> datetime:
        today = self._now().replace(hour=0, minute=0, second=0, microsecond=0)
        return today + timedelta(days=1)

    def try_spend(self, nbytes: int) -> bool:
        """For a backfill: count ``nbytes`` and say yes, or say no and count nothing."""
        if self.limit_bytes <= 0:
            return True
        with _redis_errors("budget spend"):
            granted, _used = self._spend(
                keys=[self._key()], args=[max(0, nbytes), self.backfill_limit_bytes, KEY_TTL_MS]
            )
        return bool(granted)

    def record(self, nbytes: int) -> int:
        """For live fetches: count ``nbytes`` (never refused); the day's total."""
        key = self._key()
        with _redis_errors("budget record"), self.client.pipeline(transaction=True) as pipe:
            pipe.incrby(key, max(0, nbytes))
            pipe.pexpire(key, KEY_TTL_MS)
            total, _ = pipe.execute()
        return int(total)

    def progress(self) -> BudgetProgress:
        with _redis_errors("budget read"):
            raw = self.client.get(self._key())
        return BudgetProgress(
            used_bytes=int(raw or 0),
            limit_bytes=self.limit_bytes,
            backfill_limit_bytes=self.backfill_limit_bytes,
            resets_at=self.resets_at(),
        )


@contextmanager
def _redis_errors(operation: str) -> Iterator[None]:
    try:
        yield
    except RedisError as exc:
        # Like a failed publish: the batch is retried; nothing is fetched past the budget.
        raise PublishError(f"Redis {operation} failed ({type(exc).__name__})") from exc
