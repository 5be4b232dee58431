"""The engine's failure policy and the slot's state machine: pure parts."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from shardworker.errors import (
    DatabaseUnavailableError,
    FencedError,
    FolderError,
    ImapAuthError,
    ImapThrottledError,
    ImapTransientError,
    LeaseLostError,
    PublishError,
    SecretError,
    StoreError,
)


def test_a_password_echoed_in_an_error_is_blanked() -> None:
    from shardworker.engine.failures import scrub_secret
    from shardworker.engine.state import ProviderRuntime
    from shardworker.imap.connect import Credentials

    rt = ProviderRuntime.__new__(ProviderRuntime)
    rt.credentials = Credentials("password", "bob", "hunter2-secret")
    text = scrub_secret("protocol: unexpected b'* BAD hunter2-secret'", rt)
    assert "hunter2" not in text and "***" in text
    rt.credentials = None
    assert scrub_secret("no secret here", rt) == "no secret here"


def _slot(folder: str = "INBOX", *, connected: bool = False) -> Any:
    from shardworker.config import Settings
    from shardworker.db.store import ProviderConfig
    from shardworker.engine.state import ProviderRuntime, Slot, make_backoff
    from shardworker.imap.session import FolderSession

    settings = Settings(backoff_base_s=1.0, backoff_max_s=8.0, auth_backoff_base_s=30.0,
                        auth_backoff_max_s=600.0, folder_reprobe_s=300.0)  # fmt: skip
    cfg = ProviderConfig.__new__(ProviderConfig)
    rt = ProviderRuntime(cfg, None, make_backoff(settings, auth=True))
    session = FolderSession(folder)
    if connected:
        session.client = object()  # type: ignore[assignment]
    return Slot(rt, session, make_backoff(settings, auth=False)), settings


@pytest.mark.parametrize(
    ("error", "connected", "action"),
    [
        (FencedError("stale"), True, "stop_provider"),
        (LeaseLostError("gone"), False, "stop_provider"),
        (FolderError("no such folder"), True, "park"),
        (PublishError("redis down"), True, "retry_drain"),
        (StoreError("pg down"), True, "retry_drain"),
        (DatabaseUnavailableError("pool", reason="db_pool_timeout"), True, "retry_drain"),
        (PublishError("redis down"), False, "reconnect"),
        (ImapTransientError("reset"), True, "reconnect"),
    ],
)
def test_each_error_class_gets_one_decision(error: Any, connected: bool, action: str) -> None:
    from shardworker.engine.failures import FailurePolicy

    slot, settings = _slot(connected=connected)
    decision = FailurePolicy(settings).decide(slot, error, now=100.0)
    assert decision.action.value == action
    if action == "park":
        assert decision.delay_s == 300.0
    elif action in ("retry_drain", "reconnect"):
        assert 0.5 <= decision.delay_s <= 1.0  # the slot's first backoff step


def test_a_throttle_waits_as_asked_and_leaves_the_backoff_alone() -> None:
    from shardworker.engine.failures import Action, FailurePolicy

    slot, settings = _slot(connected=True)
    policy = FailurePolicy(settings)
    for _ in range(3):  # however often: the wait is the server's, the backoff never grows
        decision = policy.decide(slot, ImapThrottledError("slow down", retry_after_s=2.5), 0.0)
        assert decision.action is Action.THROTTLE and decision.delay_s == 2.5
    assert 0.5 <= policy.decide(slot, ImapTransientError("reset"), now=0.0).delay_s <= 1.0


def test_provider_answers_are_reclassified_before_the_policy() -> None:
    from shardworker.db.store import ProviderConfig
    from shardworker.engine.cycle import provider_error

    cfg = ProviderConfig.__new__(ProviderConfig)
    object.__setattr__(cfg, "host", "outlook.example")
    object.__setattr__(cfg, "port", 993)
    object.__setattr__(cfg, "username", "me@x/shared@x")
    object.__setattr__(cfg, "auth_type", "password")
    login = ImapAuthError(
        "outlook.example:993: b'Request is throttled. Suggested Backoff Time: 500 milliseconds'"
    )
    throttled = provider_error(login, cfg)
    assert isinstance(throttled, ImapThrottledError) and throttled.retry_after_s == 0.5
    assert str(throttled).count("outlook.example:993") == 1
    examine = FolderError("cannot examine folder: User is authenticated but not connected.")
    found = provider_error(examine, cfg)
    assert isinstance(found, ImapAuthError) and found.code == "not_connected"
    plain = ImapAuthError("outlook.example:993: [AUTHENTICATIONFAILED] nope")
    assert provider_error(plain, cfg) is plain
    assert provider_error(PublishError("redis"), cfg).__class__ is PublishError


def test_a_secret_error_waits_at_least_the_auth_base() -> None:
    from shardworker.engine.failures import Action, FailurePolicy

    slot, settings = _slot()
    decision = FailurePolicy(settings).decide(slot, SecretError("missing"), now=0.0)
    assert decision.action is Action.RECONNECT and decision.delay_s >= 30.0


def test_auth_failures_count_once_per_backoff_window() -> None:
    from shardworker.engine.failures import Action, FailurePolicy

    slot, settings = _slot()
    policy, err = FailurePolicy(settings), ImapAuthError("rejected", code="AUTHENTICATIONFAILED")
    first = policy.decide(slot, err, now=0.0)
    assert first.action is Action.AUTH_BACKOFF and first.count_auth_failure
    slot.provider.auth_blocked_until = first.delay_s  # what the loop applies
    inside = policy.decide(slot, err, now=1.0)
    assert not inside.count_auth_failure and inside.delay_s == first.delay_s - 1.0
    later = policy.decide(slot, err, now=first.delay_s + 1.0)
    assert later.count_auth_failure and later.delay_s > first.delay_s / 2


def test_a_resolving_slot_is_not_parked_for_a_folder_error() -> None:
    from shardworker.engine.failures import Action, FailurePolicy

    slot, settings = _slot("")
    slot.resolving = True
    decision = FailurePolicy(settings).decide(slot, FolderError("filters"), now=0.0)
    assert decision.action is Action.RECONNECT


def test_slot_moves_follow_the_table() -> None:
    from shardworker.engine.state import MOVES, SlotState, may_move

    assert set(MOVES) == set(SlotState)
    assert not MOVES[SlotState.STOPPED]
    assert all(may_move(s, SlotState.STOPPED) for s in SlotState if s is not SlotState.STOPPED)
    assert may_move(SlotState.NEW, SlotState.CONNECTING)
    assert may_move(SlotState.SYNCING, SlotState.IDLE)
    assert not may_move(SlotState.STOPPING, SlotState.SYNCING)  # a stop is never undone
    assert not may_move(SlotState.NEW, SlotState.IDLE)  # idle needs a connection first
    assert {s.value for s in SlotState} >= {"new", "connecting", "stopping", "stopped"}
    assert "paused" not in {s.value for s in SlotState}


def test_an_illegal_move_is_logged_and_made(caplog: pytest.LogCaptureFixture) -> None:
    from shardworker.engine.state import SlotState

    slot, _ = _slot()
    slot.provider.config = _config()
    slot.move(SlotState.STOPPING)
    assert slot.want_stop
    with caplog.at_level(logging.ERROR, logger="shardworker.engine.state"):
        slot.move(SlotState.SYNCING)
    assert slot.state is SlotState.SYNCING
    assert "slot_move_illegal" in caplog.text


def _config() -> Any:
    from shardworker.db.store import ProviderConfig

    cfg = ProviderConfig.__new__(ProviderConfig)
    object.__setattr__(cfg, "provider_id", "p-1")
    return cfg


def test_a_pool_timeout_is_a_database_failure_not_an_imap_protocol_error() -> None:
    from psycopg_pool import PoolTimeout

    from shardworker.engine.failures import classify_failure, error_reason
    from shardworker.errors import DatabaseUnavailableError, ImapProtocolError, StoreError

    err = classify_failure(PoolTimeout("couldn't get a connection after 5.00 sec"))
    assert isinstance(err, DatabaseUnavailableError) and isinstance(err, StoreError)
    assert not isinstance(err, ImapProtocolError)
    assert error_reason(err) == "db_pool_timeout"


def test_an_operational_error_is_a_database_failure_and_others_stay_imap() -> None:
    import psycopg

    from shardworker.engine.failures import classify_failure, error_reason
    from shardworker.errors import DatabaseUnavailableError, ImapProtocolError

    err = classify_failure(psycopg.OperationalError("server closed the connection"))
    assert isinstance(err, DatabaseUnavailableError)
    assert error_reason(err) == "db_unavailable"
    assert isinstance(classify_failure(ValueError("odd")), ImapProtocolError)
