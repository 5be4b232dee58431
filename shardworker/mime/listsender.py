"""Mailing-list rewrite recovery, as Alga's ``listRewriteSender.ts`` does it.

Lists and Google Groups rewrite a DMARC-strict sender's From to the list address
(``'Jane Doe' via support <support@lists.example.com>``).  The real author is recovered
so that contact matching sees the person, and trusted only when the receiving server's
authentication results vouch for the author's domain:

1. a list message has ``X-BeenThere``, ``List-Id``, ``List-Post`` or ``Mailing-List``, or
   a ``Sender`` other than From; its list address is ``X-BeenThere``, else ``List-Post``,
   else ``Sender``; nothing happens unless From is that address;
2. candidates, in order: ``X-Original-From``, ``X-Original-Sender``, the first
   ``Reply-To`` address; one equal to the list address is skipped (so is one that zod
   would refuse: it could not be published);
3. the first candidate is trusted only when the topmost ``Authentication-Results`` or
   ``ARC-Authentication-Results`` shows ``dkim=pass`` (``header.i``/``header.d``),
   ``dmarc=pass`` (``header.from``) or ``spf=pass`` (``smtp.mailfrom``) for a domain
   aligned with the candidate's (equal, or one a subdomain of the other);
4. then ``from`` becomes the candidate (its name, else the original display name) and the
   headers map gets ``x-list-address``, ``x-resolved-original-sender`` and
   ``x-resolved-original-sender-via``.
"""

from __future__ import annotations

import re
from typing import Any

from shardworker.mime.addresses import parse_address_headers

_LIST_MARKERS = ("x-beenthere", "list-id", "list-post", "mailing-list")
_MAILTO = re.compile(r"mailto:([^>\s,?]+)", re.IGNORECASE)
_RESULT = re.compile(
    r"\b(dkim|dmarc|spf)\s*=\s*pass\b([^;]*)",
    re.IGNORECASE,
)
_PROPERTY = re.compile(r"\b(header\.i|header\.d|header\.from|smtp\.mailfrom)\s*=\s*([^\s;()]+)")
_PROPERTIES = {
    "dkim": ("header.i", "header.d"),
    "dmarc": ("header.from",),
    "spf": ("smtp.mailfrom",),
}
_CANDIDATES = ("x-original-from", "x-original-sender", "reply-to")


def resolve_list_sender(
    index: dict[str, list[str]],
    data: dict[str, Any],
    charset: str | None,
    defects: list[str],
) -> None:
    """Replace ``data["from"]`` by the recovered author when every rule above holds."""
    sender = data["from"]["email"].lower()
    list_address = _list_address(index, sender, charset)
    if list_address is None or list_address != sender:
        return
    candidate = _first_candidate(index, list_address, charset)
    if candidate is None:
        return
    entry, via = candidate
    if not _authenticated(index, entry["email"].rpartition("@")[2].lower()):
        defects.append("list_sender_untrusted")
        return
    name = entry.get("name") or data["from"].get("name")
    data["from"] = {"email": entry["email"], **({"name": name} if name else {})}
    headers = data.setdefault("headers", {})
    headers["x-list-address"] = list_address
    headers["x-resolved-original-sender"] = entry["email"]
    headers["x-resolved-original-sender-via"] = via
    defects.append("list_sender_resolved")


def _list_address(index: dict[str, list[str]], sender: str, charset: str | None) -> str | None:
    sender_header = _first_address(index.get("sender", [])[:1], charset)
    is_list = any(name in index for name in _LIST_MARKERS) or (
        sender_header is not None and sender_header != sender
    )
    if not is_list:
        return None
    been_there = _first_address(index.get("x-beenthere", [])[:1], charset)
    if been_there:
        return been_there
    for value in index.get("list-post", [])[:1]:
        match = _MAILTO.search(value)
        if match:
            return match.group(1).strip().lower()
    return sender_header


def _first_address(values: list[str], charset: str | None) -> str | None:
    found = parse_address_headers(values, charset, [], "list")
    return str(found[0]["email"]).lower() if found else None


def _first_candidate(
    index: dict[str, list[str]], list_address: str, charset: str | None
) -> tuple[dict[str, Any], str] | None:
    for header in _CANDIDATES:
        found = parse_address_headers(index.get(header, [])[:1], charset, [], header)
        if found and str(found[0]["email"]).lower() != list_address:
            return found[0], header
    return None


def _authenticated(index: dict[str, list[str]], domain: str) -> bool:
    for name in ("authentication-results", "arc-authentication-results"):
        for value in index.get(name, [])[:1]:
            if _passes(" ".join(value.split()), domain):
                return True
    return False


def _passes(results: str, domain: str) -> bool:
    for match in _RESULT.finditer(results):
        wanted = _PROPERTIES[match.group(1).lower()]
        for prop in _PROPERTY.finditer(match.group(2)):
            if prop.group(1).lower() in wanted and _aligned(prop.group(2), domain):
                return True
    return False


def _aligned(value: str, domain: str) -> bool:
    found = value.strip("\"'<>").rpartition("@")[2].lower().rstrip(".")
    if not found or not domain:
        return False
    return found == domain or found.endswith(f".{domain}") or domain.endswith(f".{found}")
