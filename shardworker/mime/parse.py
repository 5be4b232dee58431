"""Raw RFC 5322 bytes → Alga's ``emailData`` (a pure function, no I/O).

Structure comes from the stdlib's compat32 parser (the same one mail-parser drives);
addresses and dates from mail-parser's own parsers; bodies, headers and attachments are
decoded here because mail-parser gets several of them wrong (see ``fixups``).  Running
``mailparser.parse_from_bytes`` itself was measured at 2.0 ms for a 14 KB message with six
Received headers, most of it spent on sender-IP forensics this service never reads,
against a budget of about 1 ms for the whole parse.

Fallbacks, so that malformed mail still becomes an event:

* no usable Message-ID → ``imap-hash-<sha256 of the raw bytes>-<uid>`` (stable across
  re-fetches); a duplicated Message-ID header → the last one (mail-parser's answer to Alga);
* From missing or invalid → ``{"email": "unknown-sender@invalid.invalid", "name": <the
  original header text, if any>}``;
* To missing, invalid or empty (a Bcc delivery) → ``[{"email": <the provider's mailbox>}]``,
  or ``undisclosed-recipients@invalid.invalid`` when the mailbox is not a valid address;
* invalid or missing Date → INTERNALDATE → now;
* an HTML-only message gets a plain-text body derived from the HTML;
* an empty attachment is left out of the list (Alga requires ``size > 0``);
* lone surrogates become U+FFFD and NULs are dropped in every string.

A From that a mailing list rewrote to the list address is replaced by the real author when
the receiving server's authentication results vouch for it (``listsender``, on unless
``Caps.resolve_list_sender`` is off).  What differs from Alga's own mapper on purpose is
listed in docs/mime.md.

The original headers are always kept in ``headers``.  Each repair adds a defect name to
``ParsedMail.defects``.  Only input with nothing to salvage (empty bytes) raises
:class:`~shardworker.errors.ParseError`; any unexpected failure is converted to it, so no
other exception escapes.
"""

from __future__ import annotations

from datetime import datetime
from email.message import Message
from email.parser import BytesHeaderParser

from shardworker.errors import ParseError
from shardworker.mime import headers
from shardworker.mime.assemble import body, envelope, extras, finish, first_charset, raw_mime
from shardworker.mime.attachments import build_attachments
from shardworker.mime.body import walk_message
from shardworker.mime.listsender import resolve_list_sender
from shardworker.mime.message import BoundedMessage, limit_nesting, parse_bytes
from shardworker.mime.model import Caps, ParsedMail
from shardworker.mime.recover import needs_header_repair, repair_header_block


def parse_message(
    raw: bytes, *, uid: int, mailbox: str, internal_date: datetime | None, caps: Caps
) -> ParsedMail:
    """Parse one fetched message; see the module docstring for every fallback."""
    if not raw or raw.isspace():
        raise ParseError(f"uid {uid}: empty message")
    try:
        return _parse(raw, uid, mailbox, internal_date, caps)
    except (ParseError, MemoryError):
        raise
    except Exception as exc:  # last line of defence: the engine dead-letters on ParseError
        raise ParseError(f"uid {uid}: unparseable message ({type(exc).__name__})") from exc


def _parse(
    raw: bytes, uid: int, mailbox: str, internal_date: datetime | None, caps: Caps
) -> ParsedMail:
    defects: list[str] = []
    msg = _structure(raw, defects)
    index = headers.header_values(msg.raw_items())
    if not index:
        defects.append("no_headers")
    charset = first_charset(msg)
    msg_id = headers.message_id(index.get("message-id", []), defects)
    if msg_id is None:
        defects.append("message_id_synthetic")
        msg_id = headers.synthetic_id(raw, uid)
    data = envelope(
        index,
        msg_id=msg_id,
        mailbox=mailbox,
        internal_date=internal_date,
        charset=charset,
        defects=defects,
    )
    walked = walk_message(msg, charset, defects)
    data["body"] = body(walked.text, walked.html, defects)
    attachments, skips = build_attachments(walked.attachments, caps, defects)
    if attachments:
        data["attachments"] = attachments
    data.update(extras(index, charset, defects))
    if caps.resolve_list_sender:
        resolve_list_sender(index, data, charset, defects)
    data["messageSize"] = len(raw)
    skips.extend(raw_mime(data, raw, caps))
    if skips:
        data["ingressSkipReasons"] = skips
    return finish(msg_id, data, defects)


def _structure(raw: bytes, defects: list[str]) -> Message:
    raw = limit_nesting(raw, defects)
    try:
        msg = parse_bytes(raw)
        if needs_header_repair(msg, raw):
            repaired = repair_header_block(raw)
            if repaired is not None:
                defects.append("header_block_repaired")
                msg = parse_bytes(repaired)
        return msg
    except RecursionError:
        # Nesting deep enough to exhaust the stack: keep the headers, drop the body.
        defects.append("mime_too_deep")
        msg = BytesHeaderParser(_class=BoundedMessage).parsebytes(raw)
        msg.set_payload("")
        return msg
