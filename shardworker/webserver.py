"""An ASGI app served by uvicorn on its own thread, with the limits uvicorn lacks.

Both HTTP listeners (metrics/health and the admin API with its console) run here.  uvicorn
brings the HTTP parsing (h11) and the event loop; this module adds what an attack review
found missing, in one small protocol subclass:

* **A total deadline per request.**  uvicorn times out only the pause *between* requests
  (keep-alive), so a connection that never sends a byte, or sends a header byte every 20 s,
  was held forever.  Here a fresh connection must start a request within
  ``idle_timeout_s`` and a request must arrive completely (headers and body) within
  ``request_timeout_s`` of its first byte; otherwise 408 and close.
* **A bounded number of connections.**  At ``max_connections`` a new connection evicts the
  oldest connection that has no request in progress (an idle client loses its socket, not a
  probe that is sending), or is refused with 503 when every connection is busy.  The process
  never reaches its file-descriptor limit, where accept() would fail for the kubelet too.
* **Strict framing.**  h11 merges duplicate identical ``Content-Length`` headers into one;
  a request with two (or a list, or anything but digits) is refused with 400 before h11 sees
  it, since intermediaries may frame such a request differently (request smuggling).
* **JSON errors without tracebacks.**  A malformed request line gets a JSON 400.

Pipelined requests are served, but only the first head of a segment is screened for
duplicate ``Content-Length``; h11 still refuses conflicting values in the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import h11
import orjson
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from shardworker.errors import ConfigError
from shardworker.logs import get_logger

log = get_logger(__name__)

_HEAD_END = b"\r\n\r\n"
_HEAD_MAX = 64 * 1024
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:(.*)$", re.IGNORECASE | re.MULTILINE)
_DIGITS = re.compile(rb"[0-9]{1,15}")
_START_TIMEOUT_S = 5.0
_WARN_EVERY_S = 10.0
_DEFER_ACCEPT_S = 5
# How many connections asyncio accepts per wake-up (uvicorn's backlog): their descriptors
# are all open before the evicted ones close, so this bounds the overshoot above
# max_connections.  The kernel's queue is made longer once serving, so a probe's SYN is
# not dropped (and retried a second later) behind a burst.
_BACKLOG = 128
_KERNEL_BACKLOG = 1024


@dataclass(frozen=True)
class Limits:
    """Per-listener bounds (seconds and counts)."""

    request_timeout_s: float = 30.0
    idle_timeout_s: float = 10.0
    keepalive_s: float = 5.0
    max_connections: int = 256


def error_bytes(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 response with a JSON error body; the connection is closed after."""
    body = orjson.dumps({"error": reason.lower(), "field": None, "message": message})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def framing_problem(head: bytes) -> str | None:
    """Why a request head must be refused, or None.  ``head`` ends before the blank line."""
    values = _CONTENT_LENGTH.findall(head)
    if len(values) > 1:
        return "more than one Content-Length header"
    if values and not _DIGITS.fullmatch(values[0].strip()):
        return "Content-Length must be a decimal number"
    return None


