"""The structure parser's fast paths give exactly what the slow paths give (issue 14).

Each fast path is a shortcut that must not change a single field: these tests run both
paths over the whole corpus (tests/corpus) and the fuzzer's mutations of it, and compare.
"""

from __future__ import annotations

import random
import re
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from bench.fuzz_mime import inputs, seed_corpus
from shardworker.mime.fixups import scrub_strings
from shardworker.mime.lean import parse_clean
from shardworker.mime.message import (
    CHECKS_PER_LINE,
    BoundedMessage,
    _feed,
    _NestingScan,
    limit_nesting,
)

CORPUS = Path(__file__).resolve().parent / "corpus"
CORPUS_RAW = [p.read_bytes() for p in sorted(CORPUS.glob("*/*.eml"))]
SEEDS = seed_corpus()
MUTATED = list(inputs(800, 5, SEEDS))


def _declarations(raw: bytes) -> int:
    return raw.lower().count(b"boundary")


def test_few_declarations_are_never_cut() -> None:
    """limit_nesting skips the scan for up to four declarations: the scan agrees."""
    few = [raw for raw in CORPUS_RAW + SEEDS + MUTATED if _declarations(raw) <= CHECKS_PER_LINE]
    assert len(few) > 500
    assert [i for i, raw in enumerate(few) if _NestingScan(raw).cut_at() is not None] == []


@pytest.mark.parametrize("depth", [4, 5])
def test_four_open_multiparts_stay_within_the_budget(depth: int) -> None:
    """The bound the shortcut relies on: four open multiparts over every line is exactly
    the budget (not over it); a fifth declaration goes to the scan, which cuts."""
    head = b"".join(
        b'Content-Type: multipart/mixed; boundary="n%d"\r\n\r\n--n%d\r\n' % (i, i)
        for i in range(depth)
    )
    raw = head + b"Content-Type: text/plain\r\n\r\n" + b"x\r\n" * 400_000
    assert (_NestingScan(raw).cut_at() is None) == (depth <= CHECKS_PER_LINE)
    defects: list[str] = []
    assert (limit_nesting(raw, defects) == raw) == (depth <= CHECKS_PER_LINE)
    assert (defects == ["mime_too_deep"]) == (depth > CHECKS_PER_LINE)


# ------------------------------------------------------- the lean structure parser


def _state(msg: Message) -> dict[str, Any]:
    """Everything a Message holds, its parts included (defects by type)."""
    state = {k: v for k, v in vars(msg).items() if k != "_sw_params"}
    payload = state.pop("_payload")
    state["defects"] = [type(d).__name__ for d in state["defects"]]
    state["class"] = type(msg).__name__
    state["payload"] = [_state(p) for p in payload] if isinstance(payload, list) else payload
    return state


def _same_tree_or_gave_up(raw: bytes) -> bool:
    """True when parse_clean gave the feed parser's tree, False when it gave up."""
    clean = parse_clean(raw, BoundedMessage)
    if clean is None:
        return False
    assert _state(clean) == _state(_feed(raw)), raw[:300]
    return True


def test_clean_parse_is_the_feed_parsers_tree_on_the_corpus() -> None:
    read = [_same_tree_or_gave_up(raw) for raw in CORPUS_RAW + SEEDS]
    assert sum(read) > 0.8 * len(read)  # the corpus is mostly well-formed mail


def test_clean_parse_is_the_feed_parsers_tree_on_mutations() -> None:
    read = [_same_tree_or_gave_up(raw) for raw in MUTATED]
    assert sum(read) > 200


_BOUNDARIES = ("b", "b1", "b-x", "=_Part_1.2", "a:b", "with space", "b--", "'b'")
_BODY_LINES = ("text", "", "--", "-- ", "--{b}x", "--{b}--x", "--{b} \t", "--{b}--  ",
               "--{o}", "--{b}", "--{b}--", "From me", "a\rb", "Content-Type: text/plain",
               " folded", ":colon", "caf\xe9")  # fmt: skip


