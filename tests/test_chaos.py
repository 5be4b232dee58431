"""Chaos in CI: nothing lost, nothing duplicated while pods, Dovecot, Redis and links fail.

The short version of bench/chaos.py: 600 messages over 60 mailboxes, 2 pods of 2 workers,
a pod SIGKILLed (and restarted) every 5-10 s, Dovecot crashed and restarted, Redis
SIGKILLed and restarted on its AOF, and every worker ↔ Dovecot connection reset by the
fault proxy.  Also the fault proxy itself, against the real Dovecot.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.chaos_support.report import format_report
from bench.chaos_support.run import ChaosPlan, ChaosServers, run_chaos
from bench.chaos_support.servers import AofRedis
from tests.faultproxy import FaultProxy, ProxyProcess
from tests.harness.dovecot import Dovecot


@pytest.fixture
def aof_redis() -> Iterator[AofRedis]:
    server = AofRedis()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def proxy(dovecot: Dovecot) -> Iterator[FaultProxy]:
    with FaultProxy(dovecot.host, dovecot.plain_port) as p:
        yield p


def _greeting(port: int, timeout_s: float = 5.0) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        return sock.recv(200), time.monotonic() - started


def _login(port: int, user: str, password: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert sock.recv(200).startswith(b"* OK")
    sock.sendall(f"a LOGIN {user} {password}\r\n".encode())
    reply = b""
    while b"a OK" not in reply:
        chunk = sock.recv(4096)
        assert chunk, reply
        reply += chunk
    return sock


def test_proxy_forwards_imap_and_cut_resets_every_connection(
    proxy: FaultProxy, dovecot: Dovecot
) -> None:
    user, password = dovecot.add_user()
    socks = [_login(proxy.port, user, password) for _ in range(3)]
    try:
        assert proxy.open_connections == 3
        assert proxy.cut() == 3
        for sock in socks:
            with pytest.raises(ConnectionResetError):
                sock.sendall(b"b NOOP\r\n")
                sock.recv(100)
        assert _greeting(proxy.port)[0].startswith(b"* OK")  # new connections still pass
    finally:
        for sock in socks:
            sock.close()


def test_proxy_drop_refuses_for_a_while_then_passes(proxy: FaultProxy) -> None:
    proxy.drop(1.0)
    with pytest.raises(ConnectionResetError):
        data, _ = _greeting(proxy.port)
        if not data:  # a reset may surface as EOF on some kernels
            raise ConnectionResetError
    time.sleep(1.1)
    assert _greeting(proxy.port)[0].startswith(b"* OK")
    assert proxy.stats.refused >= 1


def test_proxy_blackhole_holds_bytes_and_delay_adds_latency(proxy: FaultProxy) -> None:
    proxy.blackhole(1.0)
    with pytest.raises(TimeoutError):
        _greeting(proxy.port, timeout_s=0.5)
    time.sleep(0.6)
    data, took = _greeting(proxy.port)
    assert data.startswith(b"* OK") and took < 0.5
    proxy.delay(0.4, for_s=5)
    data, took = _greeting(proxy.port)
    assert data.startswith(b"* OK") and took >= 0.4
    proxy.heal()
    assert _greeting(proxy.port)[1] < 0.4


def test_proxy_process_answers_the_same_commands(dovecot: Dovecot) -> None:
    with ProxyProcess(dovecot.host, dovecot.plain_port) as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            assert sock.recv(200).startswith(b"* OK")
            assert proxy.open_connections == 1
            assert proxy.cut() == 1
            with pytest.raises(ConnectionResetError):
                sock.recv(100)
        finally:
            sock.close()
        proxy.delay(0.3, for_s=5)
        proxy.heal()
        assert proxy.stats.cut == 1 and proxy.stats.accepted == 1


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_chaos_loses_and_duplicates_nothing(
    dovecot_factory: Callable[..., Dovecot], aof_redis: AofRedis, fresh_dsn: str, tmp_dir: Path
) -> None:
    plan = ChaosPlan(
        mailboxes=60, messages=600, pods=2, rate_per_s=12.0, pod_kill_share=1.0,
        one_offs=("dovecot", "redis", "proxy_cut"), settle_timeout_s=150.0, quiet_s=8.0,
    )  # fmt: skip
    servers = ChaosServers(dovecot_factory(), aof_redis, fresh_dsn, None, tmp_dir)
    report = run_chaos(plan, servers, progress=lambda _: None)
    text = format_report(report)
    print(text)
    a = report.accounting
    assert (a.delivered, a.lost, a.duplicated, a.unexpected) == (600, 0, 0, 0), text
    assert a.published == 600 and a.dead_lettered == 0, text
    assert report.faults.pod_kills >= 3, text
    done = {e.kind for e in report.faults.events if not e.error}
    assert {"dovecot", "redis", "proxy_cut"} <= done, text
