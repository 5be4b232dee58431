"""Alga's pointer consumer claims shardworker's jobs oldest first (UID order per folder).

Alga's claim takes a job with ``RPOPLPUSH ready processing`` (from the tail) and records
it in an in-flight hash and a lease sorted set; its producer appends with ``RPUSH``, which
makes the ready list a stack.  shardworker pushes at the head (``LPUSH``) so the same,
unchanged claim sees a queue.  The claim, ack, retry and reclaim below do what Alga's
``unifiedInboundEmailQueue`` does to these keys (see docs/DESIGN.md, "Pointer queue").
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis

from shardworker.config import Settings
from shardworker.sink.base import Outbound
from shardworker.sink.redis_streams import POINTER_QUEUE, WORKFLOW_STREAM, RedisStreamsSink

TENANT = "0b7c4d1e-8f0a-4c6b-9d2e-3f4a5b6c7d8e"
PROVIDER = "5d6e7f80-1a2b-4c3d-8e9f-a0b1c2d3e4f5"
PROCESSING = "email:inbound:unified:pointer:processing"
INFLIGHT = "email:inbound:unified:pointer:inflight"
LEASES = "email:inbound:unified:pointer:lease"
DLQ = "email:inbound:unified:pointer:dlq"
FOLDERS = ("INBOX", "Support", "Sales")
BATCH = 50

# Alga's claim: move the tail of the ready list to processing, then note the claim.
CLAIM = """
local payload = redis.call('RPOPLPUSH', KEYS[1], KEYS[2])
if not payload then return false end
local job = cjson.decode(payload)
redis.call('HSET', KEYS[3], job['jobId'], payload)
redis.call('ZADD', KEYS[4], tonumber(ARGV[1]), job['jobId'])
return payload
"""


def outbound(folder: str, uid: int, *, in_reply_to: str | None = None) -> Outbound:
    mid = f"<{folder.lower()}-{uid}@example.com>"
    email: dict[str, Any] = {
        "id": mid,
        "subject": f"message {uid}",
        "from": {"email": "customer@example.com"},
        "to": [{"email": "support@example.com"}],
        "body": {"text": "hello"},
        "receivedAt": "2026-11-27T12:00:00.000Z",
    }
    if in_reply_to:
        email["inReplyTo"] = in_reply_to
        email["threadId"] = in_reply_to
    payload = {
        "tenantId": TENANT,
        "tenant": TENANT,
        "providerId": PROVIDER,
        "occurredAt": "2026-11-27T12:00:00.000Z",
        "emailData": email,
    }
    return Outbound(
        tenant=TENANT,
        provider_id=PROVIDER,
        mailbox="support@example.com",
        folder=folder,
        uid_validity=7,
        uid=uid,
        message_id=mid,
        payload=payload,
        event_time=datetime(2026, 11, 27, 12, tzinfo=UTC),
    )


def backlog() -> list[list[Outbound]]:
    """200 messages over 3 folders, published in UID-ordered batches that interleave the
    folders; every third message replies to the one before it, in the same batch."""
    per_folder = {"INBOX": 80, "Support": 70, "Sales": 50}
    batches: list[list[Outbound]] = []
    for start in range(1, 81, BATCH):
        for folder in FOLDERS:
            batch = []
            for uid in range(start, min(start + BATCH, per_folder[folder] + 1)):
                parent = f"<{folder.lower()}-{uid - 1}@example.com>" if uid % 3 == 0 else None
                batch.append(outbound(folder, uid, in_reply_to=parent))
            if batch:
                batches.append(batch)
    assert sum(map(len, batches)) == 200
    return batches


def claim(client: redis.Redis) -> bytes | None:
    lease_until = int(datetime.now(UTC).timestamp() * 1000) + 60_000
    return client.eval(CLAIM, 4, POINTER_QUEUE, PROCESSING, INFLIGHT, LEASES, lease_until)  # type: ignore[no-any-return]


def ack(client: redis.Redis, payload: bytes) -> None:
    job_id = orjson.loads(payload)["jobId"]
    pipe = client.pipeline()
    pipe.lrem(PROCESSING, 1, payload).hdel(INFLIGHT, job_id).zrem(LEASES, job_id)
    pipe.execute()


def fail(client: redis.Redis, payload: bytes, *, max_attempts: int = 5) -> str:
    """Alga's failure path: re-queue with attempt + 1 at the tail, or to the DLQ."""
    job = orjson.loads(payload)
    job["attempt"] += 1
    pipe = client.pipeline()
    pipe.lrem(PROCESSING, 1, payload).hdel(INFLIGHT, job["jobId"]).zrem(LEASES, job["jobId"])
    if job["attempt"] >= max_attempts:
        pipe.rpush(DLQ, orjson.dumps({"reason": "test", "job": job}))
        pipe.execute()
        return "dlq"
    pipe.rpush(POINTER_QUEUE, orjson.dumps(job))
    pipe.execute()
    return "retried"


