"""A scriptable, hostile IMAP4rev1 server for the reliability tests.

One asyncio loop on a background thread serves any number of loopback listeners.  What a
connection does after LOGIN is chosen by the user name: ``<role>-<anything>`` (``good-1``,
``hugefast-x``...), so one server plays many roles at once.  What it does *before* LOGIN
cannot depend on the user, so each pre-login behaviour gets its own port
(:meth:`HostileImap.listen`).

It speaks just enough IMAP for shardworker's client path: greeting, CAPABILITY, LOGIN,
SELECT/EXAMINE, UID FETCH (``RFC822.SIZE INTERNALDATE``, alone or with a partial
``BODY.PEEK[]<0.n>``; ``BODY.PEEK[]``, ``BODYSTRUCTURE``, ``BODY.PEEK[HEADER]``,
``BODY.PEEK[n]``), UID SEARCH, IDLE/DONE (a command pipelined behind DONE too), NOOP and
LOGOUT.  The
``good`` role behaves correctly, so the same server can host a healthy mailbox.

Post-login roles (``phase`` says which command misbehaves):

==============  ==========  ==================================================================
role            phase       behaviour
==============  ==========  ==================================================================
good            -           a correct server
garbage         select      answers EXAMINE with a line of binary junk
truncated       meta        cuts the ``UID FETCH n:*`` answer mid-line and hangs up
hugefast        body        announces a 2 GiB literal and sends data as fast as it can
hugetrickle     body        announces a 2 GiB literal and trickles it
cutlit          body        announces a 200 KB literal, sends 1 KB, hangs up
endless         body        a line that never ends, as fast as it can
drip            select      the EXAMINE answer, one byte per second
driplit         body        a small literal, one byte per 0.1 s
mute            select      never answers EXAMINE (the connection stays open)
flip            -           UIDVALIDITY alternates A/B per login, UIDs renumbered; every
                            session is cut ``kick_after_s`` after it enters IDLE
ghost           body        EXISTS and ``RFC822.SIZE`` for delivered mail, but the body
                            FETCH returns nothing; mail delivered with ``real=True`` is fine
echo            idle        every IDLE is answered with ``+ idling`` and, in the same
                            segment, ``* n EXISTS`` for mail that FETCH never finds
==============  ==========  ==================================================================

Pre-login behaviours (per listener): ``normal``, ``silent`` (accept, never speak),
``greet-silent`` (greet, never answer a command), ``garbage`` (binary junk greeting),
``drip`` (greeting one byte per second).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

HUGE_LITERAL = 2 * 1024 * 1024 * 1024
CHUNK = b"x" * (1024 * 1024)
FLIP_OFFSET = 100  # UIDs under validity B are the A UIDs plus this
PHANTOMS = 3  # messages an ``echo`` mailbox counts in EXISTS that FETCH never finds
INTERNALDATE = '"01-Jan-2024 00:00:00 +0000"'
GARBAGE = b"\x00\xff\xfe\x80 garbage \x1b[31m\x07 )))((( \xc3\x28\r\n"

_PARTIAL = re.compile(rb"BODY\.PEEK\[\]<0\.(\d+)>")
_COMMAND = re.compile(rb"^(?P<tag>[^\s]+) (?P<cmd>[A-Za-z]+)(?: (?P<args>.*))?$")
_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"|(\S+)')


@dataclass(eq=False)
class Mailbox:
    """One user's INBOX; ``raws[i]`` has UID ``i + 1`` under validity A."""

    user: str
    role: str
    raws: list[bytes] = field(default_factory=list)
    ghosts: set[int] = field(default_factory=set)  # indexes whose body FETCH finds nothing
    logins: list[float] = field(default_factory=list)
    commands: Counter[str] = field(default_factory=Counter)
    idle_entered: list[float] = field(default_factory=list)
    idlers: set[Connection] = field(default_factory=set)
    validity_by_login: list[int] = field(default_factory=list)

    @property
    def flipped(self) -> bool:
        # Odd logins (1st, 3rd...) see validity A, even ones B.
        return self.role == "flip" and len(self.logins) % 2 == 0

    def uid_validity(self, flipped: bool) -> int:
        return 2000 if flipped else 1000

    def uid_of(self, index: int, flipped: bool) -> int:
        return index + 1 + (FLIP_OFFSET if flipped else 0)

    def uids(self, flipped: bool) -> list[int]:
        return [self.uid_of(i, flipped) for i in range(len(self.raws))]


def _parse_set(text: str, top: int) -> list[tuple[int, int]]:
    ranges = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        a = top if lo == "*" else int(lo)
        b = a if not hi else (top if hi == "*" else int(hi))
        ranges.append((min(a, b), max(a, b)))
    return ranges


