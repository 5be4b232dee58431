"""Reading from an IMAP server that may be broken or hostile: bounded in size and time.

imaplib trusts the server.  A literal announced as ``{2147483648}`` makes it allocate and
fill 2 GiB; a line may run to 1 MB; and since every byte that arrives restarts the socket
timeout, a server that drips one byte per second keeps any read alive for days.
:class:`GuardedIMAP4` replaces imaplib's two read primitives:

* ``read`` (literals) refuses a size above ``max_literal_bytes`` before reading a byte of
  it, then reads in chunks, so memory follows what arrived rather than what was announced;
* ``readline`` stops at ``MAX_LINE_BYTES``;
* both must finish within the socket timeout plus the time their bytes need at
  ``MIN_RATE_BYTES_S``: a drip is cut after about one timeout, a big literal on a slow
  but honest link is not.

The errors are shardworker's own (``ImapProtocolError``, ``ImapTransientError`` with reason
``timeout``), so the engine records them on the provider and backs off.
"""

from __future__ import annotations

import imaplib
import io
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

from imapclient import IMAPClient

from shardworker import netpolicy
from shardworker.deadline import Deadline, Watch
from shardworker.errors import ImapProtocolError, ImapTransientError
from shardworker.netpolicy import OutboundPolicy

MAX_LINE_BYTES = 1_000_000  # imaplib's own limit: a UID SEARCH of a big mailbox needs it
MIN_RATE_BYTES_S = 64 * 1024
CHUNK_BYTES = 64 * 1024
# Above max_raw_bytes a literal is a header block or one text part (each ≤ 4 MiB on the
# wire, see shardworker.mime.large); the margin also absorbs RFC822.SIZE disagreeing with
# the body a little.
LITERAL_MARGIN_BYTES = 8 * 1024 * 1024
_FORBIDDEN = re.compile(rb"[\r\n\x00]")


def _check_line(body: bytes) -> None:
    if _FORBIDDEN.search(body):
        raise ImapProtocolError(
            "refused to send a command with an embedded CR, LF or NUL character"
        )


def literal_cap(max_raw_bytes: int) -> int:
    """The largest literal a client accepts when messages above ``max_raw_bytes`` are
    never fetched whole."""
    return max_raw_bytes + LITERAL_MARGIN_BYTES


class _Deadline:
    """The time one line or literal may take; shortens the socket timeout to fit it."""

    def __init__(self, sock: socket.socket, what: str) -> None:
        self.sock = sock
        self.what = what
        self.base = sock.gettimeout() or 0.0
        self.start = time.monotonic()
        self.shortened = False

    def arm(self, received: int) -> None:
        """Before each blocking read: fail when the time is up, else wait no longer."""
        left = self.start + self.base + received / MIN_RATE_BYTES_S - time.monotonic()
        if left <= 0:
            raise self.expired(received)
        if left < self.base:
            self.sock.settimeout(left)
            self.shortened = True

    def expired(self, received: int) -> ImapTransientError:
        spent = time.monotonic() - self.start
        return ImapTransientError(
            f"timed out after {spent:.1f}s waiting for the server to finish a {self.what} "
            f"({received} bytes arrived)",
            reason="timeout",
        )

    def restore(self) -> None:
        if self.shortened:
            self.sock.settimeout(self.base)


@dataclass(frozen=True)
class Dialling:
    """How a connection is opened: the outbound policy, the total deadline and its watch."""

    policy: OutboundPolicy
    deadline: Deadline
    watch: Watch | None = None
    # Non-empty: only a loopback address may be connected to (a plain-text login).
    loopback_only: str = ""


