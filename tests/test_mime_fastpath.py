"""The structure parser's fast paths give exactly what the slow paths give (issue 14).

Each fast path is a shortcut that must not change a single field: these tests run both
paths over the whole corpus (tests/corpus) and the fuzzer's mutations of it, and compare.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fuzz_mime import inputs, seed_corpus
from shardworker.mime.message import CHECKS_PER_LINE, _NestingScan, limit_nesting

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