def reclaim(client: redis.Redis, job_id: str) -> None:
    """Alga's reclaim of an expired claim: the original payload goes back to the tail."""
    payload = client.hget(INFLIGHT, job_id)
    assert payload is not None
    pipe = client.pipeline()
    pipe.lrem(PROCESSING, 1, payload).hdel(INFLIGHT, job_id).zrem(LEASES, job_id)
    pipe.rpush(POINTER_QUEUE, payload)
    pipe.execute()


@pytest.fixture
def publisher(redis_client: redis.Redis) -> RedisStreamsSink:
    return RedisStreamsSink(redis_client, Settings(publish_pointer_queue=True))


def pointer_of(payload: bytes) -> tuple[str, int]:
    pointer = orjson.loads(payload)["pointer"]
    return pointer["mailbox"], int(pointer["uid"])


def test_backlog_is_claimed_in_uid_order_per_folder(
    redis_client: redis.Redis, publisher: RedisStreamsSink
) -> None:
    for batch in backlog():
        results = publisher.publish_batch(batch, None)
        assert not any(r.duplicate for r in results)
    claimed: list[tuple[str, int]] = []
    while (payload := claim(redis_client)) is not None:
        claimed.append(pointer_of(payload))
        ack(redis_client, payload)
    assert len(claimed) == 200
    for folder in FOLDERS:
        uids = [uid for f, uid in claimed if f == folder]
        assert uids == sorted(uids), f"{folder} claimed out of UID order"
    # Across folders the order is publication order: the first batch of each folder is
    # claimed before any second batch.
    first_second_batch = claimed.index(("INBOX", BATCH + 1))
    assert all(uid <= BATCH for _, uid in claimed[:first_second_batch])
    # Every reply comes after the message it answers.
    position = {pointer: i for i, pointer in enumerate(claimed)}
    for folder, uid in claimed:
        if uid % 3 == 0:
            assert position[(folder, uid - 1)] < position[(folder, uid)]
    for key in (POINTER_QUEUE, PROCESSING, INFLIGHT, LEASES):
        assert redis_client.exists(key) == 0


def test_jobs_queued_by_alga_itself_keep_their_own_order_beside_ours(
    redis_client: redis.Redis, publisher: RedisStreamsSink
) -> None:
    """Alga's own producer (RPUSH) still works on the same list; nothing is lost."""
    publisher.publish_batch([outbound("INBOX", uid) for uid in (1, 2, 3)], None)
    alga_job = orjson.dumps({"jobId": str(uuid.uuid4()), "pointer": {"mailbox": "X", "uid": "9"}})
    redis_client.rpush(POINTER_QUEUE, alga_job)
    claimed = []
    while (payload := claim(redis_client)) is not None:
        claimed.append(pointer_of(payload))
        ack(redis_client, payload)
    assert claimed == [("X", 9), ("INBOX", 1), ("INBOX", 2), ("INBOX", 3)]


def test_retry_reclaim_and_dlq_still_behave(
    redis_client: redis.Redis, publisher: RedisStreamsSink
) -> None:
    publisher.publish_batch([outbound("INBOX", uid) for uid in (1, 2, 3)], None)
    first = claim(redis_client)
    assert first is not None and pointer_of(first) == ("INBOX", 1)
    assert redis_client.lrange(PROCESSING, 0, -1) == [first]
    # A failed job is retried before the younger ones, with its attempt counted.
    assert fail(redis_client, first) == "retried"
    again = claim(redis_client)
    assert again is not None and pointer_of(again) == ("INBOX", 1)
    assert orjson.loads(again)["attempt"] == 1
    # An expired claim resurfaces with its original bytes, again before the younger ones.
    reclaim(redis_client, orjson.loads(again)["jobId"])
    assert redis_client.llen(PROCESSING) == 0 and redis_client.hlen(INFLIGHT) == 0
    resurfaced = claim(redis_client)
    assert resurfaced == again
    # Out of attempts: to Alga's DLQ, out of every other structure.
    assert fail(redis_client, resurfaced, max_attempts=2) == "dlq"
    [dead] = redis_client.lrange(DLQ, 0, -1)
    assert orjson.loads(dead)["job"]["pointer"]["uid"] == "1"
    rest = []
    while (payload := claim(redis_client)) is not None:
        rest.append(pointer_of(payload))
        ack(redis_client, payload)
    assert rest == [("INBOX", 2), ("INBOX", 3)]
    assert redis_client.zcard(LEASES) == 0 and redis_client.llen(PROCESSING) == 0


def test_job_bytes_are_what_alga_acks(
    redis_client: redis.Redis, publisher: RedisStreamsSink
) -> None:
    """Ack removes by the original payload: the bytes we push are the bytes claimed."""
    publisher.publish_batch([outbound("INBOX", 1)], None)
    [queued] = redis_client.lrange(POINTER_QUEUE, 0, -1)
    payload = claim(redis_client)
    assert payload == queued
    ack(redis_client, payload)
    assert redis_client.llen(PROCESSING) == 0
    assert redis_client.xlen(WORKFLOW_STREAM) == 1
