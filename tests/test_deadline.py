"""Issue 12 item 1: opening an IMAP connection has one total deadline, not a timeout per
socket operation.  A server that answers every step just inside the per-read timeout used
to stretch a connect to several times SHARDWORKER_CONNECT_TIMEOUT_S."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from shardworker.deadline import Deadline, watch
from shardworker.errors import ImapTransientError
from shardworker.imap.connect import Credentials
from tests.test_imap_connect import SECRET, Exchange, Script, ScriptedServer, _open, scripted

__all__ = ["scripted"]
STEP_S = 0.7


def slow_but_steady(io: Exchange) -> None:
    """Each answer comes STEP_S after the question: under any per-read timeout of 1 s."""
    time.sleep(STEP_S)
    io.send("* OK slow server ready")
    while line := io.read():
        tag, command = line.split()[0].decode(), line.split()[1].decode().upper()
        time.sleep(STEP_S)
        if command == "CAPABILITY":
            io.send("* CAPABILITY IMAP4rev1", f"{tag} OK done")
        else:
            io.send(f"{tag} OK done")


def test_connect_and_login_share_one_total_deadline(
    scripted: Callable[[Script], ScriptedServer],
) -> None:
    server = scripted(slow_but_steady)
    started = time.monotonic()
    with pytest.raises(ImapTransientError) as info:
        _open(server.port, Credentials("password", "alice", SECRET), connect_timeout_s=1.0)
    spent = time.monotonic() - started
    assert info.value.reason == "timeout"
    assert "1s deadline" in str(info.value)
    assert spent < 1.0 + STEP_S, f"took {spent:.1f}s"


def test_the_watch_fails_a_blocked_read_in_another_thread_at_the_deadline() -> None:
    import socket

    a, b = socket.socketpair()
    try:
        a.settimeout(10)
        started = time.monotonic()
        with watch(Deadline(0.3)) as w:
            w.track(a)
            data = a.recv(10)  # nothing is ever sent: only the watchdog ends this
        assert data == b"" and w.fired
        assert time.monotonic() - started < 1.5
    finally:
        a.close()
        b.close()
    assert threading.active_count() < 50
