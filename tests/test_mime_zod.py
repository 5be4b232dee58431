"""Every payload shardworker builds passes Alga's zod schemas (mirrored in tests/zod)."""

from __future__ import annotations

import copy
from typing import Any

from shardworker.mime import Caps
from tests.mime_support import GOOD, MALFORMED, multipart, parse, payload
from tests.zodcheck import validate_payloads


def _assert_all_pass(payloads: list[dict[str, Any]], names: list[str]) -> None:
    results = validate_payloads(payloads)
    failed = {
        name: result.get("errors")
        for name, result in zip(names, results, strict=True)
        if not (result["union"] and result["shapeA"] and result["shapeB"])
    }
    assert failed == {}


def test_good_corpus_passes_both_shapes() -> None:
    payloads = [payload(parse(p.read_bytes())) for p in GOOD]
    _assert_all_pass(payloads, [p.name for p in GOOD])


def test_malformed_corpus_events_pass_both_shapes() -> None:
    payloads = [payload(parse(p.read_bytes())) for p in MALFORMED]
    _assert_all_pass(payloads, [p.name for p in MALFORMED])


def test_skip_reasons_and_raw_mime_pass_both_shapes() -> None:
    raw = multipart([(f"f{i}.bin", "application/octet-stream", b"x" * 300) for i in range(4)])
    caps = Caps(
        max_raw_bytes=100,
        max_attachment_bytes=250,
        max_total_attachment_bytes=1000,
        max_attachments=3,
        include_raw_mime=True,
    )
    parsed = parse(raw, caps=caps)
    assert parsed.email_data["ingressSkipReasons"]
    _assert_all_pass([payload(parsed)], ["capped"])


def test_validator_rejects_what_alga_rejects() -> None:
    """The mirror is not a rubber stamp: each of these breaks at least one shape."""
    good = payload(parse(GOOD[0].read_bytes()))
    bad_email = copy.deepcopy(good)
    bad_email["emailData"]["from"]["email"] = "alice@localhost"
    null_key = copy.deepcopy(good)
    null_key["emailData"]["threadId"] = None
    not_uuid = copy.deepcopy(good)
    not_uuid["tenantId"] = "tenant-1"
    no_z = copy.deepcopy(good)
    no_z["emailData"]["receivedAt"] = "2026-03-03T09:15:00.000+01:00"
    zero_size = copy.deepcopy(good)
    zero_size["emailData"]["attachments"] = [
        {"id": "a", "name": "n", "contentType": "x/y", "size": 0}
    ]
    results = validate_payloads([good, bad_email, null_key, not_uuid, no_z, zero_size])
    assert [(r["shapeA"], r["shapeB"]) for r in results] == [
        (True, True),
        (False, False),
        (False, False),
        (False, True),
        (False, True),
        (True, False),
    ]
