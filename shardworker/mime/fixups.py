"""Decoding that survives real mail: charsets, encoded words, 8-bit headers, filenames.

These are the places where mail-parser 4.8 gets real messages wrong, so shardworker does
them itself from the stdlib's ``email.message.Message``:

* a 7-bit ISO-2022-JP body keeps its raw escape sequences in mail-parser (it returns the
  undecoded payload whenever the transfer encoding is 7bit); here every text body is
  decoded from its bytes with its declared charset;
* a raw 8-bit windows-1252 header loses characters in mail-parser (it decodes the bytes as
  UTF-8 with ``errors="ignore"``); here 8-bit header bytes are decoded as UTF-8 when they
  are valid UTF-8, else with the message's declared charset, else as windows-1252;
* an unterminated quoted filename (``filename="report.pdf``) keeps its quote in both the
  stdlib and mail-parser; :func:`clean_filename` drops it.

Every decoder here is total: unknown, misspelt or non-text charsets (``base64``,
``undefined``) fall back to UTF-8 / windows-1252 with replacement characters, and the
caller gets a defect name instead of an exception.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import html
import re
from email.message import Message

from shardworker.mime.japanese import decode_iso2022jp_ms

# Charset labels seen in the wild that Python does not know, or knows as something
# narrower than what senders actually use (the WHATWG encoding labels and what mail
# clients write: Apple Mail's x-mac-*, Outlook's ks_c_5601-1987 and x-user-defined...).
_CHARSET_ALIASES = {
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "ks_c_5601-1989": "cp949",
    "ksc5601": "cp949",
    "euc-kr": "cp949",
    "windows-949": "cp949",
    "x-windows-949": "cp949",
    "x-unknown": "utf-8",
    "unknown-8bit": "utf-8",
    "unknown": "utf-8",
    # Outlook labels text in the sender's ANSI code page this way; the WHATWG decoder maps
    # the high half to private-use characters, which no reader can read.
    "x-user-defined": "cp1252",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-6-e": "iso-8859-6",
    "csiso88598i": "iso-8859-8",
    "logical": "iso-8859-8",
    "visual": "iso-8859-8",
    "windows-874": "cp874",
    "tis-620": "cp874",
    "iso-8859-11": "cp874",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cp936": "gb18030",
    "euc-cn": "gb18030",
    "x-euc-cn": "gb18030",
    "chinese": "gb18030",
    "csgb2312": "gb18030",
    "big5": "big5hkscs",
    "x-big5": "big5hkscs",
    "cn-big5": "big5hkscs",
    "x-x-big5": "big5hkscs",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "sjis": "cp932",
    "ms_kanji": "cp932",
    "windows-31j": "cp932",
    "csshiftjis": "cp932",
    "x-euc-jp": "euc_jis_2004",
    "euc-jp": "euc_jis_2004",
    "ansi_x3.4-1968": "ascii",
    "us-ascii": "ascii",
    "utf8": "utf-8",
    "utf8mb4": "utf-8",
    "unicode-1-1-utf-8": "utf-8",
    "unicode-2-0-utf-8": "utf-8",
    "x-unicode20utf8": "utf-8",
    "unicode-1-1-utf-7": "utf-7",
    "unicode-2-0-utf-7": "utf-7",
    "csunicode11utf7": "utf-7",
    "x-utf-7": "utf-7",
    "iso-10646-ucs-2": "utf-16-be",
    "ucs-2": "utf-16",
    "csunicode": "utf-16",
    "unicodefffe": "utf-16-be",
    "x-mac-roman": "mac-roman",
    "macintosh": "mac-roman",
    "x-mac-cyrillic": "mac-cyrillic",
    "x-mac-ukrainian": "mac-cyrillic",
    "x-mac-greek": "mac-greek",
    "x-mac-turkish": "mac-turkish",
    "x-mac-icelandic": "mac-iceland",
    "x-mac-ce": "mac-latin2",
    "x-mac-centraleurroman": "mac-latin2",
    "x-mac-croatian": "mac-croatian",
    "x-mac-romanian": "mac-romanian",
    "x-mac-arabic": "mac-arabic",
    "x-mac-farsi": "mac-farsi",
    "x-mac-japanese": "cp932",
    "x-mac-chinesetrad": "big5hkscs",
    "x-mac-chinesesimp": "gb18030",
    "x-mac-korean": "cp949",
    "x-cp1250": "cp1250",
    "x-cp1251": "cp1251",
    "iso-2022-jp": "iso2022_jp",
    "csiso2022jp": "iso2022_jp",
    "iso-2022-jp-ms": "iso2022_jp",
    "cp50220": "iso2022_jp",
    "cp50221": "iso2022_jp",
    "cp50222": "iso2022_jp",
    "x-iso-2022-jp": "iso2022_jp",
}
# ``cp-850`` and ``windows 1252``-style spellings: the separator is dropped.
_CODEPAGE = re.compile(r"(?:cp|ibm|windows|win|ms|x-cp)[-_ ]?(\d{3,5})")
# Supersets tried, strictly, before the declared codec is applied with replacement.
_CHARSET_SUPERSETS = {
    "iso2022_jp": ("iso2022_jp", "iso2022_jp_ext", "iso2022_jp_2", "iso2022_jp_2004"),
    "ascii": ("ascii", "utf-8", "cp1252"),
    # Senders label windows-1252 text as latin-1 all the time; cp1252 is a superset of
    # latin-1's printable range.
    "iso8859-1": ("cp1252", "iso8859-1"),
}
_DEFAULT_8BIT = "cp1252"
# Codecs for which ASCII bytes do not mean ASCII text.
_WIDE = frozenset(
    {
        "utf-16",
        "utf-16-le",
        "utf-16-be",
        "utf-32",
        "utf-32-le",
        "utf-32-be",
        "utf-7",
        "cp037",
        "cp500",
        "cp1140",
    }
)

_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_SURROGATES = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BASE64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")

# Pieces for the surrogate test: encoding a piece copies it, so memory stays bounded.
_SCRUB_PIECE_CHARS = 256 * 1024
# Below this length the regex is cheaper than the encoders' exceptions.
_SCRUB_REGEX_CHARS = 128


def _has_surrogates(value: str) -> bool:
    """Whether ``value`` holds a surrogate code point, tested at memory speed.

    A regex test took 100 us for 5 KB of HTML with one accent (10 % of a whole parse).
    A string of Latin-1 characters copies to Latin-1 bytes in one memcpy; the UTF-8
    encoder refuses exactly the surrogates.
    """
    if len(value) < _SCRUB_REGEX_CHARS:
        return _SURROGATES.search(value) is not None
    for start in range(0, len(value), _SCRUB_PIECE_CHARS):
        piece = value[start : start + _SCRUB_PIECE_CHARS]  # the string itself if short
        try:
            piece.encode("latin-1")
            continue
        except UnicodeEncodeError:
            pass
        try:
            piece.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


@functools.lru_cache(maxsize=512)
def resolve_charset(label: str | None) -> str | None:
    """A Python text codec name for a MIME charset label, or None if there is none."""
    if not label:
        return None
    name = label.strip().strip("\"'").lower()
    name = _CHARSET_ALIASES.get(name, name)
    codepage = _CODEPAGE.fullmatch(name)
    if codepage:
        number = codepage.group(1)
        name = f"cp{number}" if number != "65001" else "utf-8"
    for candidate in (name, name[2:] if name.startswith("x-") else None):
        if candidate:
            found = _text_codec(_CHARSET_ALIASES.get(candidate, candidate))
            if found:
                return found
    return None


def _text_codec(name: str) -> str | None:
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    # Non-text codecs (base64, zlib, rot13...) would turn a charset label into a decoder
    # of arbitrary transforms; a charset is only ever a text encoding.
    if not getattr(info, "_is_text_encoding", True) or info.name == "undefined":
        return None
    return str(info.name)


def decode_bytes(data: bytes, label: str | None, defects: list[str]) -> str:
    """Decode ``data`` declared as ``label``, never raising.

    Order: the declared codec (or its known supersets) strictly, then UTF-8 strictly (the
    most common mislabel), then the declared codec or windows-1252 with replacement.
    """
    codec = resolve_charset(label)
    if codec in _WIDE and b"\x00" not in data and codec != "utf-7":
        # UTF-16/32 text of any length holds NUL bytes; without them the label is wrong.
        defects.append(f"charset_mismatch: {label[:40] if label else ''}")
        codec, label = None, None
    if data.isascii() and codec not in _WIDE and b"\x1b" not in data:
        return data.decode("ascii")
    if label and codec is None:
        defects.append(f"unknown_charset: {label[:40]}")
    for candidate in _CHARSET_SUPERSETS.get(codec or "", (codec,) if codec else ()):
        try:
            return _decode_strict(data, candidate)
        except (UnicodeError, LookupError, ValueError):
            continue
    if codec is not None and codec.startswith("iso2022_jp"):
        microsoft = decode_iso2022jp_ms(data)
        if microsoft is not None:
            return microsoft
    try:
        text = _decode_strict(data, "utf-8")
    except UnicodeError:
        pass
    else:
        if codec is not None:
            defects.append(f"charset_mismatch: {label[:40] if label else ''} was utf-8")
        return text
    if codec is not None:
        defects.append(f"charset_decode_errors: {label[:40] if label else ''}")
    return _decode_replace(data, codec or _DEFAULT_8BIT)


# CPython's decoders size their buffer for the widest character seen: 2 MB of UTF-8 CJK
# text held a 4 MB buffer for a 1.3 MB result.  Pieces of this size, joined, peak at twice
# the result instead.
_DECODE_PIECE_BYTES = 256 * 1024


def _decode_strict(data: bytes, codec: str) -> str:
    if len(data) <= 4 * _DECODE_PIECE_BYTES:
        return data.decode(codec)
    decoder = codecs.getincrementaldecoder(codec)()
    view = memoryview(data)
    pieces = [
        decoder.decode(view[start : start + _DECODE_PIECE_BYTES])
        for start in range(0, len(data), _DECODE_PIECE_BYTES)
    ]
    pieces.append(decoder.decode(b"", final=True))
    return "".join(pieces)


def _decode_replace(data: bytes, codec: str) -> str:
    try:
        return data.decode(codec, "replace")
    except (UnicodeError, LookupError, ValueError):
        return data.decode("utf-8", "replace")


def raw_header_text(value: str, fallback_charset: str | None, defects: list[str]) -> str:
    """Turn a compat32 raw header value (8-bit bytes held as surrogates) into text.

    Raw 7-bit ISO-2022-JP (escape sequences, no encoded word: old Japanese mailers) is
    decoded too.
    """
    if value.isascii():
        return _jis_header(value, defects) if "\x1b" in value else value
    if _SURROGATES.search(value) is None:
        return value
    try:
        data = value.encode("ascii", "surrogateescape")
    except UnicodeError:
        return _SURROGATES.sub("\ufffd", value)
    try:
        return data.decode("utf-8")
    except UnicodeError:
        pass
    defects.append("header_8bit_non_utf8")
    codec = resolve_charset(fallback_charset) or _DEFAULT_8BIT
    if codec in {"ascii", "utf-8"}:
        codec = _DEFAULT_8BIT
    return _decode_replace(data, "cp1252" if codec == "iso8859-1" else codec)


def _jis_header(value: str, defects: list[str]) -> str:
    return decode_bytes(value.encode("ascii"), "iso-2022-jp", defects)


def decode_header_value(value: str, fallback_charset: str | None, defects: list[str]) -> str:
    """Raw header value → display text: 8-bit bytes, folding and RFC 2047 words handled."""
    text = raw_header_text(value, fallback_charset, defects)
    text = _FOLD.sub("", text).replace("\r", "").replace("\n", "")
    if "=?" in text:
        text = decode_encoded_words(text, defects)
    return text.strip()


def decode_encoded_words(text: str, defects: list[str]) -> str:
    """Decode RFC 2047 encoded words, joining adjacent words of one charset before decoding.

    Senders split multi-byte characters across adjacent words; decoding each word alone
    would turn both halves into replacement characters.
    """
    out: list[str] = []
    run_charset: str | None = None
    run: list[bytes] = []
    pos = 0
    for match in _ENCODED_WORD.finditer(text):
        between = text[pos : match.start()]
        if between and (run_charset is None or between.strip(" \t")):
            _flush(out, run_charset, run, defects)
            run_charset, run = None, []
            out.append(between)
        charset, kind, payload = match.group(1), match.group(2), match.group(3)
        data = _decode_word(kind, payload)
        if data is None:
            _flush(out, run_charset, run, defects)
            run_charset, run = None, []
            defects.append("encoded_word_invalid")
            out.append(match.group(0))
        else:
            if run_charset is not None and charset.lower() != run_charset:
                _flush(out, run_charset, run, defects)
                run = []
            run_charset = charset.lower()
            run.append(data)
        pos = match.end()
    _flush(out, run_charset, run, defects)
    out.append(text[pos:])
    return "".join(out)


def _flush(out: list[str], charset: str | None, run: list[bytes], defects: list[str]) -> None:
    if charset is not None and run:
        out.append(decode_bytes(b"".join(run), charset, defects))


def _decode_word(kind: str, payload: str) -> bytes | None:
    raw = payload.encode("ascii", "replace")
    try:
        if kind in "bB":
            cleaned = _BASE64_JUNK.sub(b"", raw)
            cleaned = cleaned[: len(cleaned) - len(cleaned) % 4 if len(cleaned) % 4 == 1 else None]
            return binascii.a2b_base64(cleaned + b"=" * (-len(cleaned) % 4))
        return binascii.a2b_qp(raw, header=True)
    except (binascii.Error, ValueError):
        return None


def part_charset(part: Message) -> str | None:
    """The part's declared charset label, tolerant of junk in the header."""
    try:
        charset = part.get_param("charset")
    except (ValueError, TypeError, IndexError):
        return None
    if isinstance(charset, tuple):
        charset = charset[2]
    if not isinstance(charset, str) or not charset.strip():
        return None
    return raw_header_text(charset, None, []).strip().lower()[:64]


