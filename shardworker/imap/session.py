"""One provider + folder IMAP connection (the slot's life is ``engine.state.SlotState``).

The engine drives it: blocking methods (``examine``, ``fetch_*``, ``enter_idle``,
``leave_idle``, ``close``) run on sync threads, one at a time per session; the loop thread
only touches ``sock`` (to register it) and ``abort()`` (to kill a hung connection from
outside).  The session never changes flags or moves mail: the folder is opened with
EXAMINE and bodies are fetched with ``BODY.PEEK[]``.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from imapclient import IMAPClient
from imapclient.response_parser import parse_fetch_response

from shardworker.errors import FolderError, ImapProtocolError
from shardworker.imap.connect import classify_error
from shardworker.imap.dialects import (
    GMAIL_FETCH_ITEMS,
    Dialect,
    GmailAttrs,
    detect_dialect,
    gmail_attrs,
    meta_fetch_items,
)

_LINE_BREAKING = re.compile(r"[\r\n\x00]")


@dataclass(frozen=True)
class FolderStatus:
    uid_validity: int
    uid_next: int
    exists: int


@dataclass(frozen=True)
class MessageInfo:
    uid: int
    size: int
    internal_date: datetime | None
    gmail: GmailAttrs | None = None  # X-GM-MSGID / THRID / LABELS, on Gmail only


@dataclass(frozen=True)
class Prefetch:
    """What the UID FETCH written behind IDLE's ``DONE`` brought: the lowest UIDs above
    ``after_uid`` (a bounded range of them) and each body that came whole."""

    after_uid: int
    infos: tuple[MessageInfo, ...] = ()
    bodies: Mapping[int, bytes] = field(default_factory=dict)
    nbytes: int = 0  # downloaded, cut bodies included


@dataclass(frozen=True)
class LargeParts:
    header: bytes
    bodystructure: object
    parts: dict[str, bytes]


def _as_int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ImapProtocolError(f"server sent a non-numeric {what}") from None


class FolderSession:
    """The IMAP half of one folder's ingestion; engine state lives beside it."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.client: IMAPClient | None = None
        self.sock: socket.socket | None = None
        self.idling = False
        self.has_idle = False
        self.dialect = Dialect.GENERIC

    def attach(self, client: IMAPClient, capabilities: Iterable[str]) -> None:
        client.normalise_times = False
        self.client = client
        self.sock = client.socket()
        caps = tuple(capabilities)
        self.has_idle = "IDLE" in {c.upper() for c in caps}
        self.dialect = detect_dialect(caps, getattr(client, "welcome", b"") or b"")
        self.idling = False

    def _client(self) -> IMAPClient:
        if self.client is None:
            raise ImapProtocolError("session is not connected")
        return self.client

    def _forget_untagged(self) -> None:
        # imaplib keeps every untagged response forever; on a connection that lives for
        # weeks that is a slow leak, and a stale EXISTS would also poison SELECT parsing.
        self._client()._imap.untagged_responses.clear()

    def examine(self) -> FolderStatus:
        client = self._client()
        if _LINE_BREAKING.search(self.folder):
            # From a row or a LIST answer: it would end the EXAMINE line and start another.
            raise FolderError("folder name contains a CR, LF or NUL character; not selected")
        self._forget_untagged()
        try:
            info = client.select_folder(self.folder, readonly=True)
        except imaplib.IMAP4.abort as exc:
            # A dropped connection or a garbled answer says nothing about the folder:
            # retried with backoff, never parked as missing.
            raise classify_error(exc) from None
        except IMAPClient.Error as exc:
            raise FolderError(f"cannot examine folder: {exc}") from None
        # The EXISTS of the EXAMINE answer is the folder's size, not news: the drain that
        # follows reads everything above the cursor anyway.
        self._forget_untagged()
        uid_validity = info.get(b"UIDVALIDITY")
        if uid_validity is None:
            raise ImapProtocolError("EXAMINE answer lacks UIDVALIDITY")
        uid_next = info.get(b"UIDNEXT")
        if uid_next is None:
            uid_next = self._uid_next_by_search()
        return FolderStatus(
            uid_validity=_as_int(uid_validity, "UIDVALIDITY"),
            uid_next=_as_int(uid_next, "UIDNEXT"),
            exists=_as_int(info.get(b"EXISTS", 0), "EXISTS"),
        )

    def _uid_next_by_search(self) -> int:
        # RFC 3501 makes UIDNEXT optional in the SELECT answer; fall back to the top UID.
        uids = self._client().search(["ALL"])
        return (max(uids) + 1) if uids else 1

    def new_messages(self, after_uid: int) -> list[MessageInfo]:
        """UIDs above the cursor with their sizes, in UID order.

        ``n:*`` always matches the highest UID even when it is below ``n``; those are
        filtered out here, never published.
        """
        # What the server announces from here on is news to this check (see enter_idle).
        self._forget_untagged()
        data = self._fetch_range(f"{after_uid + 1}:*", meta_fetch_items(self.dialect))
        out = [
            self._info(uid, item)
            for uid, item in data.items()
            if isinstance(uid, int) and uid > after_uid
        ]
        out.sort(key=lambda m: m.uid)
        return out

    def _info(self, uid: Any, item: dict[bytes, Any]) -> MessageInfo:
        size = item.get(b"RFC822.SIZE")
        return MessageInfo(
            uid=_as_int(uid, "UID"),
            size=_as_int(size if size is not None else 0, "RFC822.SIZE"),
            internal_date=item.get(b"INTERNALDATE"),
            gmail=gmail_attrs(item) if self.dialect is Dialect.GMAIL else None,
        )

    def uids_since(self, day: date) -> list[int]:
        """``UID SEARCH SINCE day`` (day granularity, in the server's zone), ascending."""
        return sorted(_as_int(uid, "UID") for uid in self._client().search(["SINCE", day]))

    def message_infos(self, uids: Sequence[int]) -> list[MessageInfo]:
        """Sizes and INTERNALDATEs of these UIDs, in UID order (the backfill's listing)."""
        if not uids:
            return []
        items = ["RFC822.SIZE", "INTERNALDATE"]
        if self.dialect is Dialect.GMAIL:
            items += GMAIL_FETCH_ITEMS
        data = self._client().fetch(list(uids), items)
        return sorted((self._info(uid, item) for uid, item in data.items()), key=lambda m: m.uid)

    def _fetch_range(self, uid_range: str, items: str) -> dict[int, dict[bytes, Any]]:
        # IMAPClient.fetch() drops every answer whose UID was not listed literally, so a
        # range like ``n:*`` needs the raw command.
        client = self._client()
        imap = client._imap
        tag = imap._command("UID", "FETCH", uid_range, items)
        typ, data = imap._command_complete("FETCH", tag)
        client._checkok("fetch", typ, data)
        typ, data = imap._untagged_response(typ, data, "FETCH")
        parsed: dict[int, dict[bytes, Any]] = parse_fetch_response(data, False, True)
        return parsed

    def fetch_bodies(self, uids: Sequence[int]) -> dict[int, bytes]:
        data = self._client().fetch(list(uids), ["BODY.PEEK[]"])
        out: dict[int, bytes] = {}
        for uid, item in data.items():
            body = item.get(b"BODY[]")
            if isinstance(body, bytes):
                out[uid] = body
        return out

    def fetch_large(self, uid: int, sections_for: Any) -> LargeParts | None:
        """Header, BODYSTRUCTURE and the text parts only: memory stays bounded."""
        client = self._client()
        meta = client.fetch([uid], ["BODYSTRUCTURE", "BODY.PEEK[HEADER]"]).get(uid)
        if not meta:
            return None
        structure = meta.get(b"BODYSTRUCTURE")
        header = meta.get(b"BODY[HEADER]") or b""
        sections: list[str] = sections_for(structure)
        parts: dict[str, bytes] = {}
        if sections:
            wanted = [f"BODY.PEEK[{s}]" for s in sections]
            got = client.fetch([uid], wanted).get(uid, {})
            for section in sections:
                value = got.get(f"BODY[{section}]".encode())
                if isinstance(value, bytes):
                    parts[section] = value
        return LargeParts(header=header, bodystructure=structure, parts=parts)

    def poll(self) -> None:
        """Ask the server for news (used when it lacks IDLE)."""
        self._client().noop()
        self._forget_untagged()

    def enter_idle(self) -> bool:
        """Start IDLE; True when data already waits in the client's buffers.

        An EXISTS that arrives in the same segment as ``+ idling`` sits in imaplib's
        buffered reader (or the TLS object's buffer) where the selector will never see
        it.  A non-blocking peek catches that race.  Also True when the answer to the
        last ``new_messages`` check already announced an EXISTS: mail that landed after
        the server evaluated that UID FETCH is announced once, there, and never again in
        IDLE, so forgetting it would leave the message waiting for the next IDLE refresh.
        """
        client = self._client()
        announced = "EXISTS" in client._imap.untagged_responses
        self._forget_untagged()
        client.idle()
        self.idling = True
        return self._buffered_data() or announced

    def _buffered_data(self) -> bool:
        sock = self.sock
        if sock is None:
            return False
        reader = self._client()._imap.file
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            return bool(reader.peek(1))
        except (BlockingIOError, OSError, ValueError):
            return False
        finally:
            sock.settimeout(timeout)

    def leave_idle(self) -> None:
        if self.idling:
            self.idling = False
            self._client().idle_done()
            self._forget_untagged()

    def leave_idle_fetching(self, after_uid: int, count: int, max_bytes: int) -> Prefetch:
        """Leave IDLE and fetch what a push most likely announced, in one round trip.

        ``UID FETCH after+1:after+count`` with the metadata items and
        ``BODY.PEEK[]<0.max_bytes>`` leaves in the same segment as ``DONE`` (a client may
        pipeline commands; the server answers the IDLE first).  The range is explicit,
        never ``*``: whatever the folder holds, at most ``count`` messages of at most
        ``max_bytes`` each come back.  UIDs above the range are the drain's own
        ``new_messages``; a body that may have been cut (``max_bytes`` long) is dropped and
        fetched the usual way, under the usual size guards.
        """
        client = self._client()
        imap = client._imap
        self.idling = False
        items = meta_fetch_items(self.dialect)[:-1] + f" BODY.PEEK[]<0.{max_bytes}>)"
        tag = imap._new_tag()
        line = b"%s UID FETCH %d:%d %s" % (tag, after_uid + 1, after_uid + count, items.encode())
        send_lines = getattr(imap, "send_lines", None)
        if send_lines is not None:
            send_lines([b"DONE", line])
        else:  # a bare imaplib object (tests): the same bytes, in two writes
            imap.send(b"DONE\r\n")
            imap.send(line + b"\r\n")
        client._consume_until_tagged_response(client._idle_tag, "IDLE")
        # What IDLE announced (EXISTS, a flag change's FETCH) must not read as an answer.
        self._forget_untagged()
        typ, data = imap._command_complete("FETCH", tag)
        client._checkok("fetch", typ, data)
        typ, data = imap._untagged_response(typ, data, "FETCH")
        parsed = parse_fetch_response(data, False, True)
        return self._prefetched(after_uid, count, max_bytes, parsed)

    def _prefetched(
        self, after_uid: int, count: int, max_bytes: int, data: dict[Any, dict[bytes, Any]]
    ) -> Prefetch:
        infos: list[MessageInfo] = []
        bodies: dict[int, bytes] = {}
        nbytes = 0
        for uid, item in data.items():
            # An unsolicited flag change (``* 6 FETCH (FLAGS …)``) is keyed by its sequence
            # number and lacks what was asked for: it is not a message above the cursor.
            if not isinstance(uid, int) or not after_uid < uid <= after_uid + count:
                continue
            if b"RFC822.SIZE" not in item:
                continue
            info = self._info(uid, item)
            infos.append(info)
            body = item.get(b"BODY[]<0>")
            if isinstance(body, bytes):
                nbytes += len(body)
                if len(body) < max_bytes:
                    bodies[info.uid] = body
        infos.sort(key=lambda m: m.uid)
        return Prefetch(after_uid, tuple(infos), bodies, nbytes)

    def close(self, *, logout: bool) -> None:
        client, self.client, self.sock = self.client, None, None
        self.idling = False
        if client is None:
            return
        try:
            if logout:
                client.logout()
            else:
                client.shutdown()
        except Exception:
            # Logging out of a broken connection fails in any number of ways.
            with contextlib.suppress(Exception):
                client.shutdown()

    def abort(self) -> None:
        """Kill the socket from another thread: any blocked call on it fails at once."""
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