class GuardedIMAP4(imaplib.IMAP4):
    """imaplib's client over plain TCP or implicit TLS, with bounded reads and a vetted
    destination; nothing with an embedded CR, LF or NUL is ever sent."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float | None,
        tls: SSLContext | None,
        max_literal_bytes: int,
        dialling: Dialling | None = None,
    ) -> None:
        self.max_literal_bytes = max_literal_bytes
        self._sw_tls = tls
        self._sw_dialling = dialling or Dialling(OutboundPolicy(), Deadline(timeout or 30.0))
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        d = self._sw_dialling
        sock = netpolicy.connect(self.host, self.port, d.policy, d.deadline,
                                 what="IMAP server", loopback_only=d.loopback_only)  # fmt: skip
        if d.watch is not None:
            d.watch.track(sock)
        if self._sw_tls is None:
            return sock
        try:
            # The certificate is checked against the host name, not the vetted address.
            return self._sw_tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise

    def send(self, data: Any) -> None:  # imaplib types it as a Buffer
        """Refuse a command line with CR, LF or NUL inside it (IMAP command injection).

        shardworker never sends literals (APPEND), so every chunk imaplib writes is a
        command line, a SASL response or a bare CRLF: none may carry a line break.
        """
        raw = bytes(data)
        _check_line(raw[:-2] if raw.endswith(b"\r\n") else raw)
        super().send(raw)

    def send_lines(self, lines: Sequence[bytes]) -> None:
        """Several command lines (each without its CRLF) in one write: a pipelined
        ``DONE`` and the next command leave in one segment, one round trip for both."""
        for line in lines:
            _check_line(line)
        super().send(b"".join(line + b"\r\n" for line in lines))

    def _guarded_reader(self) -> io.BufferedReader | None:
        # imapclient's idle_check makes the socket non-blocking: keep imaplib's behaviour.
        if self.sock.gettimeout() and isinstance(self.file, io.BufferedReader):
            return self.file
        return None

    def read(self, size: int) -> bytes:
        if size > self.max_literal_bytes:
            raise ImapProtocolError(
                f"server announced a {size}-byte literal, over the "
                f"{self.max_literal_bytes}-byte cap"
            )
        reader = self._guarded_reader()
        if reader is None:
            return super().read(size)
        deadline = _Deadline(self.sock, f"{size}-byte literal")
        chunks: list[bytes] = []
        got = 0
        try:
            while got < size:
                deadline.arm(got)
                chunk = reader.read1(min(size - got, CHUNK_BYTES))
                if not chunk:
                    raise self.abort(f"socket error: EOF after {got} of a {size}-byte literal")
                chunks.append(chunk)
                got += len(chunk)
        except TimeoutError:
            raise deadline.expired(got) from None
        finally:
            deadline.restore()
        return b"".join(chunks)

    def readline(self) -> bytes:
        reader = self._guarded_reader()
        if reader is None:
            return super().readline()
        deadline = _Deadline(self.sock, "response line")
        parts: list[bytes] = []
        got = 0
        try:
            while True:
                deadline.arm(got)
                buffered = reader.peek(CHUNK_BYTES)
                if not buffered:
                    break  # EOF: imaplib reports the empty or unterminated line
                end = buffered.find(b"\n", 0, CHUNK_BYTES)
                take = end + 1 if end >= 0 else min(len(buffered), CHUNK_BYTES)
                parts.append(reader.read(take))
                got += len(parts[-1])
                if end >= 0:
                    break
                if got > MAX_LINE_BYTES:
                    raise ImapProtocolError(
                        f"server sent a line longer than {MAX_LINE_BYTES} bytes"
                    )
        except TimeoutError:
            raise deadline.expired(got) from None
        finally:
            deadline.restore()
        return b"".join(parts)


class GuardedClient(IMAPClient):  # type: ignore[misc]  # imapclient ships no types
    """An ``IMAPClient`` whose imaplib object is a :class:`GuardedIMAP4`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: bool,
        ssl_context: SSLContext,
        timeout: Any,
        max_literal_bytes: int,
        dialling: Dialling | None = None,
    ) -> None:
        self.max_literal_bytes = max_literal_bytes
        self.dialling = dialling
        super().__init__(host, port, ssl=ssl, ssl_context=ssl_context, timeout=timeout)

    def _create_IMAP4(self) -> GuardedIMAP4:
        return GuardedIMAP4(
            self.host,
            self.port,
            timeout=self._timeout.connect,
            tls=self.ssl_context if self.ssl else None,
            max_literal_bytes=self.max_literal_bytes,
            dialling=self.dialling,
        )
