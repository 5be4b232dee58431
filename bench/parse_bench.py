"""Parse time and peak memory of shardworker.mime.parse_message, per message.

    .venv/bin/python bench/parse_bench.py [--repeat N] [--json PATH] [--quiet]

Runs over the MIME corpus (tests/corpus: the issue-13 corpus, good and malformed) and
four generated messages (1.3 KB text/plain, 14 KB multipart/alternative, 2.2 MB with a
1.6 MB attachment, 7 MB with a 5 MB attachment).  For each message: the best of
``--repeat`` untraced parses (the machine is shared: the minimum is the signal), and the
peak of one parse under tracemalloc, in bytes and as a multiple of the message size (the
raw bytes themselves are the caller's and not counted).  ``--json`` writes every row
and the summary.  Light: the corpus takes a few seconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import time
import tracemalloc
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

from shardworker.mime import Caps, parse_message

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "corpus"
HEADERS = {
    "From": '"Alice Example" <alice@example.com>',
    "To": "Bob <bob@example.org>, carol@example.net",
    "Subject": "Quarterly report — numbers inside",
    "Date": "Tue, 03 Mar 2026 10:15:00 +0100",
    "Message-ID": "<bench@example.com>",
}
CAPS = Caps()


def _headers(msg: MIMEMultipart | MIMEText, received: int) -> None:
    for i in range(received):
        msg["Received"] = (
            f"from mx{i}.example.com (mx{i}.example.com [192.0.2.{i}]) by mx.example.org "
            f"with ESMTPS id X{i}; Tue, 03 Mar 2026 10:15:0{i % 10} +0100"
        )
    for name, value in HEADERS.items():
        msg[name] = value


def plain_1k() -> bytes:
    msg = MIMEText("Hello Bob,\n\nthe printer on floor 3 is jammed again.\n" * 8, "plain", "utf-8")
    _headers(msg, received=2)
    return msg.as_bytes()


def alternative_14k() -> bytes:
    text = ("Hello Bob, here are the numbers for the quarter. " * 120)[:6000]
    msg = MIMEMultipart("alternative")
    _headers(msg, received=6)
    msg.attach(MIMEText(text, "plain", "utf-8"))
    html = "<html><body><p>" + text.replace(". ", ".</p><p>") + "</p></body></html>"
    msg.attach(MIMEText(html, "html", "utf-8"))
    return msg.as_bytes()


def with_attachment(size: int, filler: int) -> bytes:
    msg = MIMEMultipart("mixed")
    _headers(msg, received=6)
    msg.attach(MIMEText("See the attached archive.", "plain", "utf-8"))
    msg.attach(MIMEApplication(os.urandom(size), "zip", Name="archive.zip"))
    if filler:
        text = base64.b64encode(os.urandom(filler)).decode()
        msg.attach(MIMEText(f"<html><body><pre>{text}</pre></body></html>", "html", "utf-8"))
    return msg.as_bytes().replace(b"\n", b"\r\n")


def messages() -> list[tuple[str, bytes]]:
    found = [
        (str(p.relative_to(CORPUS)), p.read_bytes())
        for sub in ("issue13", "good", "malformed")
        for p in sorted((CORPUS / sub).glob("*.eml"))
    ]
    found += [
        ("generated/1.3k-text-plain", plain_1k()),
        ("generated/14k-alternative", alternative_14k()),
        ("generated/2.2M-attachment", with_attachment(1600 * 1024, 0)),
        ("generated/7M-attachment", with_attachment(5 * 1024 * 1024, 150 * 1024)),
    ]
    return found


def _parse(raw: bytes) -> None:
    parse_message(raw, uid=1, mailbox="support@example.org", internal_date=None, caps=CAPS)


def measure(name: str, raw: bytes, repeat: int) -> dict[str, Any]:
    rounds = max(1, repeat if len(raw) < 1 << 20 else repeat // 10)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        _parse(raw)
        best = min(best, time.perf_counter() - started)
    tracemalloc.start()
    try:
        _parse(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {
        "message": name,
        "bytes": len(raw),
        "parse_ms": round(best * 1000, 3),
        "peak_bytes": peak,
        "peak_ratio": round(peak / len(raw), 2),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["parse_ms"] for r in rows]
    big = [r for r in rows if r["bytes"] >= 1 << 20]
    return {
        "messages": len(rows),
        "parse_ms_median": round(statistics.median(times), 3),
        "parse_ms_max": max(times),
        "slowest": max(rows, key=lambda r: r["parse_ms"])["message"],
        "peak_ratio_max_over_1MiB": max((r["peak_ratio"] for r in big), default=None),
        "peak_bytes_max": max(r["peak_bytes"] for r in rows),
        "load_average": os.getloadavg()[0],
    }


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="untraced parses per message")
    parser.add_argument("--json", type=Path, help="also write the rows and summary here")
    parser.add_argument("--quiet", action="store_true", help="print the summary only")
    args = parser.parse_args()
    rows = [measure(name, raw, args.repeat) for name, raw in messages()]
    if not args.quiet:
        print(f"{'message':<52}{'size':>11}{'parse':>11}{'peak':>12}{'peak/size':>10}")
        for r in rows:
            print(
                f"{r['message'][:51]:<52}{_size(r['bytes']):>11}{r['parse_ms']:>8.2f} ms"
                f"{_size(r['peak_bytes']):>12}{r['peak_ratio']:>9.2f}x"
            )
    result = summary(rows)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps({"summary": result, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
