"""A fault-injecting TCP proxy: workers connect here instead of to the IMAP server.

    proxy = FaultProxy("127.0.0.1", dovecot.plain_port)
    proxy.start()                 # providers point at proxy.port
    proxy.cut()                   # reset every open connection now
    proxy.drop(5)                 # for 5 s: reset new and open connections at once
    proxy.delay(0.8, for_s=10)    # for 10 s: hold every chunk 0.8 s in each direction
    proxy.blackhole(8)            # for 8 s: accept, forward nothing (bytes are held)
    proxy.close()

``ProxyProcess`` has the same methods and runs the proxy in a child process
(``python -m tests.faultproxy HOST PORT``, commands as lines on its stdin), so the proxy
never waits for the GIL of a busy test or benchmark process.

One selector thread forwards both directions of every connection; commands are handed to
that thread and return once applied, so a test knows the fault is in force.  A cut sends
RST (SO_LINGER 0), as a crashed middlebox or a NAT that forgot the flow would, not FIN.
A black hole holds bytes rather than dropping them, like a partition TCP would retransmit
across: a client that times out first sees silence, one that does not sees its bytes late.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Literal

CHUNK = 65536
# A side that has this much waiting for its peer is not read until the peer catches up.
HIGH_WATER = 1 << 20
LINGER_RST = struct.pack("ii", 1, 0)

Mode = Literal["pass", "drop", "delay", "blackhole"]


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    cut: int = 0
    closed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(eq=False)
class _Side:
    sock: socket.socket
    # Chunks waiting to be written to this side: (release time, bytes).
    outbox: deque[tuple[float, bytes]] = field(default_factory=deque)
    queued: int = 0
    eof: bool = False  # the peer closed its sending half: shut ours once the outbox is empty
    mask: int = -1  # selector events registered now (-1: not registered)


@dataclass(eq=False)
class _Pair:
    client: _Side
    upstream: _Side
    connected: bool = False

    def peer(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client


class FaultProxy:
    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((host, port), backlog=4096)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self.stats = ProxyStats()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._commands: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._timed: set[_Pair] = set()  # pairs holding chunks released later (delay mode)
        self._sides: dict[socket.socket, tuple[_Pair, _Side]] = {}
        self._mode: Mode = "pass"
        self._mode_until = 0.0
        self._delay_s = 0.0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)

    # -- public API (any thread) ---------------------------------------------------------

    def start(self) -> FaultProxy:
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()
        return self

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    def cut(self) -> int:
        """Reset every open connection; returns how many were cut."""
        return int(self._call(self._cut_all))

    def drop(self, for_s: float) -> int:
        """Cut every connection, and reset each new one at once, for ``for_s`` seconds."""
        return int(self._call(lambda: self._set_mode("drop", for_s, 0.0)))

    def delay(self, seconds: float, *, for_s: float) -> None:
        """Hold every chunk ``seconds`` before forwarding it, for ``for_s`` seconds."""
        self._call(lambda: self._set_mode("delay", for_s, seconds))

    def blackhole(self, for_s: float) -> None:
        """Forward nothing (connections stay open, bytes wait) for ``for_s`` seconds."""
        self._call(lambda: self._set_mode("blackhole", for_s, 0.0))

    def heal(self) -> None:
        """End the current episode now."""
        self._call(lambda: self._set_mode("pass", 0.0, 0.0))

    def close(self) -> None:
        if not self._thread.is_alive():
            self._close_sockets()
            return
        self._stop = True
        self._wake()
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- command plumbing ----------------------------------------------------------------

    def _call(self, fn: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        with self._lock:
            self._commands.append(run)
        self._wake()
        if not done.wait(timeout_s):
            raise TimeoutError("the fault proxy thread did not answer")
        return box[0] if box else None

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass
        while True:
            with self._lock:
                if not self._commands:
                    return
                fn = self._commands.popleft()
            fn()

    # -- loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                for key, events in self._sel.select(self._timeout()):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._run_commands()
                    else:
                        self._on_event(key.fileobj, events)  # type: ignore[arg-type]
                self._tick()
        finally:
            self._close_sockets()

    def _timeout(self) -> float:
        now = time.monotonic()
        horizon = 1.0
        if self._mode != "pass":
            horizon = min(horizon, self._mode_until - now)
        for pair in self._timed:
            for side in (pair.client, pair.upstream):
                if side.outbox:
                    horizon = min(horizon, side.outbox[0][0] - now)
        return max(0.0, horizon)

    def _tick(self) -> None:
        now = time.monotonic()
        if self._mode != "pass" and now >= self._mode_until:
            self._set_mode("pass", 0.0, 0.0)
        for pair in list(self._timed):
            sides = (pair.client, pair.upstream)
            if not any(s.outbox and s.outbox[-1][0] > now for s in sides):
                self._timed.discard(pair)
            self._update_interest(pair)

    def _set_mode(self, mode: Mode, for_s: float, delay_s: float) -> int:
        self._mode, self._delay_s = mode, delay_s
        self._mode_until = time.monotonic() + for_s
        if mode == "drop":
            return self._cut_all()
        for pair in list(self._pairs):
            self._update_interest(pair)
        return 0

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and the like: the client retries
            if self._mode == "drop":
                self.stats.refused += 1
                _reset(conn)
                continue
            self._open_pair(conn)

    def _open_pair(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        err = up.connect_ex(self.target)
        pair = _Pair(_Side(conn), _Side(up))
        self.stats.accepted += 1
        if err not in (0, 115):  # 115: EINPROGRESS
            _reset(conn)
            up.close()
            self.stats.refused += 1
            return
        self._pairs.add(pair)
        self._sides[conn] = (pair, pair.client)
        self._sides[up] = (pair, pair.upstream)
        self._sel.register(conn, selectors.EVENT_READ, "io")
        pair.client.mask = selectors.EVENT_READ
        self._sel.register(up, selectors.EVENT_WRITE, "io")
        pair.upstream.mask = selectors.EVENT_WRITE

    def _on_event(self, sock: socket.socket, events: int) -> None:
        found = self._sides.get(sock)
        if found is None:
            return
        pair, side = found
        if side is pair.upstream and not pair.connected:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                self._close_pair(pair, reset=True)
                return
            pair.connected = True
        if events & selectors.EVENT_WRITE and not self._flush(pair, side):
            return
        if events & selectors.EVENT_READ and not self._read(pair, side):
            return
        self._update_interest(pair)

    def _read(self, pair: _Pair, side: _Side) -> bool:
        """Queue what ``side`` sent for its peer; False when the pair was closed."""
        try:
            data = side.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            self._close_pair(pair, reset=True)
            return False
        peer = pair.peer(side)
        if not data:
            peer.eof = True
            return self._flush(pair, peer)
        if side is pair.client:
            self.stats.bytes_up += len(data)
        else:
            self.stats.bytes_down += len(data)
        held = self._delay_s if self._mode == "delay" else 0.0
        if held:
            self._timed.add(pair)
        peer.outbox.append((time.monotonic() + held, data))
        peer.queued += len(data)
        return self._flush(pair, peer)

    def _flush(self, pair: _Pair, side: _Side) -> bool:
        """Write what is due to ``side``; False when the pair was closed."""
        if side is pair.upstream and not pair.connected:
            return True
        now = time.monotonic()
        while side.outbox and side.outbox[0][0] <= now and self._mode != "blackhole":
            release, data = side.outbox[0]
            try:
                sent = side.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._close_pair(pair, reset=True)
                return False
            side.queued -= sent
            if sent < len(data):
                side.outbox[0] = (release, data[sent:])
                return True
            side.outbox.popleft()
        if not side.outbox and side.eof:
            with contextlib.suppress(OSError):
                side.sock.shutdown(socket.SHUT_WR)
        return self._maybe_done(pair)

    def _maybe_done(self, pair: _Pair) -> bool:
        sides = (pair.client, pair.upstream)
        if all(s.eof and not s.outbox for s in sides):
            self._close_pair(pair, reset=False)
            return False
        return True

    def _update_interest(self, pair: _Pair) -> None:
        if not pair.connected:
            return
        now = time.monotonic()
        for side in (pair.client, pair.upstream):
            peer = pair.peer(side)
            mask = 0
            # Read while this side still sends and its peer's queue is short; a black hole
            # reads nothing either, so both ends stall as behind a dead link.
            if not peer.eof and peer.queued < HIGH_WATER and self._mode != "blackhole":
                mask |= selectors.EVENT_READ
            if side.outbox and side.outbox[0][0] <= now and self._mode != "blackhole":
                mask |= selectors.EVENT_WRITE
            wanted = mask or -1
            if wanted == side.mask:
                continue
            try:
                if side.mask == -1:
                    self._sel.register(side.sock, mask, "io")
                elif wanted == -1:
                    self._sel.unregister(side.sock)
                else:
                    self._sel.modify(side.sock, mask, "io")
            except (KeyError, ValueError, OSError):
                self._close_pair(pair, reset=True)
                return
            side.mask = wanted

    def _cut_all(self) -> int:
        pairs = list(self._pairs)
        for pair in pairs:
            self._close_pair(pair, reset=True)
        self.stats.cut += len(pairs)
        return len(pairs)

    def _close_pair(self, pair: _Pair, *, reset: bool) -> None:
        if pair not in self._pairs:
            return
        self._pairs.discard(pair)
        self._timed.discard(pair)
        for side in (pair.client, pair.upstream):
            self._sides.pop(side.sock, None)
            if side.mask != -1:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(side.sock)
            if reset:
                _reset(side.sock)
            else:
                side.sock.close()
        if not reset:
            self.stats.closed += 1

    def _close_sockets(self) -> None:
        for pair in list(self._pairs):
            self._close_pair(pair, reset=True)
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(Exception):
            self._sel.close()


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    with contextlib.suppress(OSError):
        sock.close()


class ProxyProcess:
    """A FaultProxy in a child process; the same commands, answered over a pipe."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faultproxy", target_host, str(target_port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        self._lock = threading.Lock()
        self.port = int(self._reply())
        self.host = "127.0.0.1"

    def _reply(self) -> str:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fault proxy process exited ({self._proc.poll()})")
        return line.strip()

    def _ask(self, *words: object) -> str:
        assert self._proc.stdin is not None
        with self._lock:
            self._proc.stdin.write(" ".join(str(w) for w in words) + "\n")
            return self._reply()

    def cut(self) -> int:
        return int(self._ask("cut"))

    def drop(self, for_s: float) -> int:
        return int(self._ask("drop", for_s))

    def delay(self, seconds: float, *, for_s: float) -> None:
        self._ask("delay", seconds, for_s)

    def blackhole(self, for_s: float) -> None:
        self._ask("blackhole", for_s)

    def heal(self) -> None:
        self._ask("heal")

    @property
    def stats(self) -> ProxyStats:
        return ProxyStats(**json.loads(self._ask("stats")))

    @property
    def open_connections(self) -> int:
        return int(self._ask("open"))

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError):
                self._ask("quit")
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(proxy: FaultProxy, commands: IO[str], out: IO[str]) -> None:
    actions: dict[str, Callable[..., object]] = {
        "cut": proxy.cut,
        "drop": lambda s: proxy.drop(float(s)),
        "delay": lambda s, f: proxy.delay(float(s), for_s=float(f)),
        "blackhole": lambda s: proxy.blackhole(float(s)),
        "heal": proxy.heal,
        "stats": lambda: json.dumps(dataclasses.asdict(proxy.stats)),
        "open": lambda: proxy.open_connections,
    }
    for line in commands:
        name, *args = line.split() or [""]
        if name == "quit":
            break
        result = actions[name](*args)
        print("ok" if result is None else result, file=out, flush=True)


def main(argv: list[str]) -> int:
    with FaultProxy(argv[0], int(argv[1])) as proxy:
        print(proxy.port, flush=True)
        _serve(proxy, sys.stdin, sys.stdout)
    return 0


__all__ = ["FaultProxy", "ProxyProcess", "ProxyStats"]

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
