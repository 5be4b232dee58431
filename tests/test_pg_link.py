"""PostgreSQL connections notice a silent peer within the bounds of ``db/link.py``.

The parameters are checked as libpq reports them on a live connection, and then for real:
a pool in a pod's network namespace (tests/harness/netns.py) talks to a private cluster
(tests/harness/pgserver.py) whose packets an nftables rule drops, as a partition does.
Without ``tcp_user_timeout`` the query and the pool's checkout check would wait for TCP's
retransmission backoff (about 15 minutes); without ``connect_timeout`` a new connection
for the kernel's SYN retries.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from shardworker.config import load_settings
from shardworker.db.link import LinkTimeouts, link_params
from shardworker.db.store import open_pool
from tests.harness.netns import NET_PREFIX, NetnsError, PodNet, Topology
from tests.harness.pgserver import PgServer, PgServerError

ROOT = Path(__file__).resolve().parent.parent
SILENCE_S = 2.0
CONNECT_S = 2.0
SLACK_S = 2.5  # a loaded two-core machine: the process, not the kernel, is late


def test_the_bounds_come_from_the_connect_timeout_and_the_lease_ttl() -> None:
    settings = load_settings({"SHARDWORKER_CONNECT_TIMEOUT_S": "3.2",
                              "SHARDWORKER_LEASE_TTL_S": "8"})  # fmt: skip
    assert LinkTimeouts.from_settings(settings).params() == {
        "connect_timeout": 4, "tcp_user_timeout": 8000, "keepalives": 1,
        "keepalives_idle": 4, "keepalives_interval": 1, "keepalives_count": 3,
    }  # fmt: skip


def test_a_parameter_the_dsn_sets_keeps_its_value() -> None:
    got = link_params("postgresql://u@h/db?connect_timeout=30&keepalives=0", LinkTimeouts())
    assert "connect_timeout" not in got and "keepalives" not in got
    assert got["tcp_user_timeout"] == 8000


def test_the_pool_hands_the_parameters_to_libpq(pg_dsn: str) -> None:
    link = LinkTimeouts(connect_s=5, silence_s=6)
    with open_pool(pg_dsn, 1, link=link) as pool, pool.connection() as conn:
        options = conn.pgconn.info  # what libpq was given for this live connection
    got = {o.keyword.decode(): (o.val or b"").decode() for o in options}
    assert (got["connect_timeout"], got["tcp_user_timeout"]) == ("5", "6000")
    assert (got["keepalives"], got["keepalives_idle"], got["keepalives_interval"],
            got["keepalives_count"]) == ("1", "3", "1", "3")  # fmt: skip


@pytest.fixture(scope="module")
def silent_rig() -> Iterator[tuple[PgServer, PodNet, Topology]]:
    try:
        net = Topology().start()
    except NetnsError as exc:
        pytest.fail(f"cannot build network namespaces: {exc}", pytrace=False)
    try:
        pg = PgServer(["127.0.0.1", net.service_addr], trust=f"{NET_PREFIX}.{net.subnet}.0/24")
        pg.start()
    except PgServerError as exc:
        net.close()
        pytest.fail(f"cannot start a private PostgreSQL: {exc}", pytrace=False)
    net.register("postgres", [pg.port])
    pod = net.add_pod("pod-a")
    yield pg, pod, net
    pg.close()
    net.close()


class Probe:
    """tests/pg_link_probe.py running in the pod's namespace."""

    def __init__(self, pod: PodNet, dsn: str) -> None:
        argv = [sys.executable, "-m", "tests.pg_link_probe", dsn, str(CONNECT_S), str(SILENCE_S)]
        self.proc = subprocess.Popen(pod.wrap(argv), cwd=ROOT, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)  # fmt: skip
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def step(self, name: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = orjson.loads(self._line())
        return result

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=10)  # closes the pipes too


@pytest.mark.timeout(90)
def test_a_silent_postgres_fails_queries_checkouts_and_connects_within_the_bounds(
    silent_rig: tuple[PgServer, PodNet, Topology],
) -> None:
    pg, pod, net = silent_rig
    probe = Probe(pod, pg.dsn(net.service_addr))
    try:
        assert probe.step("query")["ok"]
        pod.cut("postgres")
        query = probe.step("query")
        checkout = probe.step("checkout")
        connect = probe.step("connect")
        pod.heal("postgres")
        again = [probe.step("checkout") for _ in range(3)]  # the pool reconnects in backoff
    finally:
        pod.heal()
        probe.close()
    print(query, checkout, connect, again)
    assert not query["ok"] and query["error"] == "OperationalError", query
    assert SILENCE_S * 0.8 <= query["took_s"] <= SILENCE_S + SLACK_S, query
    # The pool's check of its idle connection fails within the silence bound, then no
    # new connection comes within the pool's own timeout (the connect deadline here).
    assert not checkout["ok"], checkout
    assert checkout["took_s"] <= SILENCE_S + CONNECT_S + SLACK_S, checkout
    assert not connect["ok"] and connect["took_s"] <= CONNECT_S + SLACK_S, connect
    assert any(x["ok"] for x in again), f"the pool did not recover after the heal: {again}"
