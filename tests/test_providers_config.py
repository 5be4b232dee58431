"""The provider and loop settings (issue 20, item 5): parsed, validated, named when wrong."""

from __future__ import annotations

import uuid

import pytest

from shardworker.config import load_settings
from shardworker.errors import ConfigError
from shardworker.loops import Action, MailClass, policy_book


def test_defaults() -> None:
    s = load_settings({})
    assert s.loop_policy == "publish" and s.loop_rate_limit == 20
    assert s.loop_rate_window_s == 7200 and s.loop_rate_action == "skip"
    assert s.gmail_daily_bytes == 2500 * 1024 * 1024 and not s.gmail_all_mail
    assert s.gmail_live_reserve_bytes < s.gmail_daily_bytes


def test_overrides_reach_the_policy_book() -> None:
    pid = str(uuid.uuid4())
    s = load_settings({
        "SHARDWORKER_LOOP_POLICY": "auto_reply=flag",
        "SHARDWORKER_LOOP_POLICY_OVERRIDES": f'{{"{pid}": "skip"}}',
        "SHARDWORKER_LOOP_RATE_EXEMPT": "alerts@ops.example, @trusted.example",
    })  # fmt: skip
    book = policy_book(s.loop_policy, s.loop_policy_overrides, names=("a", "b"))
    assert book.for_provider(pid).action_for(MailClass.BULK) is Action.SKIP
    assert book.default.action_for(MailClass.AUTO_REPLY) is Action.FLAG
    assert s.loop_rate_exempt == ("alerts@ops.example", "@trusted.example")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SHARDWORKER_LOOP_POLICY": "drop"}, "SHARDWORKER_LOOP_POLICY: unknown action"),
        ({"SHARDWORKER_LOOP_POLICY_OVERRIDES": "{nope"}, "SHARDWORKER_LOOP_POLICY_OVERRIDES"),
        ({"SHARDWORKER_LOOP_RATE_ACTION": "publish"}, "SHARDWORKER_LOOP_RATE_ACTION"),
        ({"SHARDWORKER_GMAIL_LIVE_RESERVE_BYTES": "9999999999999"},
         "SHARDWORKER_GMAIL_LIVE_RESERVE_BYTES"),
        ({"SHARDWORKER_LOOP_RATE_LIMIT": "-1"}, "SHARDWORKER_LOOP_RATE_LIMIT"),
    ],
)  # fmt: skip
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(env)
