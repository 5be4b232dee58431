"""Fuzzed MIME: hostile structures (hypothesis) and mutations of real-world-shaped mail.

Property for every input: ``parse_message`` returns an event or raises ``ParseError`` (the
engine dead-letters it) and nothing else escapes; an untraced parse takes at most
``MAX_SECONDS``; tracemalloc's peak stays under ``memory_bound(len(raw))``; every event's
payload passes Alga's zod union and both of its shapes (one node call per test).  The
long version is bench/fuzz_mime.py; the regression tests at the end pin what it found.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imapclient.response_parser import parse_fetch_response

from bench.fuzz_mime import (
    Checked,
    FuzzFailure,
    check_one,
    inputs,
    seed_corpus,
    zod_failures,
)
from shardworker.mime import plan_large_fetch
from shardworker.mime.message import MAX_PARAM_HEADER_CHARS
from tests.mime_support import parse

MUTATED_INPUTS = 1200
TRACE_EVERY = 5

# ----------------------------------------------------------------- hostile structures

_CHARSETS = ["utf-8", "UTF-8", "us-ascii", "iso-8859-1", "windows-1252", "utf-16", "utf-32",
             "utf-7", "iso-2022-jp", "koi8-r", "gb2312", "x-unknown", "", '"utf-8"', "utf8mb4",
             "unicode_escape", "zip", "rot13", "base64", "idna", "punycode", "hex",
             "raw_unicode_escape", "utf-8\x00", "=?utf-8?q?x?=", "a" * 300]  # fmt: skip
_ENCODINGS = ["7bit", "8bit", "binary", "base64", "quoted-printable", "BASE64", "x-uuencode",
              "uuencode", "bogus", ""]  # fmt: skip
_TYPES = ["text/plain", "text/html", "application/octet-stream", "image/png", "message/rfc822",
          "text/calendar", "message/delivery-status", "text", "/", "multipart/alternative",
          "application/pdf", "text/plain/extra", ""]  # fmt: skip
_WORDS = ["=?utf-8?b?w6k=?=", "=?utf-8?b?@@@?=", "=?utf-8?q?=C3=A9?=", "=?utf-8?q?=ZZ?=",
          "=?x-unknown?q?abc?=", "=?utf-16?b?//4=?=", "=?iso-2022-jp?b?GyRCJCIbKEI=?=",
          "=?utf-8*en?q?hi?=", "=?utf-8?q?", "?=", "=?=?utf-8?q?x?=?=", "=??q?x?=",
          "=?utf-8?x?abc?="]  # fmt: skip
_BODIES = [b"hello\r\n", b"SGVsbG8gd29ybGQ=\r\n", b"SGVsbG8@#$%^&*\r\n", b"SGVsbG8\r\n",
           b"=\r\n", b"=ZZ=3D=\r\nsoft=\r\n", b"caf\xe9\r\n", b"\x00\x00\x00", b"\xff\xfe\x00a",
           b"\x1b$B$3$s\x1b(B", b"begin 644 x\r\n#86)C\r\n`\r\nend\r\n", b"",
           b"<html><!-- never closed", b"=?utf-8?b?w6k=?="]  # fmt: skip

_text_fragment = st.one_of(
    st.sampled_from(_WORDS),
    st.text(max_size=20),
    st.sampled_from(
        [
            "<a@example.com>",
            "a@example.com",
            '"x" <b@example.org>',
            ",",
            ";",
            "(comment",
            "\\",
            "@",
            "<>",
            "undisclosed-recipients:;",
        ]
    ),
)
_header_value = st.lists(_text_fragment, max_size=6).map(" ".join)
_header_name = st.sampled_from(
    [
        "From",
        "To",
        "Cc",
        "Subject",
        "Date",
        "Message-ID",
        "References",
        "In-Reply-To",
        "Reply-To",
        "Content-Type",
        "Content-Disposition",
        "Importance",
        "X-Junk",
    ]
)


@st.composite
def _headers(draw: Any) -> bytes:
    lines = [f"{draw(_header_name)}: {draw(_header_value)}".encode("utf-8", "surrogatepass")
             for _ in range(draw(st.integers(0, 8)))]  # fmt: skip
    shape = draw(st.sampled_from(["plain", "repeated", "long", "folded", "nul"]))
    if shape == "repeated":  # thousands of the same header
        lines += [b"Received: from x by y; " + b"z" * 40] * draw(st.integers(100, 3000))
    elif shape == "long":  # one enormous line
        lines.append(b"Subject: " + draw(st.sampled_from([b"a", b"; ", b"=?utf-8?q?x?= ", b'"']))
                     * draw(st.integers(1000, 60_000)))  # fmt: skip
    elif shape == "folded":  # one header over thousands of lines
        lines.append(b"To: a@example.com" + b"\r\n\t, b@example.org" * draw(st.integers(10, 3000)))
    elif shape == "nul":
        lines.append(b"Subject: a\x00b\x00" + draw(st.binary(max_size=20)))
    return b"\r\n".join(lines)


@st.composite
def _leaf(draw: Any) -> bytes:
    ctype = draw(st.sampled_from(_TYPES))
    params = f"; charset={draw(st.sampled_from(_CHARSETS))}" if draw(st.booleans()) else ""
    if draw(st.booleans()):
        name = draw(st.sampled_from(["a.pdf", "=?utf-8?b?w6kucGRm?=", '"unterminated', "../../x",
                                     "a\x00b", "", "x" * 500]))  # fmt: skip
        params += f'; name="{name}"'
    head = f"Content-Type: {ctype}{params}\r\n"
    cte = draw(st.sampled_from(_ENCODINGS))
    if cte:
        head += f"Content-Transfer-Encoding: {cte}\r\n"
    if draw(st.booleans()):
        disposition = draw(st.sampled_from(["attachment", "inline", "bogus", ""]))
        head += f"Content-Disposition: {disposition}; filename*0*=utf-8''%C3%A9; filename*1=x\r\n"
    body = b"".join(draw(st.lists(st.sampled_from(_BODIES), max_size=6))) + draw(
        st.binary(max_size=40)
    )
    return head.encode("utf-8", "surrogatepass") + b"\r\n" + body


def _multipart(children: list[bytes], boundary: str, style: str) -> bytes:
    quoted = {"ok": f'"{boundary}"', "bare": boundary, "empty": '""', "spaces": f'" {boundary} "',
              "long": "b" * 2000, "missing": boundary}[style]  # fmt: skip
    param = "" if style == "missing" else f"; boundary={quoted}"
    out = [f"Content-Type: multipart/mixed{param}\r\n\r\npreamble\r\n".encode()]
    for child in children:
        out.append(f"--{boundary}\r\n".encode() + child + b"\r\n")
    if style != "bare":  # a multipart that never closes
        out.append(f"--{boundary}--\r\nepilogue\r\n".encode())
    return b"".join(out)


_boundary_style = st.sampled_from(["ok", "ok", "bare", "empty", "spaces", "long", "missing"])
_tree = st.recursive(
    _leaf(),
    lambda kids: st.builds(
        _multipart,
        st.lists(kids, min_size=0, max_size=4),
        st.sampled_from(["b1", "b1", "=_x", "b1--", "-", "a b"]),
        _boundary_style,
    ),
    max_leaves=12,
)


@st.composite
def hostile_messages(draw: Any) -> bytes:
    body = draw(_tree)
    depth = draw(st.sampled_from([0, 0, 0, 30, 45, 200]))
    for i in range(depth):  # nesting deeper than the walker's cap, or the stack's
        body = _multipart([body], f"n{i}", "ok")
    raw = draw(_headers()) + b"\r\nMIME-Version: 1.0\r\n" + body
    if draw(st.booleans()):
        raw = raw.replace(b"\r\n", b"\n")
    return raw


def _zod_check(raws: list[bytes], checked: list[Checked]) -> tuple[int, int]:
    """Every payload against zod in one node call; (events, dead letters)."""
    payloads = [(i, c.payload) for i, c in enumerate(checked) if c.payload is not None]
    failed = zod_failures(payloads)
    assert failed == [], [(errors, raws[i][:300]) for i, errors in failed[:3]]
    return len(payloads), len(checked) - len(payloads)


def test_hostile_structures_become_events_or_dead_letters() -> None:
    raws: list[bytes] = []
    checked: list[Checked] = []

    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(raw=hostile_messages())
    def collect(raw: bytes) -> None:
        # An escape or a broken bound fails here, so hypothesis shrinks the input.
        checked.append(check_one(raw, trace_memory=len(raws) % TRACE_EVERY == 0))
        raws.append(raw)

    collect()
    events, dead = _zod_check(raws, checked)
    print(f"hostile structures: {len(raws)} inputs, {events} events, {dead} dead letters")
    assert len(raws) >= 200


def test_mutated_real_world_mail_becomes_events_or_dead_letters() -> None:
    raws = list(inputs(MUTATED_INPUTS, seed=20261127, seeds=seed_corpus()))
    checked: list[Checked] = []
    for i, raw in enumerate(raws):
        try:
            checked.append(check_one(raw, trace_memory=i % TRACE_EVERY == 0))
        except FuzzFailure as failure:
            pytest.fail(f"input {i}: {failure}; it starts {failure.raw[:300]!r}")
    events, dead = _zod_check(raws, checked)
    print(f"mutational fuzz: {len(raws)} inputs, {events} events, {dead} dead letters")
    assert events > len(raws) // 2  # mutation keeps most mail recognisable


# ---------------------------------------------------------------- found by the fuzzer


def _mail(content_type: bytes, parts: bytes) -> bytes:
    return (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n"
            b"Message-ID: <f@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: "
            + content_type + b"\r\n\r\n" + parts)  # fmt: skip


def test_a_content_type_with_thousands_of_parameters_parses_in_bounded_time() -> None:
    """The stdlib's parameter parser is quadratic in ``;``: this took 7.8 s, now ms."""
    raw = _mail(b"multipart/mixed; boundary=b" + b"; filename=x" * 50_000,
                b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b--\r\n")  # fmt: skip
    started = time.perf_counter()
    parsed = parse(raw)
    assert time.perf_counter() - started < 0.5
    assert parsed.email_data["body"]["text"].strip() == "hello"
    assert "mime: ParamHeaderTruncated" in parsed.defects
    assert len(raw) > 60 * MAX_PARAM_HEADER_CHARS


def test_thousands_of_parameters_next_to_8bit_bytes_parse_in_bounded_time() -> None:
    """With 8-bit bytes the stdlib hands back a Header object, not a str (8.1 s before)."""
    raw = _mail(b"text/plain; charset=utf-8; name=\xe9t\xe9" + b"; x=y" * 50_000, b"hello\r\n")
    started = time.perf_counter()
    parsed = parse(raw)
    assert time.perf_counter() - started < 0.5
    assert "mime: ParamHeaderTruncated" in parsed.defects


def test_a_bodystructure_with_thousands_of_parameters_plans_in_bounded_time() -> None:
    """A large message's parameters come from the (possibly hostile) server (1.9 s before)."""
    many = b" ".join(b'"X%d" "a;b;c"' % i for i in range(20_000))
    structure = parse_fetch_response(
        [
            b'1 (BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "utf-8" ' + many + b") NIL NIL "
            b'"7BIT" 100 1 NIL NIL NIL NIL)("APPLICATION" "PDF" ("NAME" "x.pdf" '
            + many
            + b') NIL NIL "BASE64" 90000000 NIL ("ATTACHMENT" ("X" "'
            + b";" * 20_000
            + b'")) NIL) "MIXED"))'
        ]
    )[1][b"BODYSTRUCTURE"]
    started = time.perf_counter()
    plan = plan_large_fetch(structure)
    assert time.perf_counter() - started < 0.5
    assert [a.name for a in plan.attachments] == ["x.pdf"]
    assert plan.text_sections == ["1"]


def test_an_8bit_byte_in_a_base64_attachment_does_not_dead_letter_the_message() -> None:
    """It used to raise UnicodeEncodeError (→ ParseError): the whole message was lost."""
    pdf = base64.b64encode(b"%PDF-1.4\n")
    raw = _mail(b"multipart/mixed; boundary=b",
                b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
                b"Content-Type: application/pdf; charset=utf-16; name=a.pdf\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n" + pdf[:6] + b"\xe9" + pdf[6:]
                + b"\r\n--b--\r\n")  # fmt: skip
    attachment = parse(raw).email_data["attachments"][0]
    assert attachment["name"] == "a.pdf"
    assert base64.b64decode(attachment["content"]) == b"%PDF-1.4\n"


def _nested(depth: int, inner: bytes) -> bytes:
    levels = b"".join(b'Content-Type: multipart/mixed; boundary="n%d"\r\n\r\n--n%d\r\n' % (i, i)
                      for i in range(depth))  # fmt: skip
    return (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: deep\r\n"
            b"MIME-Version: 1.0\r\n" + levels + inner)  # fmt: skip


@pytest.mark.parametrize(
    ("depth", "lines", "eol"),
    [(39, 100_000, b"\r\n"), (900, 100_000, b"\r\n"), (35, 300_000, b"\r")],
)
def test_lines_inside_deep_nesting_cost_bounded_time(depth: int, lines: int, eol: bytes) -> None:
    """The feed parser checks each line against every enclosing boundary: 100k lines 900
    deep took 17 s (25 MB would take tens of minutes).  Now cut at depth 40, or where
    those checks pass a budget linear in the message's lines.  Bare CRs end lines for
    the feed parser too: a CR-only message slipped past a count of LFs (2.8 s)."""
    raw = _nested(depth, b"Content-Type: text/plain\r\n\r\n" + b"x\r\n" * lines)
    raw = raw.replace(b"\r\n", eol)
    started = time.perf_counter()
    parsed = parse(raw)
    assert time.perf_counter() - started < 1.5
    assert "mime_too_deep" in parsed.defects
    assert parsed.email_data["subject"] == "deep"


def test_shallow_mail_and_bodies_that_mention_boundaries_are_not_cut() -> None:
    body = b"".join(b"boundary=b%d; see RFC 2046\r\n" % i for i in range(500))
    raw = _nested(30, b"Content-Type: text/plain\r\n\r\n" + body)
    parsed = parse(raw)
    assert "mime_too_deep" not in parsed.defects
    assert parsed.email_data["body"]["text"].count("boundary=") == 500
