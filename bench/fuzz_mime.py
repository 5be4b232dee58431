"""Mutational MIME fuzzer: no exception but ParseError, bounded time and memory, valid events.

    PYTHONPATH=. .venv/bin/python bench/fuzz_mime.py [--inputs 100000] [--seed 1]
        [--memory-every 10] [--zod-batch 2000] [--save-dir DIR]

Seeds are tests/corpus/ (good and malformed) plus generated real-world-shaped messages
(threads, multipart/alternative, attachments, inline images, forwarded messages, DSNs,
signed mail, calendar invites, ISO-2022-JP and windows-1252 text, RFC 2231 filenames).
Each input is a seed with 1-4 mutations: bit flips, byte insertions and deletions, chunk
duplication, boundary duplication and truncation, header and folding explosions, hostile
tokens (encoded words, NULs, bad charsets, base64/QP junk), splices of two seeds, line
ending swaps, truncation.

Property per input: ``parse_message`` returns an event or raises ``ParseError`` (a dead
letter) — nothing else escapes; it takes at most ``MAX_SECONDS``; tracemalloc's peak
stays under ``memory_bound(len(raw))``; every event payload passes Alga's zod union and
both shapes (tests/zod, batched).  Prints the counts and the slowest inputs; failing
inputs are written to ``--save-dir`` when given.  tests/test_fuzz_mime.py runs a bounded
version of the same loop.
"""

from __future__ import annotations

import argparse
import base64
import random
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from shardworker.errors import ParseError
from shardworker.mime import Caps, build_payload, parse_message

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "corpus"
MAX_SECONDS = 2.0
# Inputs are cut to this: the time bound is for messages of a realistic size (parse_message
# sees at most max_raw_bytes, 25 MB; bigger ones take the parse_large path).
MAX_INPUT_BYTES = 1024 * 1024
TENANT = "3f0e6a52-7a43-4d55-9a7e-6c1f1f5f0b11"
PROVIDER = "9b1c2d3e-4f50-4a6b-8c7d-0e1f2a3b4c5d"
MAILBOX = "support@example.org"
INTERNAL_DATE = datetime(2026, 3, 3, 12, 0, tzinfo=UTC)
CAPS = Caps()
RATIO_MIN_BYTES = 64 * 1024  # below this the fixed allowance dominates any ratio


def memory_bound(size: int) -> int:
    """Peak bytes allowed for parsing ``size`` bytes of input.

    The stdlib parser holds the message as text and as lines, decoded parts sit beside
    their encoded form and attachments are base64 again in the event: a few dozen copies
    in the worst measured case, plus a fixed allowance for the parser's own structures.
    """
    return 40 * size + 16 * 1024 * 1024


# --------------------------------------------------------------------------- checking


class FuzzFailure(AssertionError):
    """An input broke the property; ``raw`` reproduces it."""

    def __init__(self, message: str, raw: bytes) -> None:
        super().__init__(message)
        self.raw = raw


@dataclass(frozen=True)
class Checked:
    size: int
    seconds: float
    peak_bytes: int  # 0 when memory was not traced
    payload: dict[str, Any] | None  # None: ParseError, i.e. a dead letter
    error: str = ""


def check_one(raw: bytes, *, trace_memory: bool) -> Checked:
    """Parse ``raw`` once; FuzzFailure when an exception escapes or a bound is broken."""
    if trace_memory:
        tracemalloc.start()
    started = time.perf_counter()
    try:
        parsed = parse_message(raw, uid=7, mailbox=MAILBOX, internal_date=INTERNAL_DATE,
                               caps=CAPS)  # fmt: skip
    except ParseError as exc:
        parsed, error = None, str(exc)
    except BaseException as exc:  # the property under test: nothing else may escape
        raise FuzzFailure(f"{type(exc).__name__} escaped parse_message: {exc}", raw) from exc
    else:
        error = ""
    finally:
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] if trace_memory else 0
        if trace_memory:
            tracemalloc.stop()
    # Tracing slows allocation-heavy parsing several times over: time only untraced runs.
    if seconds > MAX_SECONDS and not trace_memory:
        raise FuzzFailure(f"parse took {seconds:.2f} s (> {MAX_SECONDS} s)", raw)
    if peak > memory_bound(len(raw)):
        raise FuzzFailure(f"peak {peak >> 20} MiB for {len(raw)} bytes", raw)
    payload = None
    if parsed is not None:
        payload = build_payload(
            tenant=TENANT, provider_id=PROVIDER, email_data=parsed.email_data,
            occurred_at=INTERNAL_DATE,
        )  # fmt: skip
    return Checked(len(raw), seconds, peak, payload, error)


