"""The one call the sync path makes per parsed message before publishing it.

:meth:`MessageGate.admit` runs, in order: drop ``x-shardworker-*`` headers the message
forged; add the Gmail identity (labels, thread id) when the server is Gmail; classify it
(:mod:`shardworker.loops`); ask the per-sender rate guard (:mod:`shardworker.loopguard`);
pick the provider's policy; mark the event.  The answer says whether to publish it and,
if not, the ledger reason.  Call it only for messages that are about to be published
(after the ledger's duplicate checks), so a duplicate never counts against its sender.

The same steps come apart for a sink that makes the rate check inside its publish
(:meth:`~shardworker.sink.base.Sink.checks_rates`, ``lua/publish.lua``), which saves the
guard's round trip before the XADD: :meth:`MessageGate.assess` does everything that needs
no Redis; under the rate action ``skip``, a message its policy would publish is
:meth:`~MessageGate.folds` - it goes to the publish with its
:class:`~shardworker.sink.base.RateCheck`, marked as if its sender were under the rate
(a held message is not published, so its marks do not matter) - and
:meth:`~MessageGate.record` turns the publish's answer into the same decision, counters
and log lines as :meth:`~MessageGate.admit`.  Under ``flag`` the marks depend on the
answer, so the guard is asked first, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from shardworker.config import Settings, env_name
from shardworker.imap.dialects import GmailAttrs, apply_gmail
from shardworker.loopguard import RedisRateStore, SenderRateGuard
from shardworker.loops import (
    Action,
    Decision,
    LoopPolicy,
    PolicyBook,
    Verdict,
    annotate,
    classify_email_data,
    decide,
    drop_forged_headers,
    policy_book,
)
from shardworker.sink.base import RateCheck


@dataclass(frozen=True)
class Admission:
    email_data: dict[str, Any]
    decision: Decision

    @property
    def publish(self) -> bool:
        return self.decision.publish

    @property
    def ledger_reason(self) -> str | None:
        return self.decision.reason


@dataclass(frozen=True)
class Assessment:
    """A message classified, its rate guard not asked yet (:meth:`MessageGate.assess`)."""

    tenant: str
    provider_id: str
    sender: str
    data: dict[str, Any]  # forged headers dropped, the Gmail identity added
    verdict: Verdict
    policy: LoopPolicy
    rate: RateCheck | None  # the guard's question; None: it lets the message through


class MessageGate:
    def __init__(self, book: PolicyBook, guard: SenderRateGuard, rate_action: Action) -> None:
        self.book = book
        self.guard = guard
        self.rate_action = rate_action

    @classmethod
    def from_settings(
        cls, settings: Settings, client: redis.Redis,
        *, on_trip: Callable[[], None] | None = None, on_held: Callable[[], None] | None = None,
    ) -> MessageGate:  # fmt: skip
        book = policy_book(
            settings.loop_policy,
            settings.loop_policy_overrides,
            names=(env_name("loop_policy"), env_name("loop_policy_overrides")),
        )
        guard = SenderRateGuard(
            RedisRateStore(client), limit=settings.loop_rate_limit,
            window_s=settings.loop_rate_window_s, exempt=settings.loop_rate_exempt,
            on_trip=on_trip, on_held=on_held,
        )  # fmt: skip
        return cls(book, guard, Action(settings.loop_rate_action))

    def admit(
        self, *, tenant: str, provider_id: str, mailbox: str, message_key: str,
        email_data: Mapping[str, Any], gmail: GmailAttrs | None = None,
    ) -> Admission:  # fmt: skip
        """``message_key`` identifies the message across retries and folders (its
        Message-ID, or the Gmail dedupe key); ``mailbox`` is this provider's address."""
        assessment = self.assess(
            tenant=tenant, provider_id=provider_id, mailbox=mailbox, message_key=message_key,
            email_data=email_data, gmail=gmail,
        )  # fmt: skip
        return self.ask(assessment)

    def assess(
        self, *, tenant: str, provider_id: str, mailbox: str, message_key: str,
        email_data: Mapping[str, Any], gmail: GmailAttrs | None = None,
    ) -> Assessment:  # fmt: skip
        """Everything :meth:`admit` does before the rate guard; no Redis."""
        data = drop_forged_headers(email_data)
        if gmail is not None:
            data = apply_gmail(data, gmail)
        verdict = classify_email_data(data, own_addresses=[mailbox])
        sender = str((data.get("from") or {}).get("email", ""))
        return Assessment(
            tenant, provider_id, sender, data, verdict, self.book.for_provider(provider_id),
            self.guard.plan(tenant, provider_id, sender, message_key),
        )  # fmt: skip

    def ask(self, a: Assessment) -> Admission:
        """Ask the guard (one round trip, unless it lets the message through unasked)."""
        held = a.rate is not None and self.guard.ask(a.tenant, a.provider_id, a.sender, a.rate).held
        return self.conclude(a, held=held)

    def folds(self, a: Assessment) -> bool:
        """Whether the publish may ask the guard for ``a``: under ``skip``, for a message
        its policy publishes.  Then ``conclude(a, held=False)`` gives what to publish."""
        return (
            a.rate is not None
            and self.rate_action is Action.SKIP
            and a.policy.action_for(a.verdict.klass) is not Action.SKIP
        )

    def record(self, a: Assessment, *, rank: int, first_trip: bool) -> Admission:
        """The publish's answer to ``a.rate`` (a folded check), counted as :meth:`ask` does."""
        assert a.rate is not None
        answer = self.guard.record(
            a.tenant, a.provider_id, a.sender, a.rate, rank=rank, first=first_trip
        )
        return self.conclude(a, held=answer.held)

    def conclude(self, a: Assessment, *, held: bool) -> Admission:
        decision = decide(a.verdict, a.policy, rate_held=self.rate_action if held else None)
        return Admission(annotate(a.data, decision), decision)