def _in_set(uid: int, ranges: Iterable[tuple[int, int]]) -> bool:
    return any(lo <= uid <= hi for lo, hi in ranges)


def _args(raw: bytes) -> list[bytes]:
    out = []
    for m in _QUOTED.finditer(raw):
        if m.group(1) is not None:
            out.append(re.sub(rb"\\(.)", rb"\1", m.group(1)))
        else:
            out.append(m.group(2))
    return out


class Connection:
    """One client connection: a tiny IMAP state machine with role hooks."""

    def __init__(
        self,
        server: HostileImap,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.mailbox: Mailbox | None = None
        self.flipped = False
        self.idle_tag: bytes | None = None
        self.kick: asyncio.TimerHandle | None = None

    # -- plumbing --------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def drip(self, data: bytes, every_s: float) -> None:
        for i in range(len(data)):
            await self.send(data[i : i + 1])
            await asyncio.sleep(every_s)

    async def hang(self) -> None:
        """Keep the connection open and say nothing until the client goes away."""
        while await self.reader.read(4096):
            pass

    def close(self) -> None:
        if self.kick is not None:
            self.kick.cancel()
        if self.mailbox is not None:
            self.mailbox.idlers.discard(self)
        with contextlib.suppress(Exception):
            self.writer.close()

    # -- session ---------------------------------------------------------------------

    async def serve(self, before_login: str) -> None:
        try:
            if not await self.greet(before_login):
                return
            while True:
                line = await self.reader.readline()
                if not line:
                    return
                if not await self.command(line.rstrip(b"\r\n")):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self.close()

    async def greet(self, mode: str) -> bool:
        greeting = b"* OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS] hostile ready\r\n"
        if mode == "silent":
            await self.hang()
            return False
        if mode == "garbage":
            await self.send(GARBAGE)
            await self.hang()
            return False
        if mode == "drip":
            await self.drip(greeting, 1.0)
        else:
            await self.send(greeting)
        if mode == "greet-silent":
            await self.hang()
            return False
        return True

    async def command(self, line: bytes) -> bool:
        if self.idle_tag is not None:
            return await self.done(line)
        m = _COMMAND.match(line)
        if m is None:
            await self.send(b"* BAD what?\r\n")
            return True
        tag, cmd = m.group("tag"), m.group("cmd").upper().decode()
        args = m.group("args") or b""
        if self.mailbox is not None:
            self.mailbox.commands[cmd] += 1
        handler = self.handlers().get(cmd)
        if handler is None:
            await self.send(tag + b" BAD unknown command\r\n")
            return True
        return await handler(tag, args)

    def handlers(self) -> dict[str, Callable[[bytes, bytes], Awaitable[bool]]]:
        return {
            "CAPABILITY": self.capability,
            "LOGIN": self.login,
            "SELECT": self.select,
            "EXAMINE": self.select,
            "UID": self.uid,
            "IDLE": self.idle,
            "NOOP": self.noop,
            "LOGOUT": self.logout,
        }

    async def capability(self, tag: bytes, args: bytes) -> bool:
        await self.send(b"* CAPABILITY IMAP4rev1 IDLE UIDPLUS\r\n" + tag + b" OK done\r\n")
        return True

    async def noop(self, tag: bytes, args: bytes) -> bool:
        await self.send(tag + b" OK NOOP done\r\n")
        return True

    async def logout(self, tag: bytes, args: bytes) -> bool:
        await self.send(b"* BYE bye\r\n" + tag + b" OK LOGOUT done\r\n")
        return False

    async def login(self, tag: bytes, args: bytes) -> bool:
        user = _args(args)[0].decode()
        self.mailbox = self.server.mailbox(user)
        self.mailbox.logins.append(time.monotonic())
        self.flipped = self.mailbox.flipped
        await self.send(tag + b" OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS] logged in\r\n")
        return True

    async def select(self, tag: bytes, args: bytes) -> bool:
        box = self.mailbox
        if box is None:
            await self.send(tag + b" NO log in first\r\n")
            return True
        role = box.role
        if role == "mute":
            await self.hang()
            return False
        if role == "garbage":
            await self.send(GARBAGE)
            await self.hang()
            return False
        box.validity_by_login.append(box.uid_validity(self.flipped))
        text = self.select_answer(tag)
        if role == "drip":
            await self.drip(text, 1.0)
        else:
            await self.send(text)
        return True

    def select_answer(self, tag: bytes) -> bytes:
        box = self.mailbox
        assert box is not None
        exists = len(box.raws) + (PHANTOMS if box.role == "echo" else 0)
        uid_next = self.uid_next()
        return (
            (
                f"* FLAGS (\\Seen)\r\n* {exists} EXISTS\r\n* 0 RECENT\r\n"
                f"* OK [UIDVALIDITY {box.uid_validity(self.flipped)}] ok\r\n"
                f"* OK [UIDNEXT {uid_next}] ok\r\n"
            ).encode()
            + tag
            + b" OK [READ-ONLY] EXAMINE done\r\n"
        )

    def uid_next(self) -> int:
        box = self.mailbox
        assert box is not None
        base = FLIP_OFFSET if self.flipped else 0
        if box.role == "echo":
            base += PHANTOMS
        return base + len(box.raws) + 1

    # -- IDLE ------------------------------------------------------------------------

    async def idle(self, tag: bytes, args: bytes) -> bool:
        box = self.mailbox
        assert box is not None
        self.idle_tag = tag
        box.idle_entered.append(time.monotonic())
        box.idlers.add(self)
        if box.role == "echo":
            await self.send(f"+ idling\r\n* {len(box.raws) + PHANTOMS} EXISTS\r\n".encode())
            return True
        await self.send(b"+ idling\r\n")
        if box.role == "flip":
            loop = asyncio.get_running_loop()
            self.kick = loop.call_later(self.server.kick_after_s, self.cut)
        return True

    def cut(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"* BYE kicked\r\n")
        self.close()

    async def done(self, line: bytes) -> bool:
        if self.kick is not None:
            self.kick.cancel()
            self.kick = None
        tag, self.idle_tag = self.idle_tag, None
        assert self.mailbox is not None and tag is not None
        self.mailbox.idlers.discard(self)
        if line.upper() != b"DONE":
            await self.send(tag + b" BAD expected DONE\r\n")
            return True
        await self.send(tag + b" OK IDLE terminated\r\n")
        return True

    def notify(self, exists: int) -> None:
        """Called on the loop thread when mail is delivered: push EXISTS to an idler."""
        with contextlib.suppress(Exception):
            self.writer.write(f"* {exists} EXISTS\r\n".encode())

    # -- UID FETCH / SEARCH ------------------------------------------------------------

    async def uid(self, tag: bytes, args: bytes) -> bool:
        sub, _, rest = args.partition(b" ")
        if sub.upper() == b"SEARCH":
            uids = " ".join(str(u) for u in self.visible_uids())
            await self.send(f"* SEARCH {uids}\r\n".encode() + tag + b" OK SEARCH done\r\n")
            return True
        if sub.upper() != b"FETCH":
            await self.send(tag + b" BAD only UID FETCH and UID SEARCH\r\n")
            return True
        uid_set, _, items = rest.partition(b" ")
        return await self.fetch(tag, uid_set.decode(), items.upper())

    def visible_uids(self) -> list[int]:
        box = self.mailbox
        assert box is not None
        return [] if box.role == "echo" else box.uids(self.flipped)

    async def fetch(self, tag: bytes, uid_set: str, items: bytes) -> bool:
        box = self.mailbox
        assert box is not None
        uids = self.visible_uids()
        ranges = _parse_set(uid_set, max(uids, default=0))
        wanted = [(seq, uid) for seq, uid in enumerate(uids, 1) if _in_set(uid, ranges)]
        body = b"BODY.PEEK[]" in items
        if body and box.role in self.server.body_roles:
            return await self.server.body_roles[box.role](self, tag)
        if wanted and not body and b"RFC822.SIZE" in items and box.role == "truncated":
            await self.send(b"* 1 FETCH (UID 1 RFC822.SIZE 12")
            return False
        out = b"".join(self.fetch_one(seq, uid, items) for seq, uid in wanted)
        await self.send(out + tag + b" OK FETCH done\r\n")
        return True

    def fetch_one(self, seq: int, uid: int, items: bytes) -> bytes:
        box = self.mailbox
        assert box is not None
        index = uid - 1 - (FLIP_OFFSET if self.flipped else 0)
        raw = box.raws[index]
        if b"RFC822.SIZE" in items:
            meta = f"UID {uid} RFC822.SIZE {len(raw)} INTERNALDATE {INTERNALDATE}".encode()
            partial = _PARTIAL.search(items)
            if partial is not None and index not in box.ghosts:
                cut = raw[: int(partial.group(1))]
                meta += b" BODY[]<0> {%d}\r\n" % len(cut) + cut
            return b"* %d FETCH (%s)\r\n" % (seq, meta)
        if index in box.ghosts:
            return b""
        header, sep, text = raw.partition(b"\n\n")
        parts = []
        if b"BODYSTRUCTURE" in items:
            leaf = f'("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" {len(text)} 1)'
            parts.append(b"BODYSTRUCTURE " + leaf.encode())
        if b"BODY.PEEK[HEADER]" in items:
            parts.append(b"BODY[HEADER] {%d}\r\n" % len(header + sep) + header + sep)
        if b"BODY.PEEK[1]" in items:
            parts.append(b"BODY[1] {%d}\r\n" % len(text) + text)
        if b"BODY.PEEK[]" in items:
            parts.append(b"BODY[] {%d}\r\n" % len(raw) + raw)
        return b"* %d FETCH (UID %d " % (seq, uid) + b" ".join(parts) + b")\r\n"


# -- hostile body FETCH answers ------------------------------------------------------------


async def _huge(conn: Connection, trickle: bool) -> bool:
    await conn.send(b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % HUGE_LITERAL)
    sent = 0
    while sent < HUGE_LITERAL:
        if trickle:
            await conn.send(b"x")
            await asyncio.sleep(0.1)
            sent += 1
        else:
            await conn.send(CHUNK)
            sent += len(CHUNK)
    return False


async def _hugefast(conn: Connection, tag: bytes) -> bool:
    return await _huge(conn, trickle=False)


async def _hugetrickle(conn: Connection, tag: bytes) -> bool:
    return await _huge(conn, trickle=True)


async def _cutlit(conn: Connection, tag: bytes) -> bool:
    await conn.send(b"* 1 FETCH (UID 1 BODY[] {200000}\r\n" + b"y" * 1000)
    return False


async def _endless(conn: Connection, tag: bytes) -> bool:
    await conn.send(b"* 1 FETCH (UID 1 X-GARBAGE ")
    while True:
        await conn.send(CHUNK)


async def _driplit(conn: Connection, tag: bytes) -> bool:
    await conn.send(b"* 1 FETCH (UID 1 BODY[] {300}\r\n")
    await conn.drip(b"z" * 300 + b")\r\n" + tag + b" OK FETCH done\r\n", 0.1)
    return True


# -- the server --------------------------------------------------------------------------


class HostileImap:
    """The server: ``start()``, then ``port`` / ``listen(mode)``, ``deliver()``, ``close()``."""

    # tests/dialect_imap.py serves Gmail's and Exchange's dialects with a subclass.
    connection_class: type[Connection] = Connection

    def __init__(self, *, kick_after_s: float = 0.7) -> None:
        self.kick_after_s = kick_after_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.mailboxes: dict[str, Mailbox] = {}
        self.accepts: dict[int, list[float]] = {}
        self.port = 0
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[Connection] = set()
        self.body_roles: dict[str, Callable[[Connection, bytes], Awaitable[bool]]] = {
            "hugefast": _hugefast,
            "hugetrickle": _hugetrickle,
            "cutlit": _cutlit,
            "endless": _endless,
            "driplit": _driplit,
        }

    def start(self) -> HostileImap:
        self.thread.start()
        self.port = self.listen("normal")
        return self

    def _call(self, fn: Callable[[], object]) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        if not done.wait(5):
            raise RuntimeError("hostile IMAP loop is not responding")

    def listen(self, before_login: str) -> int:
        """A new port whose connections behave as ``before_login`` until LOGIN."""

        async def start() -> int:
            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                self.accepts[port].append(time.monotonic())
                task = asyncio.current_task()
                assert task is not None
                self._tasks.add(task)
                conn = self.connection_class(self, r, w)
                self._conns.add(conn)
                try:
                    await conn.serve(before_login)
                finally:
                    self._tasks.discard(task)
                    self._conns.discard(conn)

            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self._servers.append(server)
            port = int(server.sockets[0].getsockname()[1])
            self.accepts[port] = []
            return port

        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)

    def mailbox(self, user: str) -> Mailbox:
        box = self.mailboxes.get(user)
        if box is None:
            box = self.mailboxes[user] = Mailbox(user, user.split("-", 1)[0])
        return box

    def deliver(self, user: str, raw: bytes, *, real: bool = False) -> None:
        """Add a message; EXISTS goes to the user's idling connections.  A ``ghost``
        mailbox hides the body of every message not delivered with ``real=True``."""

        def add() -> None:
            box = self.mailbox(user)
            box.raws.append(raw)
            if box.role == "ghost" and not real:
                box.ghosts.add(len(box.raws) - 1)
            for conn in list(box.idlers):
                conn.notify(len(box.raws))

        self._call(add)

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                server.close()
            for conn in list(self._conns):
                conn.close()  # each handler then sees EOF or a failed write and returns
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
