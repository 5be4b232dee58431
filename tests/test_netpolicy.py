"""Issue 12 items 5 and 15: the outbound policy (checked after DNS resolution) and plain-text
logins.  A provider row pointing at the metadata service, at a denied range or, without
TLS, at a non-loopback host is refused with a clear error on the row; a non-IMAP answer is
its own classification in `providers test` and is never echoed."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from shardworker.errors import ImapTransientError
from shardworker.imap.connect import Credentials, close_client, open_client
from shardworker.imap.probe import probe
from shardworker.netpolicy import (
    OutboundDeniedError,
    OutboundPolicy,
    PlaintextRefusedError,
    _networks,
)
from tests.support import Rig, rig_settings, wait_until

pytestmark = pytest.mark.timeout(60)
CREDS = Credentials("password", "alice", "pw-S3cret")


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("169.254.169.254", False),  # AWS/GCP/Azure metadata
        ("169.254.0.1", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),  # AWS metadata over IPv6
        ("::ffff:169.254.169.254", False),  # IPv4-mapped form of the same
        ("100.100.100.200", False),  # Alibaba metadata
        ("0.0.0.0", False),
        ("127.0.0.1", True),
        ("10.1.2.3", True),  # on-premises servers live in private ranges
        ("192.168.0.10", True),
        ("172.16.5.5", True),
        ("fd12:3456::1", True),
        ("203.0.113.9", True),
    ],
)
def test_default_policy(address: str, allowed: bool) -> None:
    assert OutboundPolicy().permits(ipaddress.ip_address(address)) is allowed


def test_an_allow_list_admits_only_its_ranges_and_deny_still_wins() -> None:
    policy = OutboundPolicy(allow=_networks(["10.0.0.0/8", "169.254.10.0/24"]))
    assert policy.permits(ipaddress.ip_address("10.9.9.9"))
    assert not policy.permits(ipaddress.ip_address("192.168.1.1"))
    assert not policy.permits(ipaddress.ip_address("169.254.10.1"))


class Listener:
    """Counts connections; says ``banner`` to each one."""

    def __init__(self, banner: bytes = b"* OK ready\r\n") -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.banner = banner
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(self.banner)
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(100)


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.sock.close()


def _open(host: str, port: int, policy: OutboundPolicy | None = None, security: Any = "tls"
          ) -> Any:  # fmt: skip
    return open_client(host, port, security, CREDS, timeout_s=2, connect_timeout_s=2,
                       ssl_context=None, policy=policy)  # fmt: skip


def test_the_metadata_address_is_refused_before_any_packet() -> None:
    with pytest.raises(OutboundDeniedError) as info:
        _open("169.254.169.254", 80)
    assert info.value.reason == "outbound_denied"
    assert "169.254.169.254" in str(info.value) and "OUTBOUND_DENY_CIDRS" in str(info.value)


def test_the_policy_is_applied_after_dns_resolution(listener: Listener) -> None:
    deny = OutboundPolicy(deny=_networks(["127.0.0.0/8", "::1/128"]))
    with pytest.raises(OutboundDeniedError):
        _open("localhost", listener.port, deny)  # a name, resolved to a denied address
    assert listener.accepted == 0


def test_plaintext_login_to_a_non_loopback_host_needs_the_setting() -> None:
    # 192.0.2.1 (TEST-NET-1) is refused before any packet is sent.
    with pytest.raises(PlaintextRefusedError) as info:
        _open("192.0.2.1", 143, security="plain")
    assert "SHARDWORKER_ALLOW_PLAINTEXT_LOGIN" in str(info.value)


def test_plaintext_login_to_loopback_is_allowed() -> None:
    server = Listener(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
    try:
        with pytest.raises(ImapTransientError) as info:
            _open("127.0.0.1", server.port, security="plain")
        assert not isinstance(info.value, PlaintextRefusedError)
        assert server.accepted == 1
    finally:
        server.sock.close()


def test_providers_test_classifies_a_non_imap_service_without_echoing_it() -> None:
    server = Listener(b"SSH-2.0-OpenSSH_9.6 secret-bastion-banner\r\n")
    try:
        result = probe("127.0.0.1", server.port, "plain", CREDS, [], timeout_s=2,
                       ssl_context=None)  # fmt: skip
    finally:
        server.sock.close()
    assert result.classification == "not_imap"
    assert "SSH" not in result.message and "bastion" not in result.message


def test_probe_reports_an_outbound_denial() -> None:
    result = probe("169.254.169.254", 143, "tls", CREDS, [], timeout_s=2, ssl_context=None)
    assert result.classification == "outbound_denied"


@pytest.mark.parametrize(
    "case",
    [
        ("169.254.169.254", True, "outbound policy refuses"),
        ("192.0.2.1", False, "SHARDWORKER_ALLOW_PLAINTEXT_LOGIN"),
    ],
)
def test_a_refused_row_gets_a_clear_error(
    migrated_dsn: str, redis_url: str, dovecot: Any, case: tuple[str, bool, str]
) -> None:
    host, secure, expected = case
    settings = rig_settings(migrated_dsn, redis_url, str(dovecot.cafile))
    r = Rig(settings, dovecot)
    try:
        pid = r.add_provider("policy-user", "pw", secure=secure)
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute("UPDATE imap_email_provider_config SET host = %s "
                         "WHERE email_provider_id = %s", (host, pid))  # fmt: skip
        r.start()
        wait_until(lambda: expected in (r.row(pid)["error_message"] or ""), 15)
        assert r.row(pid)["status"] == "error"
    finally:
        r.close()


def test_a_loopback_plain_login_still_works(dovecot: Any, imap_user: Any) -> None:
    creds = Credentials("password", imap_user.name, imap_user.password)
    client = open_client("127.0.0.1", dovecot.plain_port, "plain", creds, timeout_s=5,
                         connect_timeout_s=5, ssl_context=None)  # fmt: skip
    close_client(client)
