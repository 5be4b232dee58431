"""The Redis client factory: plain URL, or the primary found through real Sentinels."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from shardworker.config import load_settings
from shardworker.errors import ConfigError
from shardworker.redisconn import redis_client, sentinel_addresses
from tests.harness.sentinel import MASTER, SentinelError, SentinelRedis


@pytest.fixture
def sentinel_redis() -> Iterator[SentinelRedis]:
    try:
        rs = SentinelRedis().start()
    except (SentinelError, OSError) as exc:
        pytest.fail(f"cannot start Redis with Sentinels (redis-sentinel): {exc}", pytrace=False)
    yield rs
    rs.close()


@pytest.mark.parametrize(
    ("sentinels", "master", "error"),
    [
        ("10.0.0.1", "m", "expected host:port, got '10.0.0.1'"),
        ("h:0", "m", "expected host:port, got 'h:0'"),
        ("h:26379", "", "SHARDWORKER_REDIS_SENTINEL_MASTER: required"),
    ],
)
def test_bad_sentinel_settings_are_named(sentinels: str, master: str, error: str) -> None:
    settings = load_settings(
        {"SHARDWORKER_REDIS_SENTINELS": sentinels, "SHARDWORKER_REDIS_SENTINEL_MASTER": master}
    )
    with pytest.raises(ConfigError, match=error):
        redis_client(settings)


def test_sentinel_addresses_accept_hosts_and_bracketed_ipv6() -> None:
    settings = load_settings({"SHARDWORKER_REDIS_SENTINELS": "a:1, [::1]:26379",
                              "SHARDWORKER_REDIS_SENTINEL_MASTER": "m"})  # fmt: skip
    assert sentinel_addresses(settings) == [("a", 1), ("::1", 26379)]


@pytest.mark.timeout(120)
def test_the_client_follows_a_failover_and_keeps_the_db_index(
    sentinel_redis: SentinelRedis,
) -> None:
    settings = load_settings({
        "SHARDWORKER_REDIS_URL": "redis://unused.invalid:1/5",
        "SHARDWORKER_REDIS_SENTINELS": sentinel_redis.sentinel_setting,
        "SHARDWORKER_REDIS_SENTINEL_MASTER": MASTER,
    })  # fmt: skip
    client = redis_client(settings)
    client.set("before", "1")
    report = sentinel_redis.lossy_failover(write_window_s=0.5)
    assert report.new_primary == sentinel_redis.replica_port
    deadline = time.monotonic() + 30
    while True:
        try:
            client.set("after", "2")
            break
        except redis.RedisError:
            assert time.monotonic() < deadline, "the client never found the new primary"
            time.sleep(0.2)
    with redis.Redis(host="127.0.0.1", port=report.new_primary, db=5) as direct:
        assert direct.get("after") == b"2"
        assert direct.get("before") == b"1"
    client.close()


@pytest.mark.timeout(60)
def test_silent_sentinels_fail_a_call_well_within_the_lease_ttl() -> None:
    # A partition drops packets: connect() completes (the kernel's backlog), no reply comes.
    import socket

    silent = [socket.socket() for _ in range(3)]
    try:
        for sock in silent:
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
        settings = load_settings({
            "SHARDWORKER_REDIS_SENTINELS": ",".join(
                f"127.0.0.1:{s.getsockname()[1]}" for s in silent),
            "SHARDWORKER_REDIS_SENTINEL_MASTER": MASTER,
            "SHARDWORKER_LEASE_TTL_S": "6", "SHARDWORKER_LEASE_RENEW_S": "1.5",
        })  # fmt: skip
        client = redis_client(settings)
        started = time.monotonic()
        with pytest.raises(redis.RedisError):
            client.ping()
        took = time.monotonic() - started
        # The keeper waits a renewal period, heartbeats, then renews (bounded by the leases'
        # validity): the heartbeat must end before the TTL runs out. It took 100 s before.
        assert took < settings.lease_ttl_s - settings.lease_renew_s, f"a call blocked {took:.1f}s"
    finally:
        for sock in silent:
            sock.close()
