"""engine.claims: a Message-ID is held by one sync thread between its ledger check and its
commit; others wait, never deadlock, and give up after a bounded wait."""

from __future__ import annotations

import threading
import time

import pytest

from shardworker.engine.claims import MessageIdClaims
from shardworker.errors import PublishError


def test_a_second_holder_waits_for_the_first_to_release() -> None:
    claims = MessageIdClaims()
    order: list[str] = []
    first = claims.hold("t", "p", ["<a>", "<b>"])
    first.__enter__()

    def second() -> None:
        with claims.hold("t", "p", ["<b>"]):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.2)
    order.append("first released")
    first.__exit__(None, None, None)
    thread.join(5)
    assert order == ["first released", "second"]
    assert claims.held() == 0


def test_other_providers_tenants_and_empty_ids_never_wait() -> None:
    claims = MessageIdClaims(wait_s=0.1)
    with claims.hold("t", "p", ["<a>", ""]):
        with claims.hold("t", "q", ["<a>"]), claims.hold("u", "p", ["<a>"]):
            pass
        with claims.hold("t", "p", ["", ""]):
            assert claims.held() == 1


def test_batches_in_opposite_order_do_not_deadlock() -> None:
    claims = MessageIdClaims(wait_s=10)
    done: list[int] = []

    def run(ids: list[str]) -> None:
        for _ in range(200):
            with claims.hold("t", "p", ids):
                pass
        done.append(1)

    threads = [
        threading.Thread(target=run, args=(ids,)) for ids in (["<a>", "<b>"], ["<b>", "<a>"])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert done == [1, 1]


def test_a_claim_held_too_long_is_a_publish_error() -> None:
    claims = MessageIdClaims(wait_s=0.2)
    with (
        claims.hold("t", "p", ["<a>"]),
        pytest.raises(PublishError, match="stayed claimed"),
        claims.hold("t", "p", ["<a>"]),
    ):
        pass
