"""publish.lua refuses, before its first write, whatever would make a later step fail.

Lua does not roll back: a script that failed after its XADD would leave an event without
its dedupe keys, and each retry would add another.  These tests run the script itself
(EVAL of the shipped file) with arguments that no setting can produce any more, and keys
of the wrong type that another program could leave, and check that nothing was written.
"""

from __future__ import annotations

from importlib import resources

import pytest
import redis

STREAM = "workflow:events:global"
UID_KEY = "sw:pub:{t:p}:INBOX:1:1"
MID_KEY = "sw:mid:{t:p}:abc"
BUS = "alga-psa:event-stream:global:INBOUND_EMAIL_RECEIVED"
QUEUE = "email:inbound:unified:pointer:ready"
FIELDS = ["event_id", "e1", "payload_json", "{}"]


def script() -> str:
    return resources.files("shardworker").joinpath("lua/publish.lua").read_text()


RATE_KEY = "sw:loop:{t:p}:0123"
RATE_MARKER = RATE_KEY + ":tripped"
NO_RATE = ["0", "", "", ""]


def run(
    client: redis.Redis, *, maxlen: str = "1000", ttl_ms: str = "60000",
    rate: list[str] = NO_RATE,
) -> object:  # fmt: skip
    keys = [STREAM, UID_KEY, MID_KEY, "", BUS, QUEUE, RATE_KEY, RATE_MARKER]
    args = ["", maxlen, ttl_ms, "1", "1", '{"event":1}', '{"jobId":"j"}', *rate, *FIELDS]
    return client.eval(script(), len(keys), *keys, *args)


def written(client: redis.Redis) -> list[bytes]:
    return sorted(client.keys("*"))


def test_a_valid_call_writes_everything(redis_client: redis.Redis) -> None:
    stream_id, status, rank, first = run(redis_client)  # type: ignore[misc]
    assert (status, rank, first) == (0, 0, 0)
    assert not redis_client.exists(RATE_KEY, RATE_MARKER)  # no rate check asked
    assert redis_client.xlen(STREAM) == redis_client.xlen(BUS) == redis_client.llen(QUEUE) == 1
    assert redis_client.get(UID_KEY) == redis_client.get(MID_KEY) == stream_id


@pytest.mark.parametrize(
    ("maxlen", "ttl_ms"),
    [
        ("1" + "0" * 20, "60000"),  # MAXLEN=1e20: XADD would fail
        ("1000", "1" + "0" * 19),  # TTL 1e16 s: SET PX would fail after the XADD
        ("1000", "0"),
        ("1000", "-5"),
        ("1000", "1.5"),
        ("x", "60000"),
    ],
)
def test_bad_arguments_are_refused_with_nothing_written(
    redis_client: redis.Redis, maxlen: str, ttl_ms: str
) -> None:
    for _ in range(3):  # a retried publish must not add an entry either
        with pytest.raises(redis.ResponseError, match="BADARG"):
            run(redis_client, maxlen=maxlen, ttl_ms=ttl_ms)
    assert written(redis_client) == []


@pytest.mark.parametrize("key", [STREAM, BUS, QUEUE])
def test_a_key_of_the_wrong_type_is_refused_before_any_write(
    redis_client: redis.Redis, key: str
) -> None:
    redis_client.set(key, "not mine")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        run(redis_client)
    assert written(redis_client) == [key.encode()]
    assert redis_client.get(key) == b"not mine"


@pytest.mark.parametrize(
    "rate",
    [
        ["x", "60000", "1000", "m"],  # limit
        ["5", "0", "1000", "m"],  # window 0: PEXPIRE would fail after the ZADD
        ["5", "1" + "0" * 19, "1000", "m"],
        ["5", "60000", "-1", "m"],  # now
        ["5", "60000", "1.5", "m"],
    ],
)
def test_bad_rate_arguments_are_refused_with_nothing_written(
    redis_client: redis.Redis, rate: list[str]
) -> None:
    with pytest.raises(redis.ResponseError, match="BADARG"):
        run(redis_client, rate=rate)
    assert written(redis_client) == []


@pytest.mark.parametrize("key", [STREAM, BUS, QUEUE, RATE_KEY, RATE_MARKER])
def test_with_a_rate_check_a_wrong_type_is_refused_before_the_rate_is_counted(
    redis_client: redis.Redis, key: str
) -> None:
    """The rate check writes (ZADD): every type check comes before it."""
    if key == RATE_MARKER:
        redis_client.rpush(key, "not mine")
    else:
        redis_client.set(key, "not mine")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        run(redis_client, rate=["5", "60000", "1000", "m"])
    assert written(redis_client) == [key.encode()]


def test_a_held_message_writes_nothing_but_the_rate_marker(redis_client: redis.Redis) -> None:
    redis_client.zadd(RATE_KEY, {"earlier": 900})
    reply = run(redis_client, rate=["1", "60000", "1000", "m"])
    assert reply == [b"", 3, 1, 1]
    assert written(redis_client) == sorted([RATE_KEY.encode(), RATE_MARKER.encode()])
    assert redis_client.zrange(RATE_KEY, 0, -1) == [b"earlier"]  # a held one is not counted
    assert run(redis_client, rate=["1", "60000", "1001", "m"]) == [b"", 3, 1, 0]  # tripped once
    # The window slides past the earlier message: admitted, counted, and written.
    stream_id, status, rank, first = run(  # type: ignore[misc]
        redis_client, rate=["1", "60000", "60901", "m"]
    )
    assert (status, rank, first) == (0, 0, 0)
    assert redis_client.zrange(RATE_KEY, 0, -1) == [b"m"]
    assert redis_client.xlen(STREAM) == redis_client.llen(QUEUE) == 1
    assert redis_client.get(UID_KEY) == stream_id
