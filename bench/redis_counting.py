"""Redis traffic per command, counted on the client's own sockets.

``redis.Redis.from_url(url, connection_class=CountingConnection)`` counts, per request
(one ``send_packed_command``: a command, a pipeline, a MULTI/EXEC), the bytes sent and the
bytes received until the connection's next request.  A request is labelled by the command
names it carries (``EVALSHA`` by the script's file name), so a blocking ``XREAD`` counts the
notes it returns, and a pipeline of 256 ``HGETALL`` is one ``HGETALL`` request.  These are
the bytes on the wire, RESP framing included, so they add up to the server's
``total_net_*_bytes`` for the same clients; the server's totals also count whoever else
talks to it (the bench's own ``INFO``).
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

from shardworker.luasource import lua_source

_NAME = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n(?:\$40\r\n([0-9a-f]{40})\r\n)?")
_LUA = Path(__file__).resolve().parent.parent / "shardworker" / "lua"
SCRIPTS = {
    hashlib.sha1(lua_source(p.name).encode()).hexdigest(): p.stem for p in _LUA.glob("*.lua")
}

_lock = threading.Lock()
# label -> [requests, bytes sent, bytes received]
COUNTS: dict[str, list[int]] = {}


def snapshot() -> dict[str, list[int]]:
    with _lock:
        return {k: list(v) for k, v in COUNTS.items()}


def _add(label: str, requests: int, sent: int, received: int) -> None:
    with _lock:
        row = COUNTS.setdefault(label, [0, 0, 0])
        row[0] += requests
        row[1] += sent
        row[2] += received


def label_of(packed: bytes) -> str:
    names: dict[str, None] = {}
    for match in _NAME.finditer(packed[:65536]):
        name = match.group(1).decode().upper()
        if name == "EVALSHA" and match.group(2):
            name = f"EVALSHA {SCRIPTS.get(match.group(2).decode(), 'unknown')}"
        if name not in ("MULTI", "EXEC"):
            names.setdefault(name)
    return "+".join(names) or "?"


class CountingSocket:
    """A socket that books what it receives under the label of the last request."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.label = "connect"

    def recv(self, size: int, *flags: int) -> bytes:
        data = self._sock.recv(size, *flags)
        if not flags:
            _add(self.label, 0, 0, len(data))
        return data

    def recv_into(self, buffer: Any, *args: Any) -> int:
        got = self._sock.recv_into(buffer, *args)
        _add(self.label, 0, 0, got)
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class CountingConnection(redis.Connection):
    def _connect(self) -> Any:
        return CountingSocket(super()._connect())

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        parts: Iterable[Any] = [command] if isinstance(command, bytes | str) else command
        packed = b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in parts)
        label = label_of(packed)
        if self._sock is None:
            self.connect_check_health(check_health=False)
        if isinstance(self._sock, CountingSocket):
            self._sock.label = label
        _add(label, 1, len(packed), 0)
        super().send_packed_command([packed], check_health)


def delta(
    before: dict[str, list[int]], after: dict[str, list[int]], seconds: float
) -> dict[str, dict[str, float]]:
    """Per label: requests, bytes in (to Redis) and out (replies) per second."""
    out = {}
    for label, row in after.items():
        prev = before.get(label, [0, 0, 0])
        diff = [a - b for a, b in zip(row, prev, strict=True)]
        if any(diff):
            out[label] = {"requests_per_s": round(diff[0] / seconds, 2),
                          "bytes_in_per_s": round(diff[1] / seconds),
                          "bytes_out_per_s": round(diff[2] / seconds)}  # fmt: skip
    return dict(
        sorted(out.items(), key=lambda kv: -kv[1]["bytes_in_per_s"] - kv[1]["bytes_out_per_s"])
    )
