"""The Redis Streams sink against a real (private) Redis: layout, DLQ entries, lag, errors.

The exactly-once and fencing rules every sink keeps are tested in test_sink.py."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import shutil
import subprocess
import tempfile
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shardworker.config import Settings
from shardworker.errors import ConfigError, PublishError
from shardworker.sink.base import DeadLetter, Outbound
from shardworker.sink.redis_streams import (
    EVENT_ID_NAMESPACE,
    POINTER_QUEUE,
    WORKFLOW_GROUP,
    WORKFLOW_STREAM,
    RedisStreamsSink,
    event_id_for,
    iso_ms,
    message_id_key,
    uid_key,
)
from tests.conftest import free_port, wait_for_port

TENANT = "0b7c4d1e-8f0a-4c6b-9d2e-3f4a5b6c7d8e"
PROVIDER = "5d6e7f80-1a2b-4c3d-8e9f-a0b1c2d3e4f5"
ALGA_FIELDS = [
    "event_id", "execution_id", "event_name", "event_type", "tenant",
    "timestamp", "user_id", "from_state", "to_state", "payload_json",
]  # fmt: skip
EVENT_TIME = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)


def outbound(uid: int = 1, *, folder: str = "INBOX", message_id: str | None = None) -> Outbound:
    mid = f"<msg-{uid}@example.com>" if message_id is None else message_id
    payload = {
        "tenantId": TENANT,
        "tenant": TENANT,
        "providerId": PROVIDER,
        "occurredAt": "2026-11-27T12:00:00.123Z",
        "emailData": {
            "id": mid,
            "subject": "Grüße — ünïcödé ✓",
            "from": {"email": "a@example.com", "name": "Zoë"},
            "to": [{"email": "support@example.com"}],
            "body": {"text": "hello"},
            "receivedAt": "2026-11-27T12:00:00.123Z",
        },
    }
    return Outbound(
        tenant=TENANT,
        provider_id=PROVIDER,
        mailbox="support@example.com",
        folder=folder,
        uid_validity=42,
        uid=uid,
        message_id=mid,
        payload=payload,
        event_time=EVENT_TIME,
    )


def make_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"publish_pointer_queue": False}
    base.update(overrides)
    return Settings(**base)


def entries(client: redis.Redis, stream: str = WORKFLOW_STREAM) -> list[tuple[str, list[Any]]]:
    """XRANGE exactly as on the wire: (id, [name, value, name, value, ...]).

    Run through EVAL so no redis-py response callback reshapes the reply.
    """
    raw = client.eval("return redis.call('XRANGE', KEYS[1], '-', '+')", 1, stream)
    return [(i.decode(), [v.decode() for v in flat]) for i, flat in raw]


def snapshot(client: redis.Redis) -> dict[str, Any]:
    return {
        "xlen": client.xlen(WORKFLOW_STREAM),
        "keys": sorted(client.keys("sw:*")),
        "pointers": client.lrange(POINTER_QUEUE, 0, -1),
    }


# Pure helpers


def test_iso_ms_formats_milliseconds_in_utc() -> None:
    assert iso_ms(EVENT_TIME) == "2026-11-27T12:00:00.123Z"
    plus2 = timezone(timedelta(hours=2))
    assert iso_ms(datetime(2026, 1, 1, 2, 0, 0, tzinfo=plus2)) == "2026-01-01T00:00:00.000Z"
    assert iso_ms(datetime(2026, 1, 1, 0, 0, 0, 999999)) == "2026-01-01T00:00:00.999Z"


def test_dedupe_keys_carry_tenant_and_provider_in_one_hash_tag() -> None:
    tag = f"{{{TENANT}:{PROVIDER}}}"
    assert uid_key(TENANT, PROVIDER, "INBOX", 42, 7) == f"sw:pub:{tag}:INBOX:42:7"
    digest = hashlib.sha1(b"<a@b>").hexdigest()
    assert message_id_key(TENANT, PROVIDER, "<a@b>") == f"sw:mid:{tag}:{digest}"


def test_the_same_provider_id_in_two_tenants_never_dedupes_across(
    redis_client: redis.Redis,
) -> None:
    sink = RedisStreamsSink(redis_client, make_settings())
    [mine] = sink.publish_batch([outbound(1)], None)
    other = dataclasses.replace(outbound(1), tenant="1c2d3e4f-0000-4000-8000-000000000001")
    [theirs] = sink.publish_batch([other], None)
    assert not mine.duplicate and not theirs.duplicate
    assert theirs.stream_id != mine.stream_id


def test_zero_dedupe_ttl_is_refused(redis_client: redis.Redis) -> None:
    with pytest.raises(ConfigError, match="DEDUPE_TTL_S"):
        RedisStreamsSink(redis_client, make_settings(dedupe_ttl_s=0))


# Stream layout


def test_workflow_entry_matches_alga_field_order_and_values(redis_client: redis.Redis) -> None:
    out = outbound()
    [result] = RedisStreamsSink(redis_client, make_settings()).publish_batch([out], None)
    assert result.uid == 1 and not result.duplicate
    [(stream_id, flat)] = entries(redis_client)
    assert stream_id == result.stream_id
    assert flat[0::2] == ALGA_FIELDS
    values = dict(zip(flat[0::2], flat[1::2], strict=True))
    assert values["event_id"] == str(
        uuid.uuid5(EVENT_ID_NAMESPACE, f"{TENANT}:{PROVIDER}:INBOX:42:1")
    )
    assert uuid.UUID(values["event_id"]).version == 5
    assert values["event_name"] == values["event_type"] == "INBOUND_EMAIL_RECEIVED"
    assert values["tenant"] == TENANT
    assert values["timestamp"] == "2026-11-27T12:00:00.123Z"
    assert uuid.UUID(values["execution_id"]).version == 4
    assert values["execution_id"] != values["event_id"]
    for empty in ("user_id", "from_state", "to_state"):
        assert values[empty] == ""
    assert values["payload_json"] == orjson.dumps(out.payload).decode()
    assert "Grüße — ünïcödé ✓" in values["payload_json"]
    assert ": " not in values["payload_json"] and ", " not in values["payload_json"]
    assert list(orjson.loads(values["payload_json"])) == list(out.payload)


def event_ids(client: redis.Redis) -> list[str]:
    return [dict(zip(f[0::2], f[1::2], strict=True))["event_id"] for _, f in entries(client)]


def test_a_message_published_again_after_its_dedupe_keys_were_lost_keeps_its_event_id(
    redis_client: redis.Redis,
) -> None:
    """What a lossy failover does: the entry is gone from the primary with its dedupe keys,
    the next owner publishes the message again, and the consumer that had read the first
    copy recognises the second by ``event_id``."""
    sink = RedisStreamsSink(redis_client, make_settings())
    sink.publish_batch([outbound(7)], None)
    [first] = event_ids(redis_client)
    redis_client.flushdb()  # entry and dedupe keys lost together
    [again] = sink.publish_batch([outbound(7)], None)
    assert not again.duplicate
    assert event_ids(redis_client) == [first]


def test_event_ids_differ_per_message_and_are_uuids_alga_accepts() -> None:
    base = (TENANT, PROVIDER, "INBOX", 42, 7)
    variants = [
        base,
        (TENANT, PROVIDER, "INBOX", 42, 8),  # another UID
        (TENANT, PROVIDER, "Archive", 42, 7),  # another folder
        (TENANT, PROVIDER, "INBOX", 43, 7),  # a new UIDVALIDITY
        (TENANT, "6e7f8091-2b3c-4d4e-9fa0-b1c2d3e4f5a6", "INBOX", 42, 7),  # another provider
        ("1c2d3e4f-0000-4000-8000-000000000001", PROVIDER, "INBOX", 42, 7),  # another tenant
        (TENANT, PROVIDER, "INBOX:42", 7, 7),  # a ':' in the folder shifts nothing over
        (TENANT, PROVIDER, "INBOX\udcff", 42, 7),  # a lone surrogate from a server's bytes
    ]
    ids = [event_id_for(*v) for v in variants]
    assert len(set(ids)) == len(ids)
    assert event_id_for(*base) == ids[0]
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (5, uuid.RFC_4122, text)


def test_event_bus_entry_format(redis_client: redis.Redis) -> None:
    publisher = RedisStreamsSink(redis_client, make_settings(publish_event_bus=True))
    assert publisher.event_bus_stream == "alga-psa:event-stream:global:INBOUND_EMAIL_RECEIVED"
    out = outbound()
    publisher.publish_batch([out], None)
    [(_, flat)] = entries(redis_client, publisher.event_bus_stream)
    assert flat[0::2] == ["event", "channel"]
    assert flat[3] == "global"
    event = orjson.loads(flat[1])
    assert list(event) == ["eventType", "payload", "id", "timestamp"]
    assert event["eventType"] == "INBOUND_EMAIL_RECEIVED"
    assert event["payload"] == out.payload
    assert event["timestamp"] == "2026-11-27T12:00:00.123Z"
    [(_, workflow)] = entries(redis_client)
    assert event["id"] == workflow[1]
    # The event-bus variant of Alga's publisher: an empty correlation key after execution_id.
    assert workflow[0::2] == [*ALGA_FIELDS[:2], "workflow_correlation_key", *ALGA_FIELDS[2:]]
    assert workflow[5] == ""


def test_pointer_job_key_order_and_no_content(redis_client: redis.Redis) -> None:
    publisher = RedisStreamsSink(redis_client, make_settings(publish_pointer_queue=True))
    out = outbound(uid=77, folder="Support/Ünïcode")
    publisher.publish_batch([out], None)
    [raw] = redis_client.lrange(POINTER_QUEUE, 0, -1)
    job = orjson.loads(raw)
    assert list(job) == [
        "jobId", "schemaVersion", "tenantId", "providerId", "enqueuedAt",
        "attempt", "maxAttempts", "provider", "pointer",
    ]  # fmt: skip
    [(_, flat)] = entries(redis_client)
    event_id = dict(zip(flat[0::2], flat[1::2], strict=True))["event_id"]
    assert job["jobId"] == event_id  # deterministic: a copy after a failover is recognised
    assert uuid.UUID(job["jobId"]).version == 5
    assert (job["schemaVersion"], job["attempt"], job["maxAttempts"]) == (1, 0, 5)
    assert (job["tenantId"], job["providerId"], job["provider"]) == (TENANT, PROVIDER, "imap")
    assert job["enqueuedAt"].endswith("Z") and len(job["enqueuedAt"]) == 24
    assert job["pointer"] == {
        "mailbox": "Support/Ünïcode",
        "uid": "77",
        "uidValidity": "42",
        "messageId": "<msg-77@example.com>",
    }
    for forbidden in (b"emailData", b"body", b"content", b"rawMime", b"hello"):
        assert forbidden not in raw


def test_maxlen_trims_approximately_to_the_setting(redis_client: redis.Redis) -> None:
    publisher = RedisStreamsSink(redis_client, make_settings(stream_maxlen=200))
    for start in range(0, 1000, 50):
        publisher.publish_batch([outbound(uid) for uid in range(start + 1, start + 51)], None)
    length = publisher.stream_length()
    # '~' trims whole radix-tree nodes (100 entries by default), never below MAXLEN.
    assert 200 <= length <= 300


# Exactly once: the Redis side of it (the interface tests are in test_sink.py)


def test_duplicates_write_no_pointer_job_and_dedupe_keys_expire(redis_client: redis.Redis) -> None:
    sink = RedisStreamsSink(redis_client, make_settings(publish_pointer_queue=True))
    sink.publish_batch([outbound(1), outbound(2)], None)
    sink.publish_batch([outbound(2), outbound(1), outbound(3)], None)
    assert redis_client.llen(POINTER_QUEUE) == 3
    ttl_ms = redis_client.pttl(uid_key(TENANT, PROVIDER, "INBOX", 42, 1))
    assert 0 < ttl_ms <= 7 * 86400 * 1000


def test_a_copy_in_another_folder_records_its_own_uid_key(redis_client: redis.Redis) -> None:
    sink = RedisStreamsSink(redis_client, make_settings())
    [first] = sink.publish_batch([outbound(5, folder="INBOX")], None)
    sink.publish_batch([outbound(900, folder="Archive", message_id="<msg-5@example.com>")], None)
    assert (
        redis_client.get(uid_key(TENANT, PROVIDER, "Archive", 42, 900)) == first.stream_id.encode()
    )


# Dead letters


def dead_letter(sink: RedisStreamsSink, uid: int, raw: bytes | None) -> str:
    letter = DeadLetter(
        tenant=TENANT, provider_id=PROVIDER, folder="Spam Box", uid_validity=42, uid=uid,
        message_id="<bad@x>", reason="parse_error", raw=raw,
    )  # fmt: skip
    return sink.dead_letter(letter, None)


def test_dead_letter_keeps_small_raw_and_is_idempotent(redis_client: redis.Redis) -> None:
    publisher = RedisStreamsSink(redis_client, make_settings(dlq_max_raw_bytes=16))
    first = dead_letter(publisher, 3, b"Subject: x\r\n\r\n")
    assert dead_letter(publisher, 3, b"Subject: x\r\n\r\n") == first
    [(entry_id, flat)] = entries(redis_client, "shardworker:dlq")
    assert entry_id == first
    assert flat[0::2] == [
        "tenant", "provider_id", "folder", "uid_validity", "uid", "message_id",
        "reason", "time", "size", "raw_base64",
    ]  # fmt: skip
    values = dict(zip(flat[0::2], flat[1::2], strict=True))
    assert base64.b64decode(values["raw_base64"]) == b"Subject: x\r\n\r\n"
    assert (values["uid"], values["size"], values["reason"]) == ("3", "14", "parse_error")
    assert values["time"].endswith("Z")


def test_dead_letter_keeps_a_pointer_for_large_raw(redis_client: redis.Redis) -> None:
    publisher = RedisStreamsSink(redis_client, make_settings(dlq_max_raw_bytes=16))
    dead_letter(publisher, 4, b"x" * 17)
    dead_letter(publisher, 5, None)
    rows = [
        dict(zip(f[0::2], f[1::2], strict=True))
        for _, f in entries(redis_client, "shardworker:dlq")
    ]
    assert [r.get("raw_base64") for r in rows] == [None, None]
    assert rows[0]["pointer"] == f"imap://{PROVIDER}/Spam%20Box;UIDVALIDITY=42/;UID=4"
    assert (rows[0]["size"], rows[1]["size"]) == ("17", "")


# Script cache


def test_noscript_is_recovered_after_script_flush(redis_client: redis.Redis) -> None:
    publisher = RedisStreamsSink(redis_client, make_settings())
    publisher.publish_batch([outbound(1)], None)
    redis_client.script_flush()
    results = publisher.publish_batch([outbound(1), outbound(2)], None)
    assert [r.duplicate for r in results] == [True, False]
    redis_client.script_flush()
    assert dead_letter(publisher, 9, b"raw")
    assert redis_client.xlen(WORKFLOW_STREAM) == 2


# Groups and backpressure


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_prepare_is_idempotent(redis_client: redis.Redis) -> None:
    publisher = RedisStreamsSink(redis_client, make_settings(publish_event_bus=True))
    publisher.prepare()
    publisher.prepare()
    [group] = redis_client.xinfo_groups(WORKFLOW_STREAM)
    assert group["name"] == WORKFLOW_GROUP.encode()
    assert group["last-delivered-id"] == b"0-0"
    [bus] = redis_client.xinfo_groups(publisher.event_bus_stream)
    assert bus["name"] == b"event-processors"


def test_backlog_follows_the_runtime_group_lag(redis_client: redis.Redis) -> None:
    clock = FakeClock()
    publisher = RedisStreamsSink(redis_client, make_settings(backpressure_max_lag=5), clock=clock)
    assert publisher.backlog() == 0  # no stream yet
    publisher.publish_batch([outbound(uid) for uid in range(1, 11)], None)
    assert publisher.backlog() == 10  # group absent: the whole stream counts
    redis_client.xgroup_create(WORKFLOW_STREAM, "workflow-runtime-v2", id="0")
    redis_client.xreadgroup("workflow-runtime-v2", "c1", {WORKFLOW_STREAM: ">"}, count=4)
    assert publisher.backlog() == 6
    assert publisher.backpressured()
    redis_client.xreadgroup("workflow-runtime-v2", "c1", {WORKFLOW_STREAM: ">"}, count=2)
    assert publisher.backlog() == 4
    assert publisher.backpressured()  # cached for a second
    clock.now += 1.5
    assert not publisher.backpressured()


def test_backlog_estimate_when_redis_reports_no_lag(redis_client: redis.Redis) -> None:
    publisher = RedisStreamsSink(redis_client, make_settings(stream_maxlen=100))
    redis_client.xgroup_create(WORKFLOW_STREAM, "workflow-runtime-v2", id="0", mkstream=True)
    for start in range(0, 300, 50):
        publisher.publish_batch([outbound(uid) for uid in range(start + 1, start + 51)], None)
    redis_client.xreadgroup("workflow-runtime-v2", "c1", {WORKFLOW_STREAM: ">"}, count=1000)
    publisher.publish_batch([outbound(uid) for uid in range(1001, 1011)], None)
    # A deletion after the group's position makes Redis report lag as nil.
    ids = [i for i, _ in entries(redis_client)]
    redis_client.xdel(WORKFLOW_STREAM, ids[-3])
    [group] = redis_client.xinfo_groups(WORKFLOW_STREAM)
    assert group["lag"] is None
    assert publisher.backlog() == 10  # entries-added minus entries-read, not XLEN - read


# Redis failures


@pytest.fixture
def doomed_redis() -> Any:
    """A private password-protected redis-server the test may kill."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="sw-redis-doomed-")
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir, "--requirepass", "s3cr3t-pw"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port(port)
    yield proc, f"redis://:s3cr3t-pw@127.0.0.1:{port}/0"
    if proc.poll() is None:
        proc.terminate()
    proc.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


def test_redis_down_raises_publish_error_without_secrets(doomed_redis: Any) -> None:
    proc, url = doomed_redis
    client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), socket_connect_timeout=1)
    publisher = RedisStreamsSink(client, make_settings())
    assert not publisher.publish_batch([outbound(1)], None)[0].duplicate
    proc.terminate()
    proc.wait(10)
    for call in (
        lambda: publisher.publish_batch([outbound(2)], None),
        lambda: dead_letter(publisher, 3, b"raw"),
        publisher.backlog,
        publisher.stream_length,
        publisher.prepare,
    ):
        with pytest.raises(PublishError) as caught:
            call()
        assert "s3cr3t-pw" not in str(caught.value)
        assert "Redis" in str(caught.value)
    client.close()
