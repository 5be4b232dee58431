"""Alga's caps: skipped attachments keep metadata, lose content, and say why."""

from __future__ import annotations

import base64
import hashlib
import os
import tracemalloc

import pytest

from shardworker.mime import Caps
from shardworker.mime.model import PARSE_PEAK_FACTOR
from tests.mime_support import multipart, parse, payload
from tests.zodcheck import validate_payloads

MiB = 1024 * 1024


def test_each_cap_gives_its_reason_in_order() -> None:
    files = [(f"f{i}.bin", "application/octet-stream", bytes([i]) * n) for i, n in
             enumerate([100, 300, 150, 150, 50, 50])]  # fmt: skip
    caps = Caps(max_attachment_bytes=200, max_total_attachment_bytes=320, max_attachments=5)
    data = parse(multipart(files), caps=caps).email_data
    listed = [(a["name"], a["size"], "content" in a) for a in data["attachments"]]
    assert listed == [
        ("f0.bin", 100, True),
        ("f1.bin", 300, False),  # over the per-attachment cap
        ("f2.bin", 150, True),
        ("f3.bin", 150, False),  # 100 + 150 + 150 > 320
        ("f4.bin", 50, True),
        ("f5.bin", 50, False),  # sixth attachment, cap is 5
    ]
    ids = [a["id"] for a in data["attachments"]]
    assert data["ingressSkipReasons"] == [
        {"type": "attachment", "reason": "attachment_over_max_bytes", "attachmentId": ids[1],
         "attachmentName": "f1.bin", "size": 300, "cap": 200},
        {"type": "attachment", "reason": "attachment_total_bytes_exceeded",
         "attachmentId": ids[3], "attachmentName": "f3.bin", "size": 150, "cap": 320},
        {"type": "attachment", "reason": "attachment_count_exceeded", "attachmentId": ids[5],
         "attachmentName": "f5.bin", "size": 50, "cap": 5},
    ]  # fmt: skip
    assert base64.b64decode(data["attachments"][4]["content"]) == b"\x04" * 50


def test_no_content_wanted_means_no_skip_reasons() -> None:
    raw = multipart([("big.bin", "application/octet-stream", b"z" * 5000)])
    data = parse(raw, caps=Caps(include_attachment_content=False, max_attachment_bytes=10))
    [entry] = data.email_data["attachments"]
    assert "content" not in entry and entry["size"] == 5000
    assert "ingressSkipReasons" not in data.email_data


def test_identical_attachments_share_an_id_as_in_alga() -> None:
    raw = multipart([("a.txt", "text/plain", b"same"), ("b.txt", "text/plain", b"same")])
    first, second = parse(raw).email_data["attachments"]
    assert first["id"] == second["id"] == hashlib.md5(b"same").hexdigest()


@pytest.mark.slow
def test_forty_megabyte_message_with_big_attachments() -> None:
    sizes = [6 * MiB, 6 * MiB, 11 * MiB, 6 * MiB, 3 * MiB]
    files = [(f"f{i}.bin", "application/octet-stream", os.urandom(n)) for i, n in enumerate(sizes)]
    raw = multipart(files)
    del files
    assert len(raw) > 40 * 1000 * 1000
    caps = Caps(max_raw_bytes=64 * MiB, max_total_attachment_bytes=20 * MiB)
    tracemalloc.start()
    try:
        parsed = parse(raw, caps=caps)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\n40 MB message: {len(raw) / MiB:.1f} MiB raw, parse peak {peak / MiB:.0f} MiB")
    assert peak < PARSE_PEAK_FACTOR * len(raw)
    data = parsed.email_data
    assert [("content" in a, a["size"]) for a in data["attachments"]] == [
        (True, 6 * MiB), (True, 6 * MiB), (False, 11 * MiB), (True, 6 * MiB), (False, 3 * MiB)
    ]  # fmt: skip
    assert [r["reason"] for r in data["ingressSkipReasons"]] == [
        "attachment_over_max_bytes",
        "attachment_total_bytes_exceeded",
    ]
    [result] = validate_payloads([payload(parsed)])
    assert result["shapeA"] and result["shapeB"], result


def test_caps_from_settings_follow_the_settings() -> None:
    from shardworker.config import Settings

    assert Caps.from_settings(Settings()) == Caps()
    custom = Caps.from_settings(Settings(max_attachments=3, include_raw_mime=True))
    assert custom.max_attachments == 3 and custom.include_raw_mime is True


def _single(ctype: str, body: bytes, cte: str | None = None) -> bytes:
    head = "From: a@example.com\r\nTo: b@example.org\r\nSubject: x\r\nMessage-ID: <s@x>\r\n"
    head += f"Content-Type: {ctype}\r\n"
    if cte:
        head += f"Content-Transfer-Encoding: {cte}\r\n"
    return head.encode() + b"\r\n" + body


def _peak_shapes() -> dict[str, bytes]:
    size = 2 * MiB
    archive = multipart([("a.zip", "application/zip", os.urandom(size * 3 // 4))])
    inner = multipart([("a.zip", "application/zip", os.urandom(size // 2))])
    return {
        "attachment": archive,
        "attached-message": _single("message/rfc822", archive),
        "attached-message-base64": _single(
            "message/rfc822", base64.encodebytes(inner).replace(b"\n", b"\r\n"), "base64"
        ),
        "html-only": _single(
            "text/html; charset=utf-8", b"<p>Hello <b>world</b> &amp; more</p>\r\n" * (size // 38)
        ),
        "8bit-cjk-text": _single(
            "text/plain; charset=utf-8", "日本語のテキスト\r\n".encode() * (size // 26), "8bit"
        ),
        "qp-text": _single(
            "text/plain; charset=utf-8",
            b"caf=C3=A9 au lait=\r\n" * (size // 20),
            "quoted-printable",
        ),
        "many-parts": multipart(
            [(f"f{i}.bin", "application/octet-stream", os.urandom(2000)) for i in range(700)]
        ),
    }


@pytest.mark.parametrize("shape", list(_peak_shapes()))
def test_parse_peak_stays_within_the_documented_factor(shape: str) -> None:
    """PARSE_PEAK_FACTOR is what engine/sync.py sizes its fetch groups by (issue 13: a
    2.2 MB message used to peak at 17 MB, 7.7x)."""
    raw = _peak_shapes()[shape]
    tracemalloc.start()
    try:
        parse(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= PARSE_PEAK_FACTOR * len(raw), f"{shape}: {peak / len(raw):.2f}x"