# ------------------------------------------------------------------------------ seeds

_WORDS = ("printer", "invoice", "outage", "password", "urgent", "ticket", "café", "Zürich",
          "naïve", "résumé", "server", "backup", "license", "meeting", "thanks")  # fmt: skip


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _head(rng: random.Random, i: int, ctype: str, extra: str = "") -> str:
    sender = f"user{rng.randint(1, 99)}@customer{rng.randint(1, 9)}.example.com"
    return (
        f"Received: from mx{rng.randint(1, 9)}.example.net (mx.example.net [192.0.2.1])\r\n"
        f"\tby imap.example.com with ESMTPS; {format_datetime(INTERNAL_DATE)}\r\n"
        f'From: "Customer {i}" <{sender}>\r\nTo: Support <support@example.org>, '
        f"=?utf-8?q?J=C3=BCrgen?= <j@example.org>\r\nCc: ops@example.org\r\n"
        f"Subject: =?utf-8?b?{base64.b64encode(_text(rng, 5).encode()).decode()}?=\r\n"
        f"Date: {format_datetime(INTERNAL_DATE)}\r\nMessage-ID: <seed-{i}@example.com>\r\n"
        f"In-Reply-To: <parent-{i}@example.com>\r\n"
        f"References: <root-{i}@example.com> <parent-{i}@example.com>\r\n"
        f"MIME-Version: 1.0\r\n{extra}Content-Type: {ctype}\r\n"
    )


def _b64(data: bytes) -> str:
    return base64.encodebytes(data).decode().replace("\n", "\r\n")


def _alternative(rng: random.Random, i: int) -> bytes:
    text = _text(rng, 60)
    return (
        _head(rng, i, 'multipart/alternative; boundary="alt-b"') + "\r\n--alt-b\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: "
        f"quoted-printable\r\n\r\n{text.replace('ü', '=C3=BC')}=\r\n\r\n--alt-b\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n"
        f"<html><body><p>{text}</p></body></html>\r\n--alt-b--\r\n"
    ).encode()


def _mixed(rng: random.Random, i: int) -> bytes:
    pdf = b"%PDF-1.4\n" + rng.randbytes(rng.randint(100, 3000))
    png = b"\x89PNG\r\n\x1a\n" + rng.randbytes(rng.randint(50, 800))
    return (
        _head(rng, i, 'multipart/mixed; boundary="mix-b"') + "\r\n--mix-b\r\n"
        'Content-Type: multipart/related; boundary="rel-b"\r\n\r\n--rel-b\r\n'
        f"Content-Type: text/html; charset=iso-8859-1\r\n\r\n<p>{_text(rng, 20)}</p>"
        '<img src="cid:img1@x">\r\n--rel-b\r\nContent-Type: image/png\r\n'
        "Content-ID: <img1@x>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        f"{_b64(png)}--rel-b--\r\n--mix-b\r\nContent-Type: application/pdf; name=r.pdf\r\n"
        "Content-Disposition: attachment; filename*=UTF-8''R%C3%A9sum%C3%A9.pdf\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{_b64(pdf)}--mix-b--\r\n"
    ).encode()


def _forwarded(rng: random.Random, i: int) -> bytes:
    inner = _alternative(rng, i + 100_000).decode()
    return (
        _head(rng, i, 'multipart/mixed; boundary="fw-b"') + "\r\n--fw-b\r\n"
        f"Content-Type: text/plain\r\n\r\nSee below: {_text(rng, 10)}\r\n--fw-b\r\n"
        "Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n"
        f"{inner}\r\n--fw-b--\r\n"
    ).encode()


