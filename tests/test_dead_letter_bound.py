"""The dead-letter stream stays within its count and byte bounds (hardening item 8).

A hostile server that dead-letters every UID must not fill the Redis Alga shares: the
oldest entries make room, each UID is still dead-lettered once, and the length is exported.
"""

from __future__ import annotations

import pytest
import redis

from shardworker.config import load_settings
from shardworker.errors import ConfigError
from shardworker.metrics import footprint
from shardworker.sink.redis_streams import RedisStreamsSink, dlq_bytes_key, uid_key
from tests.test_publish import PROVIDER, TENANT, dead_letter, make_settings

DLQ = "shardworker:dlq"


def field_bytes(client: redis.Redis) -> int:
    return sum(len(k) + len(v) for _, fields in client.xrange(DLQ) for k, v in fields.items())


def test_count_bound_keeps_the_newest_entries(redis_client: redis.Redis) -> None:
    sink = RedisStreamsSink(redis_client, make_settings(dlq_max_entries=3))
    ids = [dead_letter(sink, uid, b"raw") for uid in range(1, 8)]
    assert [e for e, _ in redis_client.xrange(DLQ)] == [i.encode() for i in ids[-3:]]
    # A trimmed entry's UID stays done: its dedupe mark outlives the entry.
    assert dead_letter(sink, 1, b"raw") == ids[0]
    assert redis_client.xlen(DLQ) == 3
    before = footprint.families().dlq_trimmed._value.get()
    dead_letter(sink, 8, b"raw")
    assert footprint.families().dlq_trimmed._value.get() == before + 1


def test_byte_bound_holds_and_the_counter_matches_the_stream(redis_client: redis.Redis) -> None:
    sink = RedisStreamsSink(
        redis_client, make_settings(dlq_max_bytes=20_000, dlq_max_raw_bytes=4096)
    )
    for uid in range(1, 40):
        dead_letter(sink, uid, b"x" * 4000)  # about 5.5 kB of fields each
        assert field_bytes(redis_client) <= 20_000
        assert int(redis_client.get(dlq_bytes_key(DLQ)) or 0) == field_bytes(redis_client)
    assert 2 <= redis_client.xlen(DLQ) <= 4


def test_a_lost_counter_is_recounted_from_the_stream(redis_client: redis.Redis) -> None:
    sink = RedisStreamsSink(redis_client, make_settings(dlq_max_bytes=20_000))
    for uid in range(1, 4):
        dead_letter(sink, uid, b"y" * 3000)
    redis_client.delete(dlq_bytes_key(DLQ))  # evicted, or lost with a restart
    for uid in range(4, 12):
        dead_letter(sink, uid, b"y" * 3000)
    assert field_bytes(redis_client) <= 20_000
    assert int(redis_client.get(dlq_bytes_key(DLQ)) or 0) == field_bytes(redis_client)


def test_the_uid_mark_carries_the_tenant(redis_client: redis.Redis) -> None:
    sink = RedisStreamsSink(redis_client, make_settings())
    entry = dead_letter(sink, 5, b"raw")
    key = uid_key(TENANT, PROVIDER, "Spam Box", 42, 5)
    assert redis_client.get(key) == f"dlq:{entry}".encode()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SHARDWORKER_DLQ_MAX_ENTRIES": "0"}, "SHARDWORKER_DLQ_MAX_ENTRIES: must be at least 1"),
        ({"SHARDWORKER_DLQ_MAX_BYTES": "1000"}, "SHARDWORKER_DLQ_MAX_BYTES: must hold two"),
        ({"SHARDWORKER_DLQ_MAX_BYTES": str(65 * 1024**3)}, "DLQ_MAX_BYTES: must be at most"),
    ],
)
def test_bounds_are_validated(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)
