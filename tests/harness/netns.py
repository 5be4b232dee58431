"""Pods on their own hosts: one network namespace per pod, links that can be cut per service.

    net = Topology()                       # picks a free 10.213.X.0/24, makes the service address
    net.start()
    net.register("redis", [6390, 6391])    # dependency name -> the TCP ports it listens on
    pod = net.add_pod("pod-a")             # namespace + veth pair, default route to the host
    subprocess.Popen(pod.wrap(["python", "-m", "shardworker", "run"]))
    pod.cut("redis")                       # the pod's processes keep running, Redis is silent
    pod.heal("redis")
    net.close()                            # every namespace and link gone (also at exit)

Addresses.  Everything lives in one /24 of 10.213.0.0/16 that no interface of this machine
uses when the topology starts.  Pod *i* gets the /30 ``10.213.X.4i``: the host side of its
veth pair is ``.4i+1``, the namespace side ``.4i+2``.  The servers are reached at one
*service address*, ``10.213.X.253``, on a veth pair whose both ends stay in the host
namespace (this kernel has no ``dummy`` driver).  Linux accepts a packet for any local
address on any interface, so a pod reaches the service address through its own veth and
the host's routing table, without IP forwarding, NAT or ``route_localnet``.

Servers.  They are private instances (Redis, Sentinel, PostgreSQL, Dovecot) that listen on
127.0.0.1 *and* on the service address, so the test process talks to them over loopback as
usual while the pods go through their veths.  That is simpler and more honest than DNAT to
loopback: a Sentinel hands the same address to every client, and there is no NAT state
that a cut would have to flush.

Cuts.  Inside each namespace an nftables table ``swcut`` drops, in both directions, TCP to
and from the service address on the ports in its set ``cut``; ``cut``/``heal`` add and
remove a dependency's ports in one ``nft`` command.  Dropping (not rejecting) is what a
partition looks like: the pod's sockets stay open, its writes are retransmitted, and they
arrive late if the link heals before the kernel gives up.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence

NET_PREFIX = "10.213"
NAME_PREFIX = "swp"  # namespaces and links: swp<pid>-<i>, so a dead run's leftovers are known
SERVICE_HOST = 253
MAX_PODS = 62
CMD_TIMEOUT_S = 10.0

_LIVE: set[Topology] = set()


class NetnsError(RuntimeError):
    """A namespace, link or nftables rule could not be made or removed."""


def _sbin(name: str) -> str:
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        raise NetnsError(f"{name} is not installed (scripts/install-deps.sh installs it)")
    return found


def _run(args: Sequence[str], *, input_text: str | None = None, check: bool = True) -> str:
    try:
        done = subprocess.run(list(args), input=input_text, capture_output=True, text=True,
                              timeout=CMD_TIMEOUT_S, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(args)}: no answer within {CMD_TIMEOUT_S}s") from None
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _ip(*args: str, check: bool = True) -> str:
    return _run([_sbin("ip"), *args], check=check)


def _used_subnets() -> set[int]:
    """Third octets of 10.213.X.* addresses on any interface of the host namespace."""
    text = _ip("-4", "-o", "addr", "show")
    return {int(m) for m in re.findall(rf"inet {re.escape(NET_PREFIX)}\.(\d+)\.", text)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Delete namespaces and links of earlier runs whose process is gone; returns their names."""
    names = _ip("netns", "list").split()
    links = re.findall(r"^\d+: ([^:@\s]+)", _ip("-o", "link", "show"), flags=re.M)
    removed = []
    for name in [*names, *links]:
        m = re.fullmatch(rf"{NAME_PREFIX}(\d+)-\w+", name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if name in names:
            _ip("netns", "del", name, check=False)
        else:
            _ip("link", "del", name, check=False)
        removed.append(name)
    return removed


CUT_TABLE = """\
table inet swcut {{
  set cut {{
    type inet_service
  }}
  chain out {{
    type filter hook output priority 0; policy accept;
    ip daddr {svc} tcp dport @cut drop
  }}
  chain in {{
    type filter hook input priority 0; policy accept;
    ip saddr {svc} tcp sport @cut drop
  }}
}}
"""


class PodNet:
    """One pod's namespace: run commands in it, cut and heal its links per dependency."""

    def __init__(self, topology: Topology, name: str, index: int) -> None:
        self.topology = topology
        self.name = name
        self.index = index
        self.netns = f"{topology.tag}-{index}"
        base = topology.subnet_base + 4 * index
        self.host_addr = str(ipaddress.IPv4Address(base + 1))
        self.addr = str(ipaddress.IPv4Address(base + 2))
        self._host_link = f"{topology.tag}-{index}h"
        self.cut_now: set[str] = set()

    def create(self) -> None:
        ns_link = f"{self.topology.tag}-{self.index}n"
        _ip("netns", "add", self.netns)
        _ip("link", "add", self._host_link, "type", "veth", "peer", "name", ns_link)
        _ip("link", "set", ns_link, "netns", self.netns)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self._host_link)
        _ip("link", "set", self._host_link, "up")
        _ip("-n", self.netns, "addr", "add", f"{self.addr}/30", "dev", ns_link)
        _ip("-n", self.netns, "link", "set", ns_link, "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        _ip("-n", self.netns, "route", "add", "default", "via", self.host_addr)
        self.nft(input_text=CUT_TABLE.format(svc=self.topology.service_addr), args=("-f", "-"))

    def remove(self) -> None:
        # Deleting the namespace deletes the veth end inside it, and with it the host end.
        _ip("netns", "del", self.netns, check=False)
        _ip("link", "del", self._host_link, check=False)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace (``ip netns exec`` keeps the environment)."""
        return [_sbin("ip"), "netns", "exec", self.netns, *argv]

    def nft(self, *, args: Sequence[str], input_text: str | None = None) -> str:
        return _run(self.wrap([_sbin("nft"), *args]), input_text=input_text)

    def cut(self, *deps: str) -> None:
        """Drop every packet between this pod and these dependencies from now on."""
        self._set(deps, "add")
        self.cut_now |= set(deps)

    def heal(self, *deps: str) -> None:
        """Let these dependencies through again (all that are cut when none is named)."""
        todo = tuple(deps) or tuple(self.cut_now)
        self._set(todo, "delete")
        self.cut_now -= set(todo)

    def _set(self, deps: Iterable[str], verb: str) -> None:
        ports = sorted({p for d in deps for p in self.topology.ports(d)})
        if ports:
            elements = "{ " + ", ".join(map(str, ports)) + " }"
            self.nft(args=(verb, "element", "inet", "swcut", "cut", elements))

    def cut_ports(self) -> list[int]:
        """The ports dropped right now, as nftables reports them."""
        text = self.nft(args=("list", "set", "inet", "swcut", "cut"))
        m = re.search(r"elements = \{([^}]*)\}", text)
        return sorted(int(x) for x in m.group(1).split(",")) if m else []


class Topology:
    """The service address and the pods' namespaces of one run (see module docstring)."""

    def __init__(self) -> None:
        self.tag = f"{NAME_PREFIX}{os.getpid()}"
        self.subnet = 0
        self.pods: dict[str, PodNet] = {}
        self._deps: dict[str, tuple[int, ...]] = {}
        self._started = False

    @property
    def subnet_base(self) -> int:
        return int(ipaddress.IPv4Address(f"{NET_PREFIX}.{self.subnet}.0"))

    @property
    def service_addr(self) -> str:
        return f"{NET_PREFIX}.{self.subnet}.{SERVICE_HOST}"

    @property
    def _svc_links(self) -> tuple[str, str]:
        return f"{self.tag}-s", f"{self.tag}-t"

    def start(self) -> Topology:
        if os.geteuid() != 0:
            raise NetnsError("network namespaces need root")
        remove_leftovers()
        used = _used_subnets()
        free = [x for x in range(1, 255) if x not in used]
        if not free:
            raise NetnsError(f"no free /24 left in {NET_PREFIX}.0.0/16")
        self.subnet = free[0]
        _LIVE.add(self)
        self._started = True
        svc, peer = self._svc_links
        _ip("link", "add", svc, "type", "veth", "peer", "name", peer)
        _ip("addr", "add", f"{self.service_addr}/30", "dev", svc)
        _ip("link", "set", svc, "up")
        _ip("link", "set", peer, "up")
        return self

    def register(self, dep: str, ports: Iterable[int]) -> None:
        """Name a dependency by the ports it listens on at the service address."""
        self._deps[dep] = (*self._deps.get(dep, ()), *ports)

    def ports(self, dep: str) -> tuple[int, ...]:
        if dep not in self._deps:
            raise NetnsError(f"unknown dependency {dep!r}; registered: {sorted(self._deps)}")
        return self._deps[dep]

    @property
    def dependencies(self) -> tuple[str, ...]:
        return tuple(self._deps)

    def add_pod(self, name: str) -> PodNet:
        if not self._started:
            raise NetnsError("Topology.start() first")
        if len(self.pods) >= MAX_PODS:
            raise NetnsError(f"at most {MAX_PODS} pods per topology")
        pod = PodNet(self, name, len(self.pods))
        self.pods[name] = pod
        try:
            pod.create()
        except NetnsError:
            pod.remove()
            raise
        return pod

    def close(self) -> None:
        for pod in self.pods.values():
            pod.remove()
        self.pods.clear()
        if self._started:
            _ip("link", "del", self._svc_links[0], check=False)
            self._started = False
        _LIVE.discard(self)

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    """A run that never reached close() must not leave namespaces or links behind."""
    for topology in list(_LIVE):
        with contextlib.suppress(NetnsError):
            topology.close()