def _dsn(rng: random.Random, i: int) -> bytes:
    return (
        _head(rng, i, 'multipart/report; report-type=delivery-status; boundary="dsn-b"')
        + "\r\n--dsn-b\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n--dsn-b\r\n"
        "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n"
        "\r\nFinal-Recipient: rfc822; gone@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "\r\n--dsn-b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Subject: {_text(rng, 4)}\r\nMessage-ID: <orig-{i}@example.com>\r\n\r\n--dsn-b--\r\n"
    ).encode()


def _signed(rng: random.Random, i: int) -> bytes:
    ctype = 'multipart/signed; protocol="application/pkcs7-signature"; boundary="sig-b"'
    return (
        _head(rng, i, ctype)
        + f"\r\n--sig-b\r\nContent-Type: text/plain; charset=windows-1252\r\n\r\n"
        f"{_text(rng, 30)}\r\n--sig-b\r\nContent-Type: application/pkcs7-signature; "
        f'name="smime.p7s"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        f"{_b64(rng.randbytes(300))}--sig-b--\r\n"
    ).encode("latin-1", "replace")


def _calendar(rng: random.Random, i: int) -> bytes:
    return (
        _head(rng, i, 'multipart/alternative; boundary="cal-b"') + "\r\n--cal-b\r\n"
        f"Content-Type: text/plain\r\n\r\nMeeting: {_text(rng, 6)}\r\n--cal-b\r\n"
        "Content-Type: text/calendar; method=REQUEST; charset=utf-8\r\n\r\n"
        "BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\nSUMMARY:Sync\r\n"
        "DTSTART:20260303T120000Z\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n--cal-b--\r\n"
    ).encode()


def _japanese(rng: random.Random, i: int) -> bytes:
    body = "お問い合わせありがとうございます。".encode("iso-2022-jp")
    head = _head(rng, i, "text/plain; charset=iso-2022-jp", "Content-Transfer-Encoding: 7bit\r\n")
    return head.encode() + b"\r\n" + body + b"\r\n"


GENERATORS: tuple[Callable[[random.Random, int], bytes], ...] = (
    _alternative, _mixed, _forwarded, _dsn, _signed, _calendar, _japanese,
)  # fmt: skip


def seed_corpus(generated: int = 60, seed: int = 0) -> list[bytes]:
    """tests/corpus/ (good and malformed) plus ``generated`` real-world-shaped messages."""
    seeds = [p.read_bytes() for p in sorted(CORPUS.glob("*/*.eml"))]
    rng = random.Random(seed)
    seeds += [GENERATORS[i % len(GENERATORS)](rng, i) for i in range(generated)]
    return seeds


# --------------------------------------------------------------------------- mutation

TOKENS = (
    b"\x00", b"\r\n", b"\n\n", b"\r\n\r\n", b"\r\n ", b"--", b"=?", b"?=", b"=?utf-8?b?",
    b"=?utf-8?q?=ZZ", b"=?x-unknown?q?abc?=", b"=?utf-7?b?K0FHRQ==?=", b"=?iso-2022-jp?b?GyRC",
    b"charset=", b'charset="utf-16"', b"charset=zip", b"charset=unicode_escape", b"\\u12",
    b"boundary=", b'boundary=""', b"multipart/mixed", b"message/rfc822", b"base64",
    b"quoted-printable", b"=\r\n", b"=3D", b"====", b"\xff\xfe", b"\xe9", b"\xc3", b"\x1b$B",
    b"<", b">", b"@", b'"', b";", b",", b"(", b")", b"\\", b"filename*0*=utf-8''%FF",
    b"filename*1=", b"Content-Type: ", b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Disposition: attachment; filename=", b"\t", b"\x80\x81\x82",
)  # fmt: skip


