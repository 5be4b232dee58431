"""Resolve a provider's folder filters against the server's ``LIST "" "*"``.

Alga stores ``folder_filters`` as names typed by a person; empty means INBOX.  A filter
matches, in order of preference:

1. a folder with exactly that name;
2. the same name with ``/`` for the server's hierarchy delimiter and INBOX in any case
   (RFC 3501: INBOX is case-insensitive);
3. the same, ignoring case;
4. a folder directly under INBOX with that name (personal namespace ``INBOX.``);
5. a SPECIAL-USE folder (RFC 6154): ``\\Junk`` names the folder flagged ``\\Junk``, and a
   bare word such as ``Junk`` or ``Sent`` does too when no folder has that name.

Names are returned decoded (imapclient decodes modified UTF-7 and encodes it again on
SELECT/EXAMINE), so they can be passed straight back to the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from imapclient import IMAPClient
from imapclient.imap_utf7 import decode as decode_utf7

from shardworker.imap.connect import classify_error

INBOX = "INBOX"
# Bare words that name a SPECIAL-USE flag when no folder carries the word as its name.
SPECIAL_USE_WORDS = {
    "all": "\\all",
    "archive": "\\archive",
    "drafts": "\\drafts",
    "flagged": "\\flagged",
    "important": "\\important",
    "junk": "\\junk",
    "spam": "\\junk",
    "sent": "\\sent",
    "trash": "\\trash",
}
_UNSELECTABLE = frozenset({"\\noselect", "\\nonexistent"})


@dataclass(frozen=True)
class FolderResolution:
    """Selectable folders to watch, filters that matched nothing, matches that cannot be
    selected (``\\Noselect`` / ``\\NonExistent``).  Each list keeps filter order, no
    duplicates."""

    folders: tuple[str, ...]
    missing: tuple[str, ...]
    unselectable: tuple[str, ...]
    # imapclient's LIST answer it was resolved from (Gmail's All Mail and labels need it).
    listing: tuple[tuple[Any, ...], ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class _Folder:
    name: str
    delimiter: str
    flags: frozenset[str]  # lower case

    def key(self) -> str:
        return _canonical(self.name, self.delimiter)


def resolve_folders(client: IMAPClient, filters: Sequence[str]) -> FolderResolution:
    """``LIST "" "*"`` on a logged-in client, then :func:`match_folders`."""
    try:
        listing = client.list_folders("", "*")
    except Exception as exc:
        raise classify_error(exc) from exc
    found = match_folders(listing, filters)
    return FolderResolution(
        found.folders, found.missing, found.unselectable, tuple(tuple(e) for e in listing)
    )


def match_folders(listing: Sequence[Sequence[Any]], filters: Sequence[str]) -> FolderResolution:
    """Resolve ``filters`` against ``listing``: imapclient's ``(flags, delimiter, name)``."""
    entries = [_entry(flags, delimiter, name) for flags, delimiter, name in listing]
    wanted = [f.strip() for f in filters if f.strip()] or [INBOX]
    folders: list[str] = []
    missing: list[str] = []
    unselectable: list[str] = []
    for flt in wanted:
        found = _find(entries, flt)
        if found is None:
            target, value = missing, flt
        elif found.flags & _UNSELECTABLE:
            target, value = unselectable, found.name
        else:
            target, value = folders, found.name
        if value not in target:
            target.append(value)
    return FolderResolution(tuple(folders), tuple(missing), tuple(unselectable))


def _find(entries: Sequence[_Folder], flt: str) -> _Folder | None:
    """The folder ``flt`` names (see the module docstring for the order), or None."""
    exact = next((folder for folder in entries if folder.name == flt), None)
    if exact is not None:
        return exact
    for fold in (str, str.casefold):
        for folder in entries:
            if fold(_canonical(flt, folder.delimiter, slash=True)) == fold(folder.key()):
                return folder
    # Servers with a personal namespace under INBOX (Courier, older Cyrus) list
    # "INBOX.Sent" for what people call "Sent".
    for folder in entries:
        key = folder.key()
        typed = _canonical(flt, folder.delimiter, slash=True)
        if key.startswith(INBOX + "/") and key[6:].casefold() == typed.casefold():
            return folder
    flag = flt.lower() if flt.startswith("\\") else SPECIAL_USE_WORDS.get(flt.casefold())
    if flag is None:
        return None
    return next((folder for folder in entries if flag in folder.flags), None)


def _canonical(name: str, delimiter: str, *, slash: bool = False) -> str:
    """``name`` split on the delimiter (and on ``/`` for a typed filter), joined with ``/``,
    with a leading INBOX segment upper-cased."""
    parts = [name]
    if delimiter:
        parts = name.split(delimiter)
        if slash and delimiter != "/":
            parts = [piece for part in parts for piece in part.split("/")]
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return "/".join(parts)


def _entry(flags: Sequence[Any], delimiter: Any, name: Any) -> _Folder:
    return _Folder(
        name=_text(name, utf7=True),
        delimiter=_text(delimiter) if delimiter is not None else "",
        flags=frozenset(_text(flag).lower() for flag in flags),
    )


def _text(value: Any, *, utf7: bool = False) -> str:
    if isinstance(value, bytes):
        return str(decode_utf7(value)) if utf7 else value.decode("ascii", "replace")
    return str(value)
