"""Value types of the MIME layer: the caps it applies and what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardworker.config import Settings

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
            include_attachment_content=s.include_attachment_content,
            include_raw_mime=s.include_raw_mime,
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
