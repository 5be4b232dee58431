"""The one call the sync path makes per parsed message before publishing it.

:meth:`MessageGate.admit` runs, in order: drop ``x-shardworker-*`` headers the message
forged; add the Gmail identity (labels, thread id) when the server is Gmail; classify it
(:mod:`shardworker.loops`); ask the per-sender rate guard (:mod:`shardworker.loopguard`);
pick the provider's policy; mark the event.  The answer says whether to publish it and,
if not, the ledger reason.  Call it only for messages that are about to be published
(after the ledger's duplicate checks), so a duplicate never counts against its sender.
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
    PolicyBook,
    annotate,
    classify_email_data,
    decide,
    drop_forged_headers,
    policy_book,
)


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
        data = drop_forged_headers(email_data)
        if gmail is not None:
            data = apply_gmail(data, gmail)
        verdict = classify_email_data(data, own_addresses=[mailbox])
        sender = str((data.get("from") or {}).get("email", ""))
        held = self.guard.check(tenant, provider_id, sender, message_key).held
        decision = decide(
            verdict, self.book.for_provider(provider_id),
            rate_held=self.rate_action if held else None,
        )  # fmt: skip
        return Admission(annotate(data, decision), decision)