class _Builder:
    """Random multipart messages near the edges of the feed parser's rules."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.eol = "\r\n"

    def line(self, text: str) -> str:
        eol = self.eol if self.rng.random() < 0.995 else self.rng.choice(("\n", "\r\n", "\r"))
        return text + eol

    def headers(self, ctype: str | None) -> str:
        rng = self.rng
        out = [self.line("X-Note: one") + self.line(" folded")] if rng.random() < 0.3 else []
        if ctype is not None:
            out.append(self.line(f"Content-Type: {ctype}"))
        if rng.random() < 0.04:
            out.append(self.line(rng.choice(("From x", "bad line", ":x", " lead", "Cte: 8bit"))))
        rng.shuffle(out)
        return "".join(out) + ("" if rng.random() < 0.03 else self.line(""))

    def body(self, boundary: str, outer: str) -> str:
        picks = self.rng.choices(_BODY_LINES, k=self.rng.randint(0, 4))
        weights = [0.9 if p in ("text", "", "caf\xe9") else 0.08 for p in picks]
        kept = [p for p, w in zip(picks, weights, strict=True) if self.rng.random() < w]
        return "".join(self.line(p.format(b=boundary, o=outer)) for p in kept)

    def multipart(self, depth: int, outer: str) -> str:
        rng = self.rng
        boundary = rng.choice(_BOUNDARIES) if rng.random() < 0.95 else outer
        sub = rng.choices(("mixed", "alternative", "related", "digest"), (5, 5, 3, 1))[0]
        quoted = f'"{boundary}"' if rng.random() < 0.7 or " " in boundary else boundary
        extra = rng.choice(("Content-Transfer-Encoding: base64", "Cte: 7bit"))
        head = self.headers(f"multipart/{sub}; boundary={quoted}")
        if rng.random() < 0.05:
            head = self.line(extra) + head
        parts = []
        for i in range(rng.choices((0, 1, 2, 3), (1, 4, 4, 2))[0]):
            end = rng.choices(("", " ", "\t", "--"), (20, 2, 2, 1 if i else 0))[0]
            delimiter = "--" + boundary + end
            if depth < 3 and rng.random() < 0.3:
                inner = self.multipart(depth + 1, boundary)
            else:
                ctype = rng.choice((None, "text/plain", "text/html; charset=utf-8",
                                    "message/rfc822", "application/octet-stream"))  # fmt: skip
                inner = self.headers(ctype) + self.body(boundary, outer)
            parts.append(self.line(delimiter) + inner)
            if rng.random() < 0.02:
                parts.append(self.line(delimiter))
        close = "--" + boundary + "--" + rng.choices(("", " ", "x"), (20, 3, 1))[0]
        ending = rng.choices(
            (self.line(close), close, "", self.line(close) + "epilogue"), (12, 2, 1, 3)
        )[0]
        preamble = self.body(boundary, outer) if rng.random() < 0.3 else ""
        return head + preamble + "".join(parts) + ending + self.body(boundary, outer)

    def message(self) -> bytes:
        self.eol = self.rng.choice(("\r\n", "\n"))
        head = self.line("From: a@example.com") + self.line("Subject: s")
        text = head + self.multipart(0, "outer")
        return text.encode("utf-8", "surrogateescape")


def test_clean_parse_is_the_feed_parsers_tree_near_the_edges() -> None:
    """Delimiters with trailing blanks, close delimiters, reused and prefix boundaries,
    missing blank lines and close delimiters, bare CRs, digests: same tree or none."""
    read = [_same_tree_or_gave_up(_Builder(seed).message()) for seed in range(4000)]
    assert 1000 < sum(read) < 3600  # both paths are exercised


# ------------------------------------------------- parameters parsed once per header

_PARAMS = ("charset", "CHARSET", "name", "filename", "boundary", "format", "missing", "")


def _every_part(raw: bytes) -> list[Message]:
    msg = _feed(raw)
    return list(msg.walk())


def test_parameter_lookups_match_the_stdlib() -> None:
    """BoundedMessage.get_param keeps each header's parsed list: the same answers as
    Message.get_param, for every parameter and part of the corpus and the mutations."""
    compared = 0
    for raw in CORPUS_RAW + MUTATED[:60]:
        for part in _every_part(raw):
            for header in ("content-type", "Content-Disposition", "x-missing"):
                for param in _PARAMS:
                    for unquote in (True, False):
                        got = part.get_param(param, "none", header, unquote)
                        assert got == Message.get_param(part, param, "none", header, unquote)
                        compared += 1
    assert compared > 20_000


def test_a_changed_header_is_parsed_again() -> None:
    part = BoundedMessage()
    part["Content-Type"] = 'text/plain; charset="utf-8"'
    assert part.get_param("charset") == "utf-8"
    part.replace_header("Content-Type", "text/plain; charset=koi8-r")
    assert part.get_param("charset") == "koi8-r"
    del part["Content-Type"]
    assert part.get_param("charset", "gone") == "gone"


# ------------------------------------------------------------ the string scrubber


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii",
        "café " * 100,  # Latin-1 only: no surrogate can be there
        "naïve — “quotes” € " * 100,  # beyond Latin-1
        "日本語のテキスト" * 200,
        "emoji 😀 " * 100,  # astral characters are not surrogates in a str
        "x" * 300 + "\udce9",  # a lone surrogate (8-bit byte) at the end
        "\ud800" + "é" * 300,  # at the start
        "é" * 300_000 + "\udcff" + "é" * 10,  # in the second piece
        "short \udce9",
        "nul\x00inside " * 20,
        "nul\x00 and \udce9 " * 20,
    ],
)
def test_scrub_strings_finds_every_surrogate_and_nul(text: str) -> None:
    defects: list[str] = []
    expected = re.sub("[\ud800-\udfff]", "\ufffd", text.replace("\x00", ""))
    assert scrub_strings({"k": [text]}, defects) == {"k": [expected]}
    assert ("nul_removed" in defects) == ("\x00" in text)
