"""Property: whatever bytes arrive, parse_message returns a valid event or raises ParseError."""

from __future__ import annotations

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardworker.errors import ParseError
from shardworker.mime.addresses import is_zod_email
from tests.mime_support import find_none, parse

_NAMES = ["From", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID", "References",
          "In-Reply-To", "Content-Type", "Content-Transfer-Encoding", "Content-Disposition",
          "Content-ID", "Importance", "X-Priority", "MIME-Version", "Received",
          "X-Junk"]  # fmt: skip
_FRAGMENTS = [b"=?utf-8?q?", b"=?iso-2022-jp?b?", b"?=", b"<", b">", b"@", b'"', b";", b",",
              b"multipart/mixed; boundary=", b"text/plain; charset=", b"base64",
              b"quoted-printable", b"attachment; filename=", b"\xe9", b"\xff\xfe", b"\x00",
              b"\x1b$B", b"\r\n ", b"a@example.com", b"utf-16", b"=?x?q?=ZZ?="]  # fmt: skip

_value = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.binary(max_size=12)), max_size=8).map(
    b"".join
)
_header = st.tuples(st.sampled_from(_NAMES), _value).map(lambda t: t[0].encode() + b": " + t[1])
_boundary_line = st.sampled_from([b"--b", b"--b--", b"--", b"Content-Type: text/html", b""])
_body = st.lists(st.one_of(_boundary_line, st.binary(max_size=40), _value), max_size=12).map(
    b"\r\n".join
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(headers=st.lists(_header, max_size=14), body=_body, sep=st.sampled_from([b"\r\n", b"\n"]))
def test_no_exception_but_parse_error_escapes(
    headers: list[bytes], body: bytes, sep: bytes
) -> None:
    raw = sep.join(headers) + sep + sep + body
    try:
        parsed = parse(raw)
    except ParseError:
        return
    data = parsed.email_data
    assert find_none(data) == []
    assert is_zod_email(data["from"]["email"])
    assert data["to"] and all(is_zod_email(a["email"]) for a in data["to"])
    assert isinstance(data["body"]["text"], str) and isinstance(data["subject"], str)
    assert all(a["size"] > 0 for a in data.get("attachments", []))
    orjson.dumps(data)  # no lone surrogates, nothing unserializable
