"""Where shardworker may connect: the outbound policy, checked after DNS resolution.

Provider rows are written by Alga's UI, so the host of an IMAP server or an OAuth2 token
URL is tenant input.  Without a policy a row could point the worker at the cloud metadata
service or at any internal port and read the answer back through ``error_message``.

Every outbound connection (IMAP and token endpoints) goes through :func:`connect`: the
host is resolved once, every address is checked against ``SHARDWORKER_OUTBOUND_DENY_CIDRS``
(link-local and metadata addresses by default) and ``SHARDWORKER_OUTBOUND_ALLOW_CIDRS``
(empty: everything not denied, private ranges included, since on-premises IMAP servers
live there), and the socket connects to a vetted address.  TLS still verifies the
certificate against the host *name* (the caller passes it as SNI), so resolving first
does not weaken it.  A name that resolves to any denied address is refused as a whole:
no legitimate mail server shares a name with the metadata service, and picking the
"good" address of a mixed answer would reward DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shardworker.config import DEFAULT_OUTBOUND_DENY, Settings
from shardworker.deadline import Deadline
from shardworker.errors import ImapTransientError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SockAddr = tuple[int, tuple[str, int] | tuple[str, int, int, int]]


class OutboundDeniedError(ImapTransientError):
    """The policy refuses every address the host resolves to (or one of them)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="outbound_denied")


class PlaintextRefusedError(ImapTransientError):
    """A plain-text login to a non-loopback host without SHARDWORKER_ALLOW_PLAINTEXT_LOGIN."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="plaintext_refused")


def _networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _plain(addr: IPAddress) -> IPAddress:
    # ::ffff:169.254.169.254 reaches the IPv4 address: judge it as one.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class OutboundPolicy:
    deny: tuple[IPNetwork, ...] = field(default_factory=lambda: _networks(DEFAULT_OUTBOUND_DENY))
    allow: tuple[IPNetwork, ...] = ()
    allow_plaintext_login: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundPolicy:
        return cls(
            deny=_networks(settings.outbound_deny_cidrs),
            allow=_networks(settings.outbound_allow_cidrs),
            allow_plaintext_login=settings.allow_plaintext_login,
        )

    def permits(self, addr: IPAddress) -> bool:
        addr = _plain(addr)
        if any(addr in net for net in self.deny if net.version == addr.version):
            return False
        if not self.allow:
            return True
        return any(addr in net for net in self.allow if net.version == addr.version)


def is_loopback_host(host: str) -> bool:
    """A loopback IP literal or ``localhost`` (checked again after resolution)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return _plain(ipaddress.ip_address(host.strip("[]"))).is_loopback
    except ValueError:
        return False


def resolve(host: str, port: int, deadline: Deadline) -> list[SockAddr]:
    """``getaddrinfo`` for TCP, bounded by ``deadline`` (the C call has no timeout)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        return _getaddrinfo(host.strip("[]"), port)
    result: list[list[SockAddr] | BaseException] = []

    def lookup() -> None:
        try:
            result.append(_getaddrinfo(host, port))
        except BaseException as exc:  # handed to the waiting thread
            result.append(exc)

    thread = threading.Thread(target=lookup, name="dns-lookup", daemon=True)
    thread.start()
    thread.join(deadline.remaining())
    if not result:
        raise TimeoutError(f"DNS lookup of {host} took longer than the deadline")
    found = result[0]
    if isinstance(found, BaseException):
        raise found
    return found


def _getaddrinfo(host: str, port: int) -> list[SockAddr]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [(family, addr) for family, _, _, _, addr in infos]  # type: ignore[misc]


def vet(
    host: str, port: int, addrs: Sequence[SockAddr], policy: OutboundPolicy, *, what: str
) -> None:
    """Refuse the connection when any resolved address is outside the policy."""
    for _, sockaddr in addrs:
        addr = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if not policy.permits(addr):
            raise OutboundDeniedError(
                f"{what} {host}:{port} resolves to {addr}, which the outbound policy "
                "refuses (SHARDWORKER_OUTBOUND_DENY_CIDRS / SHARDWORKER_OUTBOUND_ALLOW_CIDRS)"
            )


def all_loopback(addrs: Sequence[SockAddr]) -> bool:
    return bool(addrs) and all(
        _plain(ipaddress.ip_address(a[0].split("%", 1)[0])).is_loopback for _, a in addrs
    )


def connect(
    host: str,
    port: int,
    policy: OutboundPolicy,
    deadline: Deadline,
    *,
    what: str = "server",
    loopback_only: str = "",
) -> socket.socket:
    """A TCP socket to a vetted address of ``host``, connected within ``deadline``.

    A non-empty ``loopback_only`` refuses any non-loopback address (plain-text logins,
    http token URLs) with that hint in the message.  Raises ``OutboundDeniedError``,
    ``PlaintextRefusedError`` or the ``OSError`` of the last address tried.
    """
    addrs = resolve(host, port, deadline)
    vet(host, port, addrs, policy, what=what)
    if loopback_only and not all_loopback(addrs):
        raise PlaintextRefusedError(
            f"{what} {host}:{port} is not a loopback address and the connection would not "
            f"be encrypted; {loopback_only}"
        )
    last: OSError = OSError(f"{host} resolved to no address")
    for family, sockaddr in addrs:
        left = deadline.remaining()
        if left <= 0:
            raise TimeoutError(f"connecting to {host}:{port} took longer than the deadline")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(left)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise last
