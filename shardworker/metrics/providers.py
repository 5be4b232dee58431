"""The metrics of real providers' behaviour: mail-loop protection, throttling, Gmail's budget.

Built into the package's registry (``shardworker.metrics``), which binds itself here at
import, so these families follow the same lazy, multiprocess-aware life as the others.
Labels are bounded: a mail class and a policy action, never a sender or a provider.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

MAIL_CLASSES = ("normal", "auto_reply", "bulk", "bounce", "complaint")
LOOP_ACTIONS = ("publish", "flag", "skip")


class ProviderFamilies:
    def __init__(self, r: CollectorRegistry) -> None:
        self.loop_messages = Counter(
            "shardworker_loop_messages",
            "Messages classified before publishing, by mail class and the action taken.",
            ["class", "action"], registry=r,
        )  # fmt: skip
        self.loop_guard_trips = Counter(
            "shardworker_loop_guard_trips",
            "Times the per-sender rate guard started holding a sender back (once a window).",
            registry=r,
        )
        self.loop_guard_held = Counter(
            "shardworker_loop_guard_held",
            "Messages held back by the per-sender rate guard.",
            registry=r,
        )
        self.imap_throttled = Counter(
            "shardworker_imap_throttled",
            "Throttling answers honoured as a backoff (Exchange, Gmail's bandwidth limit).",
            registry=r,
        )
        self.gmail_budget_used = Gauge(
            "shardworker_gmail_budget_used_ratio",
            "The largest share of a Gmail account's daily download budget used today.",
            multiprocess_mode="livemax", registry=r,
        )  # fmt: skip
        for klass in MAIL_CLASSES:
            for action in LOOP_ACTIONS:
                self.loop_messages.labels(klass, action)


_families: Callable[[], ProviderFamilies] | None = None


def bind(families: Callable[[], ProviderFamilies]) -> None:
    """Called once by ``shardworker.metrics``: where the families of this process live."""
    global _families
    _families = families


def _m() -> ProviderFamilies:
    assert _families is not None, "shardworker.metrics binds the provider families at import"
    return _families()


def loop_message(klass: str, action: str) -> None:
    klass = klass if klass in MAIL_CLASSES else "normal"
    _m().loop_messages.labels(klass, action if action in LOOP_ACTIONS else "publish").inc()


def loop_guard_tripped() -> None:
    _m().loop_guard_trips.inc()


def loop_guard_held() -> None:
    _m().loop_guard_held.inc()


def imap_throttled() -> None:
    _m().imap_throttled.inc()


def gmail_budget_used(ratio: float) -> None:
    _m().gmail_budget_used.set(max(0.0, ratio))
