"""What woke an idling session: a bare keepalive, or news that needs a sync cycle.

Dovecot sends ``* OK Still here`` to every idling session every two minutes
(``imap_idle_notify_interval``).  At 5,000 folders those arrive together, and one full
cycle per keepalive on the sync threads queued a real push 882 ms behind 4,999 cycles
that published nothing.  A bare untagged ``OK`` only proves the connection is alive, so
the loop thread reads what is waiting, without blocking, and consumes complete bare
``* OK`` lines.  Everything else means "run a cycle": EXISTS, RECENT, EXPUNGE, FETCH, an
``OK`` with a response code, BYE, a partial line, a literal, end of stream, or bytes it
cannot read.

Nothing is ever left unseen in a user-space buffer when it answers ``KEEPALIVE``: it
peeks until the socket would block, so imaplib's reader and the TLS object are both
empty and the selector reports whatever arrives next (the buffered-EXISTS race of
``FolderSession.enter_idle``, here for an EXISTS that follows a keepalive).
"""

from __future__ import annotations

import enum
import io
import ssl

from shardworker.imap.session import FolderSession

# Reads per wake before giving up and running a cycle: a flood is not a keepalive.
MAX_READS = 8


class Wake(enum.Enum):
    KEEPALIVE = "keepalive"  # bare untagged OKs only, all consumed: nothing to sync
    ACTIVITY = "activity"  # anything else: a cycle must look


def read_idle_wake(session: FolderSession) -> Wake:
    """On the loop thread, for an idling session whose socket is readable."""
    client, sock = session.client, session.sock
    if client is None or sock is None or not session.idling:
        return Wake.ACTIVITY
    reader = client._imap.file
    if not isinstance(reader, io.BufferedReader):
        return Wake.ACTIVITY
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return _absorb_keepalives(reader)
    except (OSError, ValueError):  # a reset or closed connection: the cycle reports it
        return Wake.ACTIVITY
    finally:
        sock.settimeout(timeout)


def _absorb_keepalives(reader: io.BufferedReader) -> Wake:
    absorbed = False
    for _ in range(MAX_READS):
        waiting = _peek(reader)
        if not waiting:
            # Would block (or end of stream, which reads the same here): after keepalives
            # that is the normal end; with nothing read at all the wake is not understood.
            # An end of stream right after a keepalive shows up as the next wake.
            return Wake.KEEPALIVE if absorbed else Wake.ACTIVITY
        end = keepalive_prefix(waiting)
        if end:
            reader.read(end)  # already buffered: never blocks
            absorbed = True
        if end < len(waiting):
            return Wake.ACTIVITY
    return Wake.ACTIVITY


def _peek(reader: io.BufferedReader) -> bytes:
    """What is buffered, or one non-blocking read's worth when nothing is."""
    try:
        return reader.peek(1)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return b""


def keepalive_prefix(data: bytes) -> int:
    """Length of the leading run of complete bare ``* OK`` lines in ``data``."""
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0 or not is_keepalive(data[pos : nl + 1]):
            break
        pos = nl + 1
    return pos


def is_keepalive(line: bytes) -> bool:
    """``* OK`` with free text (or none): no response code, no literal, nothing else."""
    text = line.rstrip(b"\r\n")
    if text[:4].upper() != b"* OK" or text.endswith(b"}"):
        return False
    rest = text[4:]
    return not rest or (rest[:1] == b" " and not rest[1:].lstrip().startswith(b"["))
