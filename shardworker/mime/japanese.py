"""ISO-2022-JP as Microsoft and Japanese mobile carriers write it (CP50220/50221/50222).

Every Python ``iso2022_jp*`` codec refuses the NEC row 13 characters (①, ㈱, №, ...) and
the NEC-selected IBM extensions (rows 0x79-0x7C), which Outlook and Japanese webmail put
in ordinary mail; the text then fell through to the 7-bit-as-UTF-8 fallback with its
escape sequences left in.  Here each JIS X 0208 pair is moved to its Shift_JIS code and
the whole text is decoded with CP932, which maps those rows; half-width katakana (``ESC (
I`` or SO/SI) map to CP932's single-byte range.  Escapes of other sets (JIS X 0212, GB
2312, KS C 5601: ISO-2022-JP-2) return None and the caller's other decoders apply.
"""

from __future__ import annotations

import re

_ESCAPE = re.compile(rb"\x1b(\(B|\(J|\(I|\$@|\$B|\$\(Q|\$\(O|\$\(B|[^\x1b]{0,3})")
_ASCII, _KANA, _KANJI = 0, 1, 2
_SETS = {
    b"(B": _ASCII,
    b"(J": _ASCII,  # JIS X 0201 Roman: ASCII but for yen and overline, kept as ASCII
    b"(I": _KANA,
    b"$@": _KANJI,
    b"$B": _KANJI,
    b"$(B": _KANJI,
    b"$(Q": _KANJI,  # JIS X 0213 plane 1: a superset of X 0208's rows
    b"$(O": _KANJI,
}
_SO, _SI = 0x0E, 0x0F


def decode_iso2022jp_ms(data: bytes) -> str | None:
    """``data`` decoded as CP5022x ISO-2022-JP, or None when it uses other character sets."""
    out = bytearray()
    pos = 0
    state = _ASCII
    for match in _ESCAPE.finditer(data):
        if not _append(out, data[pos : match.start()], state):
            return None
        found = _SETS.get(match.group(1))
        if found is None:
            return None
        state = found
        pos = match.end()
    if not _append(out, data[pos:], state):
        return None
    return out.decode("cp932", "replace")


def _append(out: bytearray, chunk: bytes, state: int) -> bool:
    if state == _KANJI:
        return _append_kanji(out, chunk)
    shifted = False
    for byte in chunk:
        if byte == _SO:
            shifted = True
        elif byte == _SI:
            shifted = False
        elif byte >= 0x80:
            return False
        elif (state == _KANA or shifted) and 0x21 <= byte <= 0x5F:
            out.append(byte + 0x80)
        else:
            out.append(byte)
    return True


def _append_kanji(out: bytearray, chunk: bytes) -> bool:
    """JIS X 0208 pairs → Shift_JIS; line breaks may sit between pairs (lenient senders)."""
    i = 0
    while i < len(chunk):
        first = chunk[i]
        if first in (0x0D, 0x0A):
            out.append(first)
            i += 1
            continue
        if i + 1 >= len(chunk) or not (0x21 <= first <= 0x7E and 0x21 <= chunk[i + 1] <= 0x7E):
            return False
        out += _to_sjis(first, chunk[i + 1])
        i += 2
    return True


def _to_sjis(j1: int, j2: int) -> bytes:
    s1 = ((j1 - 0x21) >> 1) + 0x81
    if s1 > 0x9F:
        s1 += 0x40
    # Odd rows take the low half of the trail range (skipping 0x7F), even rows the high.
    s2 = (j2 + 0x1F + (j2 >= 0x60)) if j1 & 1 else j2 + 0x7E
    return bytes((s1, s2))