def clean_filename(name: str, defects: list[str]) -> str:
    """A display filename: encoded words decoded, stray quotes, paths and controls gone."""
    text = decode_header_value(name, None, defects) if name else ""
    stripped = text.strip()
    if stripped.startswith('"') != stripped.endswith('"') or stripped == '"':
        defects.append("filename_unbalanced_quote")
    stripped = stripped.strip('"').strip()
    # A consumer may write the file to disk: keep the base name only.
    stripped = re.split(r"[/\\]", stripped)[-1]
    stripped = _CONTROL.sub("", stripped).strip()
    if len(stripped) > 255:
        stem, dot, ext = stripped.rpartition(".")
        stripped = (stem[: 250 - len(ext)] + dot + ext) if dot and len(ext) < 16 else stripped[:255]
    return stripped


# Every pattern below is linear: possessive quantifiers never give back what they took,
# and an unclosed construct runs to the end of the input in one match, so a hostile
# document of n characters costs O(n) (``html.parser`` is quadratic on unclosed comments).
# Constant replacements keep the per-tag work in C.
_TAG_END = r"\b[^>]*+(?:>|\Z)"
_HTML_PASSES = (
    (re.compile(r"<!--(?:[^-]++|-(?!->))*+(?:-->|\Z)"), ""),
    (
        re.compile(
            r"<(script|style|head|title|template|noscript)" + _TAG_END
            + r"(?:[^<]++|<(?!/\1\b))*+(?:</\1" + _TAG_END + ")?",
            re.IGNORECASE,
        ),
        "",
    ),
    (re.compile(r"<br" + _TAG_END, re.IGNORECASE), "\n"),
    (re.compile(r"<li" + _TAG_END, re.IGNORECASE), "\n- "),
    (re.compile(r"<t[dh]" + _TAG_END, re.IGNORECASE), "\t"),
    (
        re.compile(
            r"</?(?:p|div|tr|table|h[1-6]|blockquote|pre|ul|ol|section|article|header"
            r"|footer|hr|address)" + _TAG_END,
            re.IGNORECASE,
        ),
        "\n\n",
    ),
    (re.compile(r"</?[a-zA-Z][^>]*+(?:>|\Z)"), ""),
)  # fmt: skip
_HTML_TEXT_MAX_CHARS = 1024 * 1024
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_LINE_EDGES = re.compile(r"[^\S\n]*+\n[^\S\n]*+")  # what str.strip() removes at line ends


