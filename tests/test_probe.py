"""shardworker.imap.probe against the real Dovecot: one classification per failure."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import pytest

from shardworker.imap.connect import Credentials, Security, tls_context
from shardworker.imap.probe import ProbeResult, probe
from tests.harness.dovecot import Dovecot, ImapUser
from tests.harness.net import free_port

NOBODY = Credentials("password", "nobody", "nobody-s3cret")


@pytest.fixture(scope="module")
def user(dovecot: Dovecot) -> ImapUser:
    made = dovecot.add_user()
    for name in ("Sent", "Projects/2024"):
        dovecot.create_folder(made.name, name)
    return made


@pytest.fixture(scope="module")
def trusted(dovecot: Dovecot) -> ssl.SSLContext:
    return tls_context(str(dovecot.cafile))


def run(
    port: int,
    creds: Credentials,
    folders: Sequence[str] = (),
    *,
    host: str = "localhost",
    security: Security = "tls",
    context: ssl.SSLContext | None = None,
    timeout_s: float = 5.0,
) -> ProbeResult:
    result = probe(host, port, security, creds, folders, timeout_s=timeout_s, ssl_context=context)
    text = json.dumps(asdict(result))  # what `providers test --json` prints
    assert creds.secret not in text
    return result


def sessions_settle(dovecot: Dovecot, name: str, expected: int) -> bool:
    """True once ``name`` has ``expected`` sessions again (the probe logged out)."""
    deadline = time.monotonic() + 5
    while dovecot.who().get(name, 0) != expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_ok(dovecot: Dovecot, user: ImapUser, trusted: ssl.SSLContext, security: Security) -> None:
    port = dovecot.tls_port if security == "tls" else dovecot.plain_port
    sessions = dovecot.who().get(user.name, 0)
    result = run(port, Credentials("password", *user), ["inbox", "\\Sent", "projects/2024"],
                 security=security, context=trusted)  # fmt: skip
    assert (result.ok, result.classification) == (True, "ok")
    assert result.folders == ("INBOX", "Sent", "Projects/2024")
    assert result.missing_folders == ()
    assert "IDLE" in result.capabilities
    assert "3 folder(s) ready" in result.message
    assert sessions_settle(dovecot, user.name, sessions)


def test_default_folder_is_inbox(dovecot: Dovecot, user: ImapUser, trusted: ssl.SSLContext) -> None:
    result = run(dovecot.tls_port, Credentials("password", *user), context=trusted)
    assert (result.ok, result.folders) == (True, ("INBOX",))


def test_wrong_password(dovecot: Dovecot, user: ImapUser, trusted: ssl.SSLContext) -> None:
    creds = Credentials("password", user.name, user.password + "-not")
    result = run(dovecot.tls_port, creds, context=trusted)
    assert (result.ok, result.classification) == (False, "auth_failed")
    assert "AUTHENTICATIONFAILED" in result.message
    assert result.capabilities == ()


def test_wrong_port(user: ImapUser, trusted: ssl.SSLContext) -> None:
    result = run(free_port(), Credentials("password", *user), context=trusted)
    assert (result.ok, result.classification) == (False, "tcp_refused")


def test_untrusted_certificate(dovecot: Dovecot, user: ImapUser) -> None:
    result = run(dovecot.tls_port, Credentials("password", *user), context=tls_context())
    assert (result.ok, result.classification) == (False, "tls_certificate")
    assert "certificate verify failed" in result.message


def test_tls_on_a_plain_port(dovecot: Dovecot, user: ImapUser, trusted: ssl.SSLContext) -> None:
    result = run(dovecot.plain_port, Credentials("password", *user), context=trusted)
    assert (result.ok, result.classification) == (False, "tls")


def test_missing_and_unselectable_folders(
    dovecot: Dovecot, user: ImapUser, trusted: ssl.SSLContext
) -> None:
    sessions = dovecot.who().get(user.name, 0)
    result = run(dovecot.tls_port, Credentials("password", *user), ["INBOX", "Nope", "Projects"],
                 context=trusted)  # fmt: skip
    assert (result.ok, result.classification) == (False, "folder_missing")
    assert result.folders == ("INBOX",)
    assert result.missing_folders == ("Nope", "Projects")
    assert "no folder matches Nope" in result.message
    assert "cannot be selected: Projects" in result.message
    assert "IDLE" in result.capabilities
    assert sessions_settle(dovecot, user.name, sessions)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose kernel completes the TCP handshake, but nobody ever speaks."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield int(listener.getsockname()[1])


@pytest.mark.parametrize("security", ["tls", "plain"])
def test_silent_server_times_out(silent_port: int, security: Security) -> None:
    started = time.monotonic()
    result = run(silent_port, NOBODY, host="127.0.0.1",
                 security=security, timeout_s=0.3)  # fmt: skip
    assert (result.ok, result.classification) == (False, "tcp_timeout")
    assert time.monotonic() - started < 3


def test_unknown_host() -> None:
    # A 64-octet label is refused before any packet leaves the machine (checked with
    # strace): the test must not send a DNS query to the network's resolver.
    result = run(993, NOBODY, host="a" * 64 + ".invalid")
    assert (result.ok, result.classification) == (False, "dns")


def test_result_is_plain_json() -> None:
    result = ProbeResult(ok=True, classification="ok", message="m", capabilities=("IDLE",))
    data: dict[str, Any] = json.loads(json.dumps(asdict(result)))
    assert data == {
        "ok": True, "classification": "ok", "message": "m", "capabilities": ["IDLE"],
        "folders": [], "missing_folders": [],
    }  # fmt: skip
