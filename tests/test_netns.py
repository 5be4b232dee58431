"""The partition harness itself: namespaces, per-dependency cuts, cleanup (real kernel)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.harness.net import free_ports
from tests.harness.netns import NetnsError, Topology

pytestmark = pytest.mark.timeout(60)

PROBE = (
    "import socket,sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close(); print('open')\n"
    "except OSError as e:\n"
    "    print(type(e).__name__)\n"
)


@pytest.fixture
def topology() -> Iterator[Topology]:
    try:
        net = Topology().start()
    except NetnsError as exc:
        pytest.fail(f"cannot build network namespaces: {exc}", pytrace=False)
    yield net
    net.close()


def _listen(addr: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(16)
    return sock


def _probe(net: Topology, pod: str, port: int) -> str:
    argv = net.pods[pod].wrap([sys.executable, "-c", PROBE, net.service_addr, str(port)])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
    return done.stdout.strip()


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def test_each_pod_reaches_the_services_and_a_cut_silences_one_dependency_of_one_pod(
    topology: Topology,
) -> None:
    a_port, b_port = free_ports(2)
    listeners = [_listen(topology.service_addr, p) for p in (a_port, b_port)]
    try:
        topology.register("redis", [a_port])
        topology.register("postgres", [b_port])
        topology.add_pod("pod-a")
        topology.add_pod("pod-b")
        assert _probe(topology, "pod-a", a_port) == "open"
        topology.pods["pod-a"].cut("redis")
        assert topology.pods["pod-a"].cut_ports() == [a_port]
        assert _probe(topology, "pod-a", a_port) == "TimeoutError"  # dropped, not refused
        assert _probe(topology, "pod-a", b_port) == "open"
        assert _probe(topology, "pod-b", a_port) == "open"
        topology.pods["pod-a"].heal()
        assert topology.pods["pod-a"].cut_ports() == []
        assert _probe(topology, "pod-a", a_port) == "open"
    finally:
        for sock in listeners:
            sock.close()


def test_close_removes_every_namespace_and_link(topology: Topology) -> None:
    pod = topology.add_pod("pod-a")
    assert pod.netns in _ip("netns", "list")
    topology.close()
    assert topology.tag not in _ip("netns", "list")
    assert topology.tag not in _ip("-o", "link")


def test_an_unknown_dependency_is_named(topology: Topology) -> None:
    pod = topology.add_pod("pod-a")
    with pytest.raises(NetnsError, match="unknown dependency 'imap'"):
        pod.cut("imap")
