"""Gmail's and Exchange Online's IMAP dialects, scripted on tests/hostile_imap.py's server.

A listener opened with ``listen("gmail")`` or ``listen("exchange")`` greets and answers
CAPABILITY as that provider does; after LOGIN the mailbox behaves like the hostile
server's ``good`` role plus the provider's quirks (:class:`Quirks`, per user, set by the
test before it connects):

Gmail
    * ``X-GM-EXT-1`` and the rest of Gmail's capability lists (before and after login);
    * ``X-GM-MSGID``, ``X-GM-THRID``, ``X-GM-LABELS`` in FETCH (labels per message, with
      a modified-UTF-7 one);
    * ``LIST`` of a German account: All Mail is ``[Gmail]/Alle Nachrichten`` with ``\\All``;
    * at most 15 logged-in connections per user; the 16th LOGIN gets
      ``NO [ALERT] Too many simultaneous connections. (Failure)``.

Exchange
    * the Microsoft Exchange greeting and capability list (``IMAP4 IMAP4rev1 ...``);
    * throttling: the next ``throttle_commands`` mailbox commands (or ``throttle_logins``
      logins) answer ``NO Request is throttled. Suggested Backoff Time: N milliseconds``
      (or a bare ``NO [THROTTLED]``); with ``throttle_bye`` it is ``BAD`` followed by
      ``* BYE Connection closed. 14``, as Exchange Online does under heavy throttling;
    * ``AUTHENTICATE PLAIN`` refused for shared-mailbox names (``/`` or ``\\``), LOGIN works;
    * ``not_connected``: LOGIN succeeds, then every mailbox command answers
      ``NO User is authenticated but not connected.``
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tests.hostile_imap import _COMMAND, Connection, HostileImap, _args

GMAIL_GREETING = b"* OK Gimap ready for requests from 127.0.0.1 scripted1234\r\n"
GMAIL_CAPS_BEFORE = (
    "IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 XYZZY SASL-IR "
    "AUTH=XOAUTH2 AUTH=PLAIN AUTH=PLAIN-CLIENTTOKEN AUTH=OAUTHBEARER AUTH=XOAUTH"
)
GMAIL_CAPS_AFTER = (
    "IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 UIDPLUS "
    "COMPRESS=DEFLATE ENABLE MOVE CONDSTORE ESEARCH UTF8=ACCEPT LIST-EXTENDED LIST-STATUS "
    "LITERAL- SPECIAL-USE APPENDLIMIT=35651584"
)
GMAIL_CONNECTION_LIMIT = 15
GMAIL_CONN_CAP = b"NO [ALERT] Too many simultaneous connections. (Failure)"
GMAIL_MSGID_BASE = 1278455344230334865
GMAIL_LIST = [
    r'(\HasNoChildren) "/" "INBOX"',
    r'(\HasChildren \Noselect) "/" "[Gmail]"',
    r'(\All \HasNoChildren) "/" "[Gmail]/Alle Nachrichten"',
    r'(\Drafts \HasNoChildren) "/" "[Gmail]/Entw&APw-rfe"',
    r'(\HasNoChildren \Sent) "/" "[Gmail]/Gesendet"',
    r'(\HasNoChildren \Important) "/" "[Gmail]/Wichtig"',
    r'(\HasNoChildren \Junk) "/" "[Gmail]/Spam"',
    r'(\Flagged \HasNoChildren) "/" "[Gmail]/Markiert"',
    r'(\HasNoChildren \Trash) "/" "[Gmail]/Papierkorb"',
    r'(\HasNoChildren) "/" "Kunden/&AMQ-nderungen"',
]

EXCHANGE_GREETING = (
    b"* OK The Microsoft Exchange IMAP4 service is ready. [UwBDAFIASQBQAFQARQBEAA==]\r\n"
)
EXCHANGE_CAPS = (
    "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID UNSELECT CHILDREN IDLE "
    "NAMESPACE LITERAL+"
)
EXCHANGE_LIST = [
    r'(\Marked \HasNoChildren) "/" INBOX',
    r'(\HasNoChildren \Sent) "/" "Sent Items"',
    r'(\HasNoChildren \Trash) "/" "Deleted Items"',
    r'(\HasNoChildren \Junk) "/" "Junk Email"',
    r'(\HasNoChildren \Drafts) "/" Drafts',
    r'(\HasNoChildren) "/" Archive',
]
NOT_CONNECTED = b"NO User is authenticated but not connected."
# Commands Exchange answers with "not connected" / throttles; the rest always work.
_MAILBOX_COMMANDS = frozenset({"SELECT", "EXAMINE", "LIST", "UID", "STATUS", "NOOP", "IDLE"})


@dataclass
class Quirks:
    """Per-user behaviour of a dialect mailbox (set before the test connects)."""

    throttle_commands: int = 0  # Exchange: how many of the next mailbox commands to refuse
    throttle_ms: int | None = 2000  # None: a bare [THROTTLED] answer without a delay
    throttle_bye: bool = False  # answer BAD and hang up with "* BYE Connection closed. 14"
    throttle_logins: int = 0  # Exchange: how many of the next logins to throttle
    not_connected: bool = False  # Exchange: "User is authenticated but not connected"
    labels: dict[int, tuple[str, ...]] = field(default_factory=dict)  # Gmail, by index
    thread_of: dict[int, int] = field(default_factory=dict)  # Gmail: index -> root index
    throttled: int = 0  # how many commands were refused so far


class DialectConnection(Connection):
    """The hostile server's connection, speaking Gmail or Exchange on those listeners."""

    server: DialectImap

    def __init__(self, server: HostileImap, *args: object) -> None:
        super().__init__(server, *args)  # type: ignore[arg-type]
        self.dialect = ""
        self.counted: str | None = None

    @property
    def quirks(self) -> Quirks:
        assert self.mailbox is not None
        return self.server.quirks_of(self.mailbox.user)

    async def greet(self, mode: str) -> bool:
        if mode == "gmail":
            self.dialect = mode
            await self.send(GMAIL_GREETING)
            return True
        if mode == "exchange":
            self.dialect = mode
            await self.send(EXCHANGE_GREETING)
            return True
        return await super().greet(mode)

    def close(self) -> None:
        if self.counted is not None:
            self.server.logged_in[self.counted] -= 1
            self.counted = None
        super().close()

    def handlers(self) -> dict[str, Callable[[bytes, bytes], Awaitable[bool]]]:
        out = super().handlers()
        out.update({"LIST": self.list_folders, "AUTHENTICATE": self.authenticate})
        return out

    async def command(self, line: bytes) -> bool:
        m = _COMMAND.match(line) if self.idle_tag is None else None
        if m is not None and self.dialect == "exchange" and self.mailbox is not None:
            cmd = m.group("cmd").upper().decode()
            refusal = self.exchange_refusal(cmd)
            if refusal is not None:
                await self.send(m.group("tag") + b" " + refusal + b"\r\n")
                if self.quirks.throttle_bye:
                    await self.send(b"* BYE Connection closed. 14\r\n")
                    return False
                return True
        return await super().command(line)

    def exchange_refusal(self, cmd: str) -> bytes | None:
        if cmd not in _MAILBOX_COMMANDS:
            return None
        q = self.quirks
        if q.not_connected:
            return NOT_CONNECTED
        if q.throttle_commands > 0:
            q.throttle_commands -= 1
            q.throttled += 1
            return self.throttled_answer(q)
        return None

    @staticmethod
    def throttled_answer(q: Quirks) -> bytes:
        verb = b"BAD" if q.throttle_bye else b"NO"
        if q.throttle_ms is None:
            return verb + b" [THROTTLED] Request is throttled."
        return verb + b" Request is throttled. Suggested Backoff Time: %d milliseconds" % (
            q.throttle_ms
        )

    # -- commands ------------------------------------------------------------------------

    async def capability(self, tag: bytes, args: bytes) -> bool:
        if not self.dialect:
            return await super().capability(tag, args)
        if self.dialect == "gmail":
            caps = GMAIL_CAPS_AFTER if self.mailbox is not None else GMAIL_CAPS_BEFORE
        else:
            caps = EXCHANGE_CAPS
        line = f"* CAPABILITY {caps}\r\n".encode()
        await self.send(line + tag + b" OK CAPABILITY completed.\r\n")
        return True

    async def login(self, tag: bytes, args: bytes) -> bool:
        if not self.dialect:
            return await super().login(tag, args)
        user = _args(args)[0].decode()
        return await self.log_in_as(tag, user, b"LOGIN completed.")

    async def log_in_as(self, tag: bytes, user: str, ok: bytes) -> bool:
        q = self.server.quirks_of(user)
        if self.dialect == "exchange" and q.throttle_logins > 0:
            q.throttle_logins -= 1
            q.throttled += 1
            await self.send(tag + b" " + self.throttled_answer(q) + b"\r\n")
            return True
        if self.dialect == "gmail" and self.server.logged_in[user] >= GMAIL_CONNECTION_LIMIT:
            self.server.refused[user] += 1
            await self.send(tag + b" " + GMAIL_CONN_CAP + b"\r\n")
            return True
        self.mailbox = self.server.mailbox(user)
        self.mailbox.logins.append(self.server.loop.time())
        self.server.logged_in[user] += 1
        self.counted = user
        await self.send(tag + b" OK " + ok + b"\r\n")
        return True

    async def authenticate(self, tag: bytes, args: bytes) -> bool:
        parts = args.split()
        if not parts or parts[0].upper() != b"PLAIN":
            await self.send(tag + b" NO unsupported mechanism\r\n")
            return True
        if len(parts) > 1:
            response = parts[1]
        else:
            await self.send(b"+ \r\n")
            response = (await self.reader.readline()).strip()
        try:
            _authz, authc, _password = base64.b64decode(response, validate=True).split(b"\0")
        except (binascii.Error, ValueError):
            await self.send(tag + b" BAD invalid SASL response\r\n")
            return True
        user = authc.decode("utf-8", "replace")
        if self.dialect == "exchange" and ("/" in user or "\\" in user):
            self.server.plain_refused[user] += 1
            await self.send(tag + b" NO AUTHENTICATE failed.\r\n")
            return True
        return await self.log_in_as(tag, user, b"AUTHENTICATE completed.")

    async def list_folders(self, tag: bytes, args: bytes) -> bool:
        if self.mailbox is None:
            await self.send(tag + b" NO log in first\r\n")
            return True
        lines = {"gmail": GMAIL_LIST, "exchange": EXCHANGE_LIST}.get(self.dialect, [
            r'(\HasNoChildren) "/" "INBOX"'
        ])  # fmt: skip
        out = b"".join(f"* LIST {entry}\r\n".encode() for entry in lines)
        await self.send(out + tag + b" OK LIST completed.\r\n")
        return True

    # -- Gmail FETCH attributes -----------------------------------------------------------

    def fetch_one(self, seq: int, uid: int, items: bytes) -> bytes:
        answer = super().fetch_one(seq, uid, items)
        if self.dialect != "gmail" or b"X-GM-" not in items or not answer:
            return answer
        index = uid - 1
        q = self.quirks
        labels = " ".join(_quote_label(lbl) for lbl in q.labels.get(index, ("\\Inbox",)))
        root = q.thread_of.get(index, index)
        gm = (
            f"X-GM-THRID {GMAIL_MSGID_BASE + root} X-GM-MSGID {GMAIL_MSGID_BASE + index} "
            f"X-GM-LABELS ({labels}) "
        ).encode()
        return answer.replace(b"FETCH (", b"FETCH (" + gm, 1)


def _quote_label(label: str) -> str:
    if label.startswith("\\") or (label.isascii() and label.replace("-", "").isalnum()):
        return label
    return '"' + label.replace("\\", "\\\\").replace('"', '\\"') + '"'


class DialectImap(HostileImap):
    """The hostile server plus ``listen("gmail")`` / ``listen("exchange")`` listeners."""

    connection_class = DialectConnection

    def __init__(self, **kwargs: float) -> None:
        super().__init__(**kwargs)
        self.quirks: dict[str, Quirks] = {}
        self.logged_in: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # Gmail logins refused by the connection cap
        self.plain_refused: Counter[str] = Counter()  # Exchange PLAIN refused (shared names)

    def quirks_of(self, user: str) -> Quirks:
        return self.quirks.setdefault(user, Quirks())
