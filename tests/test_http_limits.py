"""The HTTP listeners under hostile clients (hardening items 2 and 12), over real sockets.

* The metrics listener, in a process of its own at a 1,024-descriptor limit (a container's
  usual default): 2,000 idle connections and a slowloris client held open while /healthz
  is asked every 0.2 s; every answer within 1 s, the listener's CPU low.
* The admin API: a drip-fed request is cut at its total deadline; a malformed request
  line, two Content-Length headers or ``1_4`` get a JSON 400 and no traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import selectors
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from shardworker.admin import api as admin_api
from shardworker.admin.service import AdminService
from shardworker.config import Settings
from shardworker.db.store import open_pool
from shardworker.webserver import framing_problem
from tests.admin_support import TOKEN, captured_logs, private_database
from tests.harness.dovecot import Dovecot
from tests.harness.net import free_port
from tests.pool_support import Cluster
from tests.support import rig_settings

pytestmark = pytest.mark.timeout(120)

_LISTENER = textwrap.dedent(
    """
    import resource, sys, time
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    from shardworker.http import HttpEndpoint, Routes, Verdict
    endpoint = HttpEndpoint("127.0.0.1:0", Routes(metrics=lambda: b"up 1\\n",
                            liveness=lambda: Verdict(True), readiness=lambda: Verdict(True)))
    endpoint.start()
    print(endpoint.port, flush=True)
    sys.stdin.read()
    endpoint.stop()
    """
)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Flood:
    """``count`` idle connections, re-opened whenever the server closes one."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.sel = selectors.DefaultSelector()
        self.opened = 0
        self.closed_by_server = 0

    def fill(self) -> None:
        while len(self.sel.get_map()) < self.count:
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", self.port))
            self.sel.register(sock, selectors.EVENT_READ)
            self.opened += 1

    def reap(self) -> None:
        for key, _ in self.sel.select(timeout=0):
            sock: Any = key.fileobj
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                self.sel.unregister(sock)
                sock.close()
                self.closed_by_server += 1

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()


@dataclass
class Siege:
    worst_s: float = 0.0
    cpu_share: float = 0.0
    most_fds: int = 0
    opened: int = 0
    closed_by_server: int = 0


def besiege(port: int, pid: int, seconds: float = 12.0) -> Siege:
    """2,000 idle connections (re-opened when closed) and a slowloris client, while
    /healthz is asked every 0.2 s; the server process's CPU and descriptors measured."""
    flood = Flood(port, 2000)
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    got = Siege()
    try:
        flood.fill()
        cpu_before, started = _cpu_s(pid), time.monotonic()
        last_drip = started
        while time.monotonic() - started < seconds:
            flood.reap()
            flood.fill()
            if time.monotonic() - last_drip >= 1.0:
                with contextlib.suppress(OSError):
                    slow.sendall(b"X")  # one header byte a second
                last_drip = time.monotonic()
            asked = time.monotonic()
            status, body = _get(port, "/healthz")
            got.worst_s = max(got.worst_s, time.monotonic() - asked)
            assert (status, orjson.loads(body)["status"]) == (200, "ok")
            got.most_fds = max(got.most_fds, len(os.listdir(f"/proc/{pid}/fd")))
            time.sleep(0.2)
        got.cpu_share = (_cpu_s(pid) - cpu_before) / (time.monotonic() - started)
        # The slowloris client was cut at the request deadline (10 s) with a 408.
        slow.settimeout(2)
        assert slow.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        slow.close()
        flood.close()
    got.opened, got.closed_by_server = flood.opened, flood.closed_by_server
    load = os.getloadavg()[0]
    print(f"worst /healthz {got.worst_s * 1000:.0f} ms, server CPU {got.cpu_share:.0%}, "
          f"at most {got.most_fds} descriptors, {got.opened} opened, "
          f"{got.closed_by_server} closed by the server; load {load:.1f}")  # fmt: skip
    return got


def assert_held(got: Siege) -> None:
    assert got.worst_s < 1.0
    assert got.cpu_share < 0.35
    # The cap held: idle clients were closed to keep room (the limit is 1,024 descriptors).
    assert got.closed_by_server > 0 and got.most_fds < 1000


