"""Address headers → ``{email, name?}`` objects that pass Alga's zod ``.email()`` check.

Parsing uses mail-parser's structural address parser (``mailparser.utils.get_addresses``),
which refuses ambiguous input such as ``alice@example.org)<bob@example.org>`` instead of
guessing.  Every address is then checked with the regex zod applies: an address zod would
reject is dropped (with a defect), because one bad recipient must not make Alga reject
the whole event.  IDN domains are converted to their ASCII (punycode) form first.

The regex is the intersection of zod 3.22.4's (pinned by Alga's workflow worker) and
zod 3.23+'s: 3.22 has no apostrophe in the local part, 3.23+ has no comma.  Both accept
only ASCII, and only a top-level domain of letters: ``…@xn--bcher-kva.de`` passes, but a
UTF-8 local part (RFC 6531) and an IDN top-level domain (``.рф`` = ``.xn--p1ai``) have no
form zod accepts; such a sender falls back to the placeholder address, with the original
address kept in ``name`` and in the headers map.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from mailparser.utils import get_addresses

from shardworker.mime.fixups import decode_encoded_words, decode_header_value, raw_header_text
from shardworker.mime.model import UNDISCLOSED_RECIPIENTS, UNKNOWN_SENDER

ZOD_EMAIL = re.compile(
    r"(?!\.)(?!.*\.\.)([A-Z0-9_+\-.]*)[A-Z0-9_+-]@([A-Z0-9][A-Z0-9\-]*\.)+[A-Z]{2,}",
    re.IGNORECASE | re.ASCII,
)
_MAX_ADDRESS_CHARS = 320
_MAX_HEADER_CHARS = 16 * 1024
_MAX_NAME_CHARS = 512
# Starts only where a token starts (the look-behind), and never backtracks: linear.
_EMAIL_TOKEN = re.compile(r"(?<![^\s<>(),;:\"\[\]@])[^\s<>(),;:\"\[\]@]++@[^\s<>(),;:\"\[\]@]++")


def is_zod_email(value: str) -> bool:
    """True when zod's ``z.string().email()`` (3.22 and 3.23+) accepts ``value``."""
    return len(value) <= _MAX_ADDRESS_CHARS and ZOD_EMAIL.fullmatch(value) is not None


def normalize_email(value: str) -> str | None:
    """``value`` as zod accepts it (IDN domain → punycode), or None."""
    value = value.strip()
    if is_zod_email(value):
        return value
    local, at, domain = value.rpartition("@")
    if not at or domain.isascii() or not local.isascii():
        return None  # an RFC 6531 UTF-8 local part has no form zod accepts
    candidate = f"{local}@{a_label_domain(domain)}"
    return candidate if is_zod_email(candidate) else None


def a_label_domain(domain: str) -> str:
    """An IDN domain in its A-label (``xn--``) form, label by label, as IDNA 2008 does.

    Python's ``idna`` codec implements IDNA 2003, which maps ``ß`` to ``ss``: it names
    another domain (``fußball.de`` is ``xn--fuball-cta.de``, not ``fussball.de``).
    Labels are NFKC-normalised and lower-cased (full stops of other scripts included).
    """
    text = unicodedata.normalize("NFKC", domain).lower()
    labels = text.replace("\u3002", ".").replace("\uff61", ".").split(".")
    return ".".join(
        label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
        for label in labels
    )


def _entry(email: str, name: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"email": email}
    name = name.strip().strip('"').strip()
    if name and name != email:
        entry["name"] = name[:_MAX_NAME_CHARS]
    return entry


def parse_address_headers(
    values: list[str], fallback_charset: str | None, defects: list[str], header: str
) -> list[dict[str, Any]]:
    """Every valid address of all occurrences of one address header, in order."""
    out: list[dict[str, Any]] = []
    for value in values:
        text = raw_header_text(value, fallback_charset, defects)
        text = re.sub(r"\r?\n", "", text)
        if len(text) > _MAX_HEADER_CHARS:
            defects.append(f"address_header_truncated: {header}")
            text = text[: text.rfind(",", 0, _MAX_HEADER_CHARS) + 1 or _MAX_HEADER_CHARS]
        out.extend(_parse_one(text, fallback_charset, defects, header))
    return out


