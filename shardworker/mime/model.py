"""Value types of the MIME layer: the caps it applies and what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardworker.config import Settings

# Peak memory of one parse_message call, as a multiple of the message size, on top of the
# raw bytes the caller holds (tracemalloc; bench/parse_bench.py and the shapes pinned in
# tests/test_mime_caps.py): 3.7x with a big attachment, 4.7x for an attached message,
# 5.0x for 8-bit CJK text, 5.5x for multi-megabyte HTML (was 7.7x for a 2.2 MB message
# with an attachment).  engine/sync.py sizes its fetch groups by it.
PARSE_PEAK_FACTOR = 6

UNKNOWN_SENDER = "unknown-sender@invalid.invalid"
UNDISCLOSED_RECIPIENTS = "undisclosed-recipients@invalid.invalid"


@dataclass(frozen=True)
class Caps:
    """Alga's ingress caps, what the event may carry, and how the sender is resolved."""

    max_raw_bytes: int = 25 * 1024 * 1024
    max_attachment_bytes: int = 10 * 1024 * 1024
    max_total_attachment_bytes: int = 25 * 1024 * 1024
    max_attachments: int = 25
    include_attachment_content: bool = True
    include_raw_mime: bool = False
    resolve_list_sender: bool = True

    @classmethod
    def from_settings(cls, s: Settings) -> Caps:
        return cls(
            max_raw_bytes=s.max_raw_bytes,
            max_attachment_bytes=s.max_attachment_bytes,
            max_total_attachment_bytes=s.max_total_attachment_bytes,
            max_attachments=s.max_attachments,
            # payload_mode=pointer: content stays on the server, behind the pointer job.
            include_attachment_content=s.include_attachment_content and s.payload_mode == "full",
            include_raw_mime=s.include_raw_mime and s.payload_mode == "full",
            resolve_list_sender=s.resolve_list_original_sender,
        )


@dataclass(frozen=True)
class ParsedMail:
    """One message turned into Alga's ``emailData``.

    ``defects`` are short machine-readable notes (``name`` or ``name: detail``) about what
    was wrong with the input and how it was repaired; they never contain body text.
    """

    message_id: str
    email_data: dict[str, Any]
    defects: tuple[str, ...]
