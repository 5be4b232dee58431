"""An HTTP endpoint that reads the request, then answers one byte every ``every_s``:
a token endpoint that never finishes but never lets a per-read timeout fire."""

from __future__ import annotations

import contextlib
import socket
import threading


class DripServer:
    def __init__(self, every_s: float = 1.0, answer: bytes | None = None) -> None:
        self.every_s = every_s
        self.answer = answer or (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n"
            + b'{"access_token": "never-finished", "expires_in": 3600}      '
        )
        self.requests = 0
        self.stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/token"
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.requests += 1
            thread = threading.Thread(target=self._drip, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _drip(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(1.0)
            with contextlib.suppress(TimeoutError):
                conn.recv(65536)
            for i in range(len(self.answer)):
                if self.stop.wait(self.every_s):
                    return
                conn.sendall(self.answer[i : i + 1])

    def close(self) -> None:
        self.stop.set()
        self._listener.close()
        self._accept.join(5)
        for thread in self._threads:
            thread.join(5)