def _bit_flip(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _flip in range(rng.randint(1, 8)):
        if buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _insert_bytes(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    at = rng.randint(0, len(data))
    blob = rng.choice(TOKENS) if rng.random() < 0.7 else rng.randbytes(rng.randint(1, 32))
    return data[:at] + blob * rng.choice((1, 1, 2, 50)) + data[at:]


def _delete_range(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    if not data:
        return data
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.randint(1, 64) :]


def _duplicate_chunk(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    if not data:
        return data
    at = rng.randrange(len(data))
    chunk = data[at : at + rng.randint(1, 512)]
    return data[:at] + chunk * rng.randint(2, 20) + data[at:]


def _boundaries(data: bytes) -> list[bytes]:
    return [line.rstrip() for line in data.split(b"\n") if line.startswith(b"--") and len(line) > 3]


def _duplicate_boundary(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    lines = _boundaries(data)
    if not lines:
        return _insert_bytes(rng, data, _)
    line = rng.choice(lines)
    at = rng.randint(0, len(data))
    variant = rng.choice((line, line + b"--", line[:-1], line + b" junk", line.rstrip(b"-")))
    return data[:at] + b"\r\n" + variant + b"\r\n" + data[at:]


def _truncate_boundary(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    lines = _boundaries(data)
    if not lines:
        return _delete_range(rng, data, _)
    line = rng.choice(lines)
    return data.replace(line, line[: rng.randint(2, len(line))], rng.randint(1, 3))


def _header_explosion(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    line = rng.choice(lines) if lines else b"X-Junk: x"
    kind = rng.randrange(3)
    if kind == 0:  # the same header many times
        extra = (line + b"\r\n") * rng.randint(100, 3000)
    elif kind == 1:  # one header folded over many lines
        extra = line + b"".join(b"\r\n " + rng.choice(TOKENS).strip() + b"x" for _ in range(2000))
        extra += b"\r\n"
    else:  # one enormous line
        extra = line + b" " + rng.choice(TOKENS) * rng.randint(1000, 50_000) + b"\r\n"
    return extra + head + sep + body


def _splice(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    other = rng.choice(seeds)
    return data[: rng.randint(0, len(data))] + other[rng.randint(0, len(other)) :]


def _line_endings(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    choice = rng.randrange(3)
    if choice == 0:
        return data.replace(b"\r\n", b"\n")
    if choice == 1:
        return data.replace(b"\r\n", b"\r")
    return data.replace(b"\n", b"\r\n")


def _truncate(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    return data[: rng.randint(0, len(data))]


def _nest(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    depth = rng.choice((5, 50, 300))
    head = b"".join(
        b'Content-Type: multipart/mixed; boundary="n%d"\r\n\r\n--n%d\r\n' % (i, i)
        for i in range(depth)
    )
    return b"From: a@example.com\r\nMIME-Version: 1.0\r\n" + head + data


MUTATORS: tuple[Callable[[random.Random, bytes, list[bytes]], bytes], ...] = (
    _bit_flip, _insert_bytes, _delete_range, _duplicate_chunk, _duplicate_boundary,
    _truncate_boundary, _header_explosion, _splice, _line_endings, _truncate, _nest,
)  # fmt: skip


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = rng.choice(seeds)
    for _ in range(rng.randint(1, 4)):
        data = rng.choice(MUTATORS)(rng, data, seeds)[:MAX_INPUT_BYTES]
    return data


def inputs(count: int, seed: int, seeds: list[bytes]) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        yield mutate(rng, seeds)


# ---------------------------------------------------------------------------- running


@dataclass
class FuzzStats:
    tried: int = 0
    events: int = 0
    dead_letters: int = 0
    zod_checked: int = 0
    failures: list[FuzzFailure] = field(default_factory=list)
    slowest: list[tuple[float, int, int]] = field(default_factory=list)  # (s, size, index)
    max_peak_bytes: int = 0
    max_peak_ratio: float = 0.0  # among inputs of at least RATIO_MIN_BYTES
    bytes_in: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def note(self, index: int, checked: Checked) -> None:
        self.tried += 1
        self.bytes_in += checked.size
        if checked.payload is None:
            self.dead_letters += 1
            self.errors[checked.error.split(": ", 1)[-1][:60]] += 1
        else:
            self.events += 1
        self.slowest.append((checked.seconds, checked.size, index))
        self.slowest = sorted(self.slowest, reverse=True)[:10]
        self.max_peak_bytes = max(self.max_peak_bytes, checked.peak_bytes)
        if checked.peak_bytes and checked.size >= RATIO_MIN_BYTES:
            self.max_peak_ratio = max(self.max_peak_ratio, checked.peak_bytes / checked.size)


def zod_failures(payloads: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, Any]]:
    """(input index, zod errors) of every payload that fails the union or a shape."""
    from tests.zodcheck import validate_payloads

    results = validate_payloads([p for _, p in payloads])
    return [
        (index, result.get("errors"))
        for (index, _), result in zip(payloads, results, strict=True)
        if not (result["union"] and result["shapeA"] and result["shapeB"])
    ]


def run(args: argparse.Namespace) -> FuzzStats:
    seeds = seed_corpus()
    stats = FuzzStats()
    batch: list[tuple[int, dict[str, Any]]] = []
    raws: dict[int, bytes] = {}
    started = time.monotonic()
    for index, raw in enumerate(inputs(args.inputs, args.seed, seeds)):
        try:
            checked = check_one(raw, trace_memory=index % args.memory_every == 0)
        except FuzzFailure as failure:
            stats.failures.append(failure)
            print(f"FAIL input {index}: {failure}", flush=True)
            continue
        stats.note(index, checked)
        if checked.payload is not None:
            batch.append((index, checked.payload))
            raws[index] = raw
        if len(batch) >= args.zod_batch:
            _validate(batch, raws, stats)
        if index and index % 10_000 == 0:
            print(f"  ... {index} inputs, {time.monotonic() - started:.0f} s", flush=True)
    _validate(batch, raws, stats)
    return stats


def _validate(
    batch: list[tuple[int, dict[str, Any]]], raws: dict[int, bytes], stats: FuzzStats
) -> None:
    for index, errors in zod_failures(batch):
        failure = FuzzFailure(f"input {index}: payload fails Alga's zod schemas: {errors}",
                              raws[index])  # fmt: skip
        stats.failures.append(failure)
        print(f"FAIL {failure}", flush=True)
    stats.zod_checked += len(batch)
    batch.clear()
    raws.clear()


def report(stats: FuzzStats, wall_s: float) -> None:
    print(f"\nfuzz_mime: {stats.tried + len(stats.failures)} inputs in {wall_s:.0f} s "
          f"({stats.bytes_in / 1e6:.0f} MB)")  # fmt: skip
    print(f"  events           {stats.events} (all zod-checked: {stats.zod_checked})")
    print(f"  dead letters     {stats.dead_letters} (ParseError)")
    print(f"  failures         {len(stats.failures)}")
    print(f"  memory (traced)  peak {stats.max_peak_bytes / 2**20:.1f} MiB; "
          f"{stats.max_peak_ratio:.1f}x input size at most for inputs >= 64 KiB")  # fmt: skip
    print("  slowest inputs   " + ", ".join(f"#{i} {s * 1000:.0f} ms ({n} B)"
                                            for s, n, i in stats.slowest))  # fmt: skip
    for reason, n in stats.errors.most_common(5):
        print(f"  dead-letter reason {n:6d}  {reason}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--memory-every", type=int, default=10, help="trace memory of every Nth")
    parser.add_argument("--zod-batch", type=int, default=2000)
    parser.add_argument("--save-dir", type=Path, default=None)
    args = parser.parse_args()
    started = time.monotonic()
    stats = run(args)
    report(stats, time.monotonic() - started)
    if args.save_dir is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        for n, failure in enumerate(stats.failures):
            (args.save_dir / f"failure-{n}.eml").write_bytes(failure.raw)
    return 1 if stats.failures else 0


if __name__ == "__main__":
    sys.exit(main())
