"""SHARDWORKER_PAYLOAD_MODE: what an event carries, and what it costs in Redis per message."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
import redis

from shardworker.config import load_settings
from shardworker.errors import ConfigError
from shardworker.mime import Caps, build_payload, parse_message
from shardworker.sink.redis_streams import WORKFLOW_STREAM, RedisStreamsSink
from tests.support import make_mail
from tests.test_publish import PROVIDER, TENANT, make_settings, outbound

ATTACHMENT = bytes(range(256)) * 400  # 100 kB, incompressible enough


def event_bytes(client: redis.Redis, mode: str) -> tuple[int, dict[str, object]]:
    settings = make_settings(payload_mode=mode, include_raw_mime=True, publish_pointer_queue=True)
    raw = make_mail(message_id=f"<{mode}@example.com>",
                    attachments=[("a.bin", "application/octet-stream", ATTACHMENT)])  # fmt: skip
    mail = parse_message(raw, uid=1, mailbox="m@example.com", internal_date=None,
                         caps=Caps.from_settings(settings))  # fmt: skip
    payload = build_payload(tenant=TENANT, provider_id=PROVIDER, email_data=mail.email_data,
                            occurred_at=datetime.now(UTC))  # fmt: skip
    out = dataclasses.replace(outbound(1), message_id=mail.message_id, payload=payload)
    client.flushdb()
    RedisStreamsSink(client, settings).publish_batch([out], None)
    return int(client.memory_usage(WORKFLOW_STREAM, samples=0) or 0), mail.email_data


def test_pointer_mode_leaves_content_out_and_costs_a_fraction(redis_client: redis.Redis) -> None:
    full_bytes, full = event_bytes(redis_client, "full")
    lean_bytes, lean = event_bytes(redis_client, "pointer")
    [full_att], [lean_att] = full["attachments"], lean["attachments"]  # type: ignore[misc]
    assert "content" in full_att and "rawMimeBase64" in full
    assert "content" not in lean_att and "rawMimeBase64" not in lean
    assert lean_att["size"] == full_att["size"] == len(ATTACHMENT)  # still listed
    # Full: the attachment twice in base64 (content + raw MIME); pointer: text and metadata.
    assert full_bytes > 2 * len(ATTACHMENT)
    assert 1_000 < lean_bytes < 8_000


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SHARDWORKER_PAYLOAD_MODE": "tiny"}, "PAYLOAD_MODE: expected one of"),
        (
            {"SHARDWORKER_PAYLOAD_MODE": "pointer", "SHARDWORKER_PUBLISH_POINTER_QUEUE": "false"},
            "pointer needs SHARDWORKER_PUBLISH_POINTER_QUEUE",
        ),
    ],
)
def test_payload_mode_is_validated(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)
