"""A request that outlives its own failure: a publish Redis runs after its retry settled.

A publish whose connection stalls (a flapping link) times out; redis-py retries it on a
new connection, the retry publishes, the engine commits and settles (drops the dedupe
keys).  The first request was not lost, only late: TCP delivers it after the heal, the lease
token is still the owner's, the keys are gone, and the script publishes a second time.  The
partition run saw this on a flapping link (docs/partitions.md).  The proxy's delay mode
plays the late request: the chunk read while it is on is forwarded seconds later, after the
client has given up on that connection.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shardworker.config import Settings
from shardworker.redisconn import (
    STALE_REQUEST_S,
    TCP_USER_TIMEOUT_S,
    FailureRecord,
    RecordingRetry,
    redis_client,
    watch_failures,
)
from shardworker.sink.base import Settled
from shardworker.sink.redis_streams import WORKFLOW_STREAM, RedisStreamsSink, uid_key
from tests.faultproxy import FaultProxy
from tests.harness.net import free_port
from tests.test_publish import PROVIDER, TENANT, outbound

CALL_TIMEOUT_S = 1.0
LATE_S = 3.0  # how late the first request reaches Redis


def settled(uid: int) -> Settled:
    return Settled(TENANT, PROVIDER, "INBOX", 42, uid, f"<msg-{uid}@example.com>")


def test_a_late_copy_of_a_retried_publish_is_a_duplicate_not_a_second_event(
    redis_server: str, redis_url: str
) -> None:
    db = redis_url.rsplit("/", 1)[1]
    port = int(redis_server.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        settings = Settings(
            redis_url=f"redis://127.0.0.1:{proxy.port}/{db}", publish_pointer_queue=False
        )
        client = redis_client(settings, timeout_s=CALL_TIMEOUT_S, retries=1)
        sink = RedisStreamsSink(client, settings)
        client.ping()  # the connection exists before the link stalls
        proxy.delay(LATE_S, for_s=0.3)
        started = time.monotonic()
        (result,) = sink.publish_batch([outbound(1)], fence=None)
        retried_after = time.monotonic() - started
        assert not result.duplicate
        assert CALL_TIMEOUT_S <= retried_after < LATE_S, "the retry must beat the late request"
        sink.settle([settled(1)])
        direct = redis.Redis.from_url(redis_url)
        time.sleep(LATE_S + 1.0 - (time.monotonic() - started))
        assert proxy.stats.bytes_up > 0
        entries = direct.xrange(WORKFLOW_STREAM)
        assert len(entries) == 1, f"the late request published again: {entries!r}"
        ttl_ms = direct.pttl(uid_key(TENANT, PROVIDER, "INBOX", 42, 1))
        assert 0 < ttl_ms <= STALE_REQUEST_S * 1000
        client.close()
        direct.close()


def test_without_a_failure_settle_drops_the_keys_at_once(redis_url: str) -> None:
    client = redis_client(Settings(redis_url=redis_url, publish_pointer_queue=False))
    sink = RedisStreamsSink(client, Settings(redis_url=redis_url, publish_pointer_queue=False))
    sink.publish_batch([outbound(7)], fence=None)
    sink.settle([settled(7)])
    assert client.exists(uid_key(TENANT, PROVIDER, "INBOX", 42, 7)) == 0
    client.close()


def test_every_failed_attempt_is_recorded_retried_ones_included() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = redis_client(Settings(redis_url=dead), timeout_s=0.3, retries=1)
    record = watch_failures(client)
    assert record.last_failure is None
    with contextlib.suppress(redis.ConnectionError):
        client.ping()
    assert record.within(5.0)
    client.close()


def test_a_client_built_elsewhere_gets_a_record_and_keeps_its_retry_policy(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 2))
    record = watch_failures(client)
    retry = client.get_retry()
    assert isinstance(retry, RecordingRetry)
    assert retry.get_retries() == 2
    assert watch_failures(client) is record
    # redis-py deep-copies the Retry into each connection: the copies share the record.
    clone = copy.deepcopy(retry)
    assert isinstance(clone, RecordingRetry) and clone.record is record
    client.close()


def test_the_record_forgets_after_the_window() -> None:
    now = [100.0]
    record = FailureRecord(clock=lambda: now[0])
    record.note()
    now[0] += STALE_REQUEST_S - 0.1
    assert record.within(STALE_REQUEST_S)
    now[0] += 0.2
    assert not record.within(STALE_REQUEST_S)


def test_connections_bound_how_long_a_sent_request_can_linger(redis_url: str) -> None:
    client = redis_client(Settings(redis_url=redis_url))
    conn = client.connection_pool.get_connection()
    try:
        conn.connect()
        sock = conn._sock
        assert sock is not None
        got = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        assert got == TCP_USER_TIMEOUT_S * 1000
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        client.connection_pool.release(conn)
        client.close()
