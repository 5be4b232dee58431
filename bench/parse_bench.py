"""Micro-benchmark of shardworker.mime.parse_message: ms per message at three sizes.

    .venv/bin/python bench/parse_bench.py [--repeat N]

Also times the stdlib parser alone and ``mailparser.parse_from_bytes`` for comparison.
Numbers are the best of five rounds (the machine is shared; the minimum is the signal).
"""

from __future__ import annotations

import argparse
import base64
import email
import os
import timeit
from collections.abc import Callable
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import mailparser

from shardworker.mime import Caps, parse_message

HEADERS = {
    "From": '"Alice Example" <alice@example.com>',
    "To": "Bob <bob@example.org>, carol@example.net",
    "Subject": "Quarterly report — numbers inside",
    "Date": "Tue, 03 Mar 2026 10:15:00 +0100",
    "Message-ID": "<bench@example.com>",
}


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


def attachment_7m() -> bytes:
    msg = MIMEMultipart("mixed")
    _headers(msg, received=6)
    msg.attach(MIMEText("See the attached archive.", "plain", "utf-8"))
    msg.attach(MIMEApplication(os.urandom(5 * 1024 * 1024), "zip", Name="archive.zip"))
    # Base64 text and an HTML alternative bring it to about 7 MB.
    filler = base64.b64encode(os.urandom(150 * 1024)).decode()
    msg.attach(MIMEText(f"<html><body><pre>{filler}</pre></body></html>", "html", "utf-8"))
    return msg.as_bytes()


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    return min(timeit.repeat(fn, number=repeat, repeat=5)) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=200, help="messages per round (small)")
    args = parser.parse_args()
    caps = Caps()
    print(f"{'message':<28}{'size':>10}{'parse_message':>16}{'stdlib':>10}{'mail-parser':>13}")
    for label, raw, repeat in (
        ("1.3 KB text/plain", plain_1k(), args.repeat),
        ("14 KB multipart/alternative", alternative_14k(), args.repeat),
        ("7 MB with 5 MB attachment", attachment_7m(), max(1, args.repeat // 100)),
    ):
        ours = best_ms(
            lambda raw=raw: parse_message(
                raw, uid=1, mailbox="support@example.org", internal_date=None, caps=caps
            ),
            repeat,
        )
        stdlib = best_ms(lambda raw=raw: email.message_from_bytes(raw), repeat)
        theirs = best_ms(lambda raw=raw: mailparser.parse_from_bytes(raw), repeat)
        size = f"{len(raw) / 1024:.1f} KiB" if len(raw) < 1 << 20 else f"{len(raw) / 2**20:.1f} MiB"
        print(f"{label:<28}{size:>10}{ours:>13.2f} ms{stdlib:>7.2f} ms{theirs:>10.2f} ms")


if __name__ == "__main__":
    main()