def test_healthz_answers_under_idle_flood_and_slowloris(many_fds: None) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _LISTENER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    try:
        got = besiege(int(proc.stdout.readline()), proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()
    assert_held(got)


@pytest.mark.e2e
def test_the_coordinators_healthz_answers_under_the_same_siege(
    many_fds: None, redis_server: str, dovecot: Dovecot, tmp_path: Path
) -> None:
    """The same against `shardworker run` itself, started at a 1,024-descriptor limit."""
    with private_database() as dsn:
        port = free_port()
        cluster = Cluster(dsn, f"{redis_server}/0", dovecot, tmp_path, providers=1,
                          workers="1", metrics_addr=f"127.0.0.1:{port}")  # fmt: skip
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        try:
            pod = cluster.start_pod("pod-a")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            cluster.wait(lambda: cluster.all_served({"pod-a"}), 60, "the provider served")
            assert pod.proc is not None
            got = besiege(port, pod.proc.pid)
        finally:
            cluster.close()
    assert_held(got)


# -- the admin API -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(redis_server: str) -> Iterator[Settings]:
    with private_database() as dsn:
        yield rig_settings(dsn, f"{redis_server}/0", "", admin_addr="127.0.0.1:0",
                           admin_token=TOKEN)  # fmt: skip


@pytest.fixture
def admin(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, io.StringIO]]:
    monkeypatch.setattr(admin_api, "REQUEST_TIMEOUT_S", 3.0)
    pool = open_pool(settings.database_url, max_size=2)
    client = redis.Redis.from_url(settings.redis_url)
    with captured_logs() as logs:
        server = admin_api.AdminApi(settings, AdminService(settings, pool, client))
        server.start()
        try:
            yield server.port, logs
        finally:
            server.close()
            pool.close()
            client.close()


def _exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    return data


def test_a_drip_fed_request_is_cut_at_its_total_deadline(admin: tuple[int, io.StringIO]) -> None:
    port, _ = admin
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v1/providers HTTP/1.1\r\n")
        answer = b""
        for _ in range(20):  # one byte a second would last 20 s
            try:
                sock.sendall(b"X")
            except OSError:
                break
            sock.settimeout(1.0)
            try:
                answer += sock.recv(4096)
            except TimeoutError:
                continue
            if answer:
                break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert 2.5 < elapsed < 6.0


def test_an_idle_connection_is_closed(admin: tuple[int, io.StringIO]) -> None:
    """A client that never sends is not even handed to the server for the first seconds
    (TCP_DEFER_ACCEPT), then closed after the idle timeout (3 s here)."""
    port, _ = admin
    with socket.create_connection(("127.0.0.1", port), timeout=25) as sock:
        started = time.monotonic()
        assert sock.recv(4096) == b""
        assert time.monotonic() - started < 20.0


BAD_FRAMING = [
    b"GET /v1/providers HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/providers HTTP/1.1\r\nHost: x\r\nContent-Length: 1_4\r\n\r\n{}",
    b"POST /v1/providers HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\n{}",
    b"GARBAGE\r\n\r\n",
    b"GET /v1/providers HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS to a plain port
]


@pytest.mark.parametrize("raw", BAD_FRAMING, ids=range(len(BAD_FRAMING)))
def test_bad_framing_gets_a_json_400_and_no_traceback(
    admin: tuple[int, io.StringIO], raw: bytes
) -> None:
    port, logs = admin
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    data = _exchange(port, raw.replace(b"Host: x\r\n", b"Host: x\r\n" + auth))
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data
    assert orjson.loads(body)["error"] == "bad request"
    assert "Traceback" not in logs.getvalue() and "AttributeError" not in logs.getvalue()


def test_framing_rules() -> None:
    assert framing_problem(b"GET / HTTP/1.1\r\nContent-Length: 12") is None
    assert framing_problem(b"GET / HTTP/1.1\r\nHost: a") is None
    assert framing_problem(b"GET / HTTP/1.1\r\ncontent-length: 1\r\nCONTENT-LENGTH: 1")
    assert framing_problem(b"GET / HTTP/1.1\r\nContent-Length: +1")
    assert framing_problem(b"GET / HTTP/1.1\r\nContent-Length: 0x10")


def test_a_good_request_still_works_and_keeps_alive(admin: tuple[int, io.StringIO]) -> None:
    port, _ = admin
    request = (f"GET /v1/providers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
               "\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(2):
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), data
            assert b"content-security-policy" in head.lower() and orjson.loads(body) == []
