"""MIME → Alga ``emailData``: pure functions, no I/O.

* :func:`parse_message` — a fetched message (raw bytes) → :class:`ParsedMail`;
* :func:`plan_large_fetch` / :func:`parse_large` — a message above ``max_raw_bytes``:
  plan which sections to fetch from its BODYSTRUCTURE, then build ``emailData`` from the
  header block and the text parts only;
* :func:`build_payload` / :func:`iso_utc` — the INBOUND_EMAIL_RECEIVED payload.

Every fallback (missing Message-ID, From, To, Date...) is documented in
:mod:`shardworker.mime.parse`.
"""

from shardworker.mime.large import LargePlan, parse_large, parts_from_fetch, plan_large_fetch
from shardworker.mime.model import Caps, ParsedMail
from shardworker.mime.parse import parse_message
from shardworker.mime.payload import build_payload, iso_utc

__all__ = [
    "Caps",
    "LargePlan",
    "ParsedMail",
    "build_payload",
    "iso_utc",
    "parse_large",
    "parse_message",
    "parts_from_fetch",
    "plan_large_fetch",
]