# The common shapes, ``"Name" <addr>``, ``Name <addr>`` and ``addr``, parsed without the
# structural parser.  Comments, escapes, groups, routes and ``@`` in an unquoted name do
# not match, so anything that could be ambiguous still goes to mail-parser.
# Possessive quantifiers everywhere: nothing is ever given back, so matching is linear
# (an ambiguous ``\s*`` next to a name that may hold spaces backtracks exponentially).
_NAME = r'(?:"[^"\\\r\n]*+"\s*+|[^"()\\;:<>,@\[\]]*+)'
_ADDR = r"[^<>\s\"()\\;:,@\[\]]++@[^<>\s\"()\\;:,@\[\]]++"
_ITEM = rf"\s*+(?:({_NAME})<({_ADDR})>|({_ADDR}))\s*+"
_SIMPLE_ITEM = re.compile(_ITEM)
_SIMPLE_LIST = re.compile(rf"(?:{_ITEM})?+(?:,(?:{_ITEM})?+)*+\s*+")


def _simple_pairs(text: str) -> list[tuple[str, str]] | None:
    """Fast path for the common case; None sends the text to mail-parser's parser."""
    if len(text) > 4096 or _SIMPLE_LIST.fullmatch(text) is None:
        return None
    pairs: list[tuple[str, str]] = []
    for match in _SIMPLE_ITEM.finditer(text):
        name, angle, bare = match.groups()
        if bare is not None:
            pairs.append(("", bare))
            continue
        name = name.strip()
        if name.startswith('"'):
            name = name[1:-1]
        if "=?" in name:
            # Quoted or not, as mail clients (and mail-parser for Alga) read it.
            name = decode_encoded_words(name, [])
        pairs.append((name, angle))
    return pairs


def _parse_one(
    text: str, fallback_charset: str | None, defects: list[str], header: str
) -> list[dict[str, Any]]:
    simple = _simple_pairs(text)
    if simple is not None:
        return _collect(simple, text, fallback_charset, defects, header)
    diagnostics: list[dict[str, Any]] = []
    try:
        pairs = get_addresses(text, defects=diagnostics, decode_names=True)
    except Exception:  # mail-parser is third-party code on hostile input: never let it escape
        defects.append(f"address_parser_failed: {header}")
        pairs = []
    return _collect(pairs, text, fallback_charset, defects, header)


def _collect(
    pairs: list[tuple[str, str]],
    text: str,
    fallback_charset: str | None,
    defects: list[str],
    header: str,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, address in pairs:
        if not address:
            continue
        email = normalize_email(address)
        if email is None:
            defects.append(f"address_invalid: {header}")
            continue
        out.append(_entry(email, decode_encoded_words(name, []) if "=?" in name else name))
    if not out and text.strip():
        out = _recover_single(text, fallback_charset, defects, header)
    return out


def _recover_single(
    text: str, fallback_charset: str | None, defects: list[str], header: str
) -> list[dict[str, Any]]:
    """``Alice alice@example.com``: one unambiguous address token is taken as the mailbox."""
    tokens = {t for t in _EMAIL_TOKEN.findall(text) if normalize_email(t)}
    if len(tokens) != 1:
        if "@" in text:
            defects.append(f"address_unparseable: {header}")
        return []
    token = tokens.pop()
    defects.append(f"address_recovered: {header}")
    name = decode_header_value(text.replace(token, ""), fallback_charset, [])
    return [_entry(normalize_email(token) or token, name.strip("<>()\"' "))]


def sender(values: list[str], fallback_charset: str | None, defects: list[str]) -> dict[str, Any]:
    """The first valid From address, else the placeholder sender named after the header."""
    found = parse_address_headers(values[:1], fallback_charset, defects, "from")
    if found:
        return found[0]
    defects.append("from_fallback")
    entry: dict[str, Any] = {"email": UNKNOWN_SENDER}
    original = decode_header_value(values[0], fallback_charset, []) if values else ""
    if original:
        entry["name"] = original[:_MAX_NAME_CHARS]
    return entry


def recipients(
    values: list[str], mailbox: str, fallback_charset: str | None, defects: list[str]
) -> list[dict[str, Any]]:
    """Valid To addresses, else the provider's mailbox (a Bcc delivery names none)."""
    found = parse_address_headers(values, fallback_charset, defects, "to")
    if found:
        return found
    defects.append("to_fallback")
    return [{"email": normalize_email(mailbox) or UNDISCLOSED_RECIPIENTS}]