def html_to_text(markup: str, defects: list[str]) -> str:
    """Plain text for an HTML-only message: visible text, block structure as newlines."""
    if len(markup) > _HTML_TEXT_MAX_CHARS:
        defects.append("html_text_truncated")
        markup = markup[:_HTML_TEXT_MAX_CHARS]
    text = markup
    for pattern, replacement in _HTML_PASSES:
        text = pattern.sub(replacement, text)
    text = html.unescape(text)
    # Whole-text passes, not a list of lines: a line object costs ~50 bytes beside its text.
    text = _LINE_EDGES.sub("\n", _SPACES.sub(" ", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


def scrub_strings(value: object, defects: list[str]) -> object:
    """Replace lone surrogates and drop NULs in every string of a JSON-like value.

    A lone surrogate cannot be serialized as UTF-8 JSON, and a NUL is refused by
    PostgreSQL text columns downstream; both come only from broken input.
    """
    if isinstance(value, str):
        # isascii() and the NUL test run at memory speed (base64 attachment content is
        # megabytes of ASCII).
        if "\x00" not in value and (value.isascii() or not _has_surrogates(value)):
            return value
        if "\x00" in value:
            defects.append("nul_removed")
        return _SURROGATES.sub("\ufffd", value.replace("\x00", ""))
    if isinstance(value, dict):
        return {k: scrub_strings(v, defects) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_strings(v, defects) for v in value]
    return value
