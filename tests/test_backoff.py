from __future__ import annotations

from shardworker.engine.backoff import Backoff


def make(rand: float = 1.0) -> Backoff:
    return Backoff(base_s=1.0, max_s=60.0, healthy_after_s=30.0, rand=lambda: rand)


def test_delay_grows_exponentially_up_to_the_cap() -> None:
    b = make()
    delays = [b.failure(now=0.0) for _ in range(10)]
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(delays) == 60.0
    assert delays[-1] == 60.0


def test_jitter_stays_within_half_to_full_ceiling() -> None:
    low = make(rand=0.0)
    assert [low.failure(0.0) for _ in range(3)] == [0.5, 1.0, 2.0]


def test_reset_needs_a_healthy_period() -> None:
    b = make()
    for _ in range(5):
        b.failure(now=0.0)
    b.mark_healthy(now=100.0)
    # Dropped again after 5 s: not healthy long enough, the backoff keeps growing.
    assert b.failure(now=105.0) == 32.0
    b.mark_healthy(now=200.0)
    assert b.failure(now=231.0) == 1.0


def test_mark_healthy_keeps_the_first_timestamp() -> None:
    b = make()
    b.mark_healthy(now=10.0)
    b.mark_healthy(now=50.0)
    assert b.healthy_since == 10.0