class _Connections:
    """What one listener's connections share: the idle ones oldest first, the closing count."""

    def __init__(self) -> None:
        self.idle: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self.closing = 0
        self.refused = 0
        self.warned_at = float("-inf")


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines, a connection cap and strict framing."""

    limits = Limits()
    shared = _Connections()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._receiving = False
        self._closing = False
        if self._make_room():
            self.shared.idle[self] = None
            self._arm(self.limits.idle_timeout_s, receiving=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.shared.idle.pop(self, None)
        if self._closing:
            self.shared.closing -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.shared.idle.pop(self, None)  # busy until its response is complete
        if self.conn.their_state is h11.IDLE and not self._screen(data):
            return
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.shared.idle[self] = None

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer to what h11 cannot parse, as JSON; its warning is logged.
        self._refuse(400, "Bad Request", "invalid HTTP request")

    # -- limits --------------------------------------------------------------------------

    def _make_room(self) -> bool:
        """Below the cap, or the oldest idle connection closed to make room; else refused."""
        shared = self.shared
        if len(self.connections) - shared.closing <= self.limits.max_connections:
            return True
        if shared.idle:
            victim, _ = shared.idle.popitem(last=False)
            victim._close()
            return True
        shared.refused += 1
        now = time.monotonic()
        if now - shared.warned_at >= _WARN_EVERY_S:
            # One line per interval under a flood, with the count since the last one.
            log.warning("http_connections_refused", reason="every connection is busy",
                        limit=self.limits.max_connections, refused=shared.refused)  # fmt: skip
            shared.warned_at, shared.refused = now, 0
        self._refuse(503, "Service Unavailable", "too many connections")
        return False

    def _close(self) -> None:
        if not self._closing:
            self._closing = True
            self.shared.closing += 1
        self.shared.idle.pop(self, None)
        self._disarm()
        self.transport.close()

    def _screen(self, data: bytes) -> bool:
        """Check the head of a request before h11 parses it; False when refused."""
        if len(self._head) < _HEAD_MAX:
            self._head += data
        end = self._head.find(_HEAD_END)
        if end < 0:
            return True
        problem = framing_problem(bytes(self._head[:end]))
        self._head.clear()
        if problem is None:
            return True
        log.warning("http_request_refused", reason=problem)
        self._refuse(400, "Bad Request", problem)
        return False

    def _follow_request(self) -> None:
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the request is in (or the connection is ending): not our deadline
        elif not self._receiving:
            self._arm(self.limits.request_timeout_s, receiving=True)

    def _arm(self, delay_s: float, *, receiving: bool) -> None:
        self._disarm()
        self._receiving = receiving
        self._timer = self.loop.call_later(delay_s, self._deadline_passed)

    def _disarm(self) -> None:
        timer, self._timer = getattr(self, "_timer", None), None
        self._receiving = False
        if timer is not None:
            timer.cancel()

    def _deadline_passed(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._receiving and (self.cycle is None or not self.cycle.response_started):
            self._refuse(408, "Request Timeout", "the request did not arrive in time")
        else:
            self._close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, reason, message))
        self._close()


def protocol_with(limits: Limits) -> type[GuardedProtocol]:
    """A protocol class of its own per listener: its limits and its connection book."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits,
                                                        "shared": _Connections()})  # fmt: skip


def fd_budget(share: float) -> int:
    """A share of this process's file-descriptor limit (at least 16)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, int(soft * share))


def listen(host: str, port: int, setting: str) -> socket.socket:
    """A bound, listening socket; ConfigError naming ``setting`` when that fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            # The kernel hands over a connection only once it has sent something (or after
            # this many seconds): idle sockets of a flood then cost no descriptor here.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, _DEFER_ACCEPT_S)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{setting}: cannot listen on {host}:{port} ({exc.strerror})") from None
    except OverflowError:
        sock.close()
        raise ConfigError(f"{setting}: port {port} is out of range") from None
    sock.setblocking(False)
    return sock


class ServerThread:
    """``app`` served on ``sock`` by uvicorn in a daemon thread; ``stop`` is bounded."""

    def __init__(self, app: Any, sock: socket.socket, limits: Limits, name: str) -> None:
        self.sock = sock
        self.name = name
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, proxy_headers=False,
            server_header=False, date_header=False, ws="none", loop="asyncio",
            http=protocol_with(limits), timeout_keep_alive=int(max(1, limits.keepalive_s)),
            timeout_graceful_shutdown=2, backlog=_BACKLOG,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"{self.name}: the HTTP server did not start")
            time.sleep(0.01)
        self.sock.listen(_KERNEL_BACKLOG)

    def _serve(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # SystemExit from uvicorn's startup included
            log.error("http_server_failed", server=self.name, error_type=type(exc).__name__)

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        with contextlib.suppress(OSError):
            self.sock.close()
