"""Small parsers for IMAP responses the harness needs."""

from __future__ import annotations

import re

_APPENDUID = re.compile(rb"\[APPENDUID (\d+) ([0-9:,]+)\]", re.IGNORECASE)


def parse_uid_set(text: str) -> list[int]:
    """Expand an RFC 4315 uid-set ("4:6,9") into [4, 5, 6, 9]."""
    uids: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        start, end = int(low), int(high or low)
        step = 1 if end >= start else -1
        uids.extend(range(start, end + step, step))
    return uids


def _flatten(response: object) -> bytes:
    if isinstance(response, bytes):
        return response
    if isinstance(response, str):
        return response.encode()
    if isinstance(response, tuple | list):
        return b" ".join(_flatten(part) for part in response)
    return repr(response).encode()


def parse_append_uids(response: object) -> list[int]:
    """The UIDs an APPEND/MULTIAPPEND response assigned (UIDPLUS `APPENDUID`).

    imapclient returns bytes from append() but ("OK", [bytes]) from multiappend().
    """
    raw = _flatten(response)
    match = _APPENDUID.search(raw)
    if match is None:
        raise ValueError(f"no APPENDUID in {raw[:200]!r}")
    return parse_uid_set(match.group(2).decode())
