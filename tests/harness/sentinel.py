"""A private Redis primary + replica + Sentinels, with a failover that loses writes on purpose.

    rs = SentinelRedis(listen=("127.0.0.1", svc_addr), announce=svc_addr).start()
    rs.sentinel_setting                # "10.213.1.253:41001,...", for SHARDWORKER_REDIS_SENTINELS
    lost = rs.lossy_failover(write_window_s=3.0)   # the replica misses the last 3 s of writes
    rs.restore_replica()               # the old primary back (empty), a replica of the new one
    rs.close()

Redis replicates asynchronously: a primary acknowledges a write before any replica has it.
To lose writes deterministically, ``lossy_failover`` drops every packet of the replication
connection (an nftables table of its own in this namespace, matching only that
connection's two ports; removed after), so the replica's link stays "up" with no byte
saying otherwise, as in a real partition.  Clients write for ``write_window_s``, the
primary is SIGKILLed (its FIN is dropped too), and the Sentinels promote the replica.
(A proxy between replica and primary does not work: the Sentinels see a replica following
another address than the primary's and reconfigure it to follow the primary directly.)
Every write of the window (leases renewed, dedupe keys, stream entries, pointer jobs) is
gone; the promoted replica's keys that carry a TTL expire at the absolute time their last
replicated write gave them (Redis 7 replicates expiries as PEXPIREAT).

Every server announces ``announce`` (the topology's service address), so the addresses the
Sentinels hand out are reachable from the test process and from every pod's namespace.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.harness.net import free_ports, wait_for_port

MASTER = "swmaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_S = 30.0
REPL_TABLE = """\
table inet {name} {{
  chain out {{
    type filter hook output priority 0; policy accept;
    tcp sport {primary} tcp dport {replica} drop
    tcp sport {replica} tcp dport {primary} drop
  }}
}}
"""


class SentinelError(RuntimeError):
    """A server did not start, or the Sentinels did not fail over in time."""


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SentinelError(f"{name} is not installed (scripts/install-deps.sh installs it)")
    return found


@dataclass(frozen=True)
class FailoverReport:
    old_primary: int  # port
    new_primary: int
    primary_offset: int  # replication offset of the primary when it was killed
    replica_offset: int  # what the promoted replica had received of it
    took_s: float  # from the kill until the Sentinels answered with the new primary

    @property
    def lost_bytes(self) -> int:
        return self.primary_offset - self.replica_offset


class SentinelRedis:
    def __init__(
        self, *, listen: Sequence[str] = ("127.0.0.1",), announce: str = "127.0.0.1",
        sentinels: int = 3,
    ) -> None:  # fmt: skip
        self.listen = tuple(listen)
        self.announce = announce
        self.root = Path(tempfile.mkdtemp(prefix="sw-sentinel-"))
        ports = free_ports(2 + sentinels)
        self.primary_port, self.replica_port = ports[0], ports[1]
        self.sentinel_ports = ports[2:]
        self.quorum = sentinels // 2 + 1
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._table = f"swrepl{self.primary_port}"
        self._table_made = False

    # ----------------------------------------------------------------- addresses

    @property
    def ports(self) -> list[int]:
        """Every port a client may use: both servers and every Sentinel."""
        return [self.primary_port, self.replica_port, *self.sentinel_ports]

    @property
    def sentinel_setting(self) -> str:
        return ",".join(f"{self.announce}:{p}" for p in self.sentinel_ports)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, socket_connect_timeout=2)

    def master_port(self) -> int:
        """The primary the Sentinels name now (asks each until one answers)."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), self.client(port) as s:
                addr = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                if addr:
                    return int(addr[1])
        raise SentinelError("no Sentinel answers")

    def primary(self) -> redis.Redis:
        return self.client(self.master_port())

    # ----------------------------------------------------------------- lifecycle

    def _server(self, port: int, *extra: str) -> None:
        args = [_binary("redis-server"), "--port", str(port), "--bind", " ".join(self.listen),
                "--protected-mode", "no", "--save", "", "--appendonly", "no",
                "--dir", str(self.root), "--dbfilename", f"dump-{port}.rdb",
                "--replica-announce-ip", self.announce, *extra]  # fmt: skip
        self._spawn(port, args)

    def _spawn(self, port: int, args: list[str]) -> None:
        log = (self.root / f"{port}.log").open("wb")
        self._procs[port] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_for_port(port)
        except RuntimeError as exc:
            raise SentinelError(f"{Path(args[0]).name} on {port}: {exc}") from None

    def _sentinel(self, port: int) -> None:
        conf = self.root / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind {' '.join(self.listen)}\nprotected-mode no\n"
            f"dir {self.root}\nsentinel announce-ip {self.announce}\n"
            f"sentinel monitor {MASTER} {self.announce} {self.primary_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        self._spawn(port, [_binary("redis-sentinel"), str(conf)])

    def start(self) -> SentinelRedis:
        try:
            self._server(self.primary_port)
            self._server(self.replica_port, "--replicaof", self.announce, str(self.primary_port))
            self._wait_replica_synced()
            for port in self.sentinel_ports:
                self._sentinel(port)
            self._wait_sentinels_know_replica()
        except BaseException:
            self.close()
            raise
        return self

    def _wait(self, what: str, predicate: object, timeout_s: float = 20.0) -> None:
        assert callable(predicate)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if predicate():
                    return
            time.sleep(0.1)
        raise SentinelError(f"{what}: not within {timeout_s}s")

    def _wait_replica_synced(self) -> None:
        def synced() -> bool:
            with self.client(self.replica_port) as r:
                return bool(r.info("replication").get("master_link_status") == "up")

        self._wait("replica in sync", synced)

    def _wait_sentinels_know_replica(self) -> None:
        def known() -> bool:
            for port in self.sentinel_ports:
                with self.client(port) as s:
                    replicas = s.execute_command("SENTINEL", "REPLICAS", MASTER)
                    sentinels = s.execute_command("SENTINEL", "SENTINELS", MASTER)
                if len(replicas) != 1 or len(sentinels) != len(self.sentinel_ports) - 1:
                    return False
            return True

        self._wait("sentinels see the replica and each other", known)

    # ----------------------------------------------------------------- faults

    def _offset(self, port: int, field: str) -> int:
        with self.client(port) as c:
            return int(c.info("replication").get(field, 0))

    def _replication_port(self, primary: int) -> int:
        """The replica's end (client port) of its replication connection to ``primary``."""
        with self.client(primary) as c:
            clients = c.client_list(_type="replica")
        if len(clients) != 1:
            raise SentinelError(f"expected one replica connection, found {len(clients)}")
        return int(clients[0]["addr"].rsplit(":", 1)[1])

    def _nft(self, text: str) -> None:
        nft = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin")
        if nft is None:
            raise SentinelError("nft is not installed (scripts/install-deps.sh installs it)")
        done = subprocess.run([nft, "-f", "-"], input=text, capture_output=True, text=True,
                              timeout=10, check=False)  # fmt: skip
        if done.returncode != 0:
            raise SentinelError(f"nft: {done.stderr.strip()}")

    def _cut_replication(self, primary: int) -> None:
        port = self._replication_port(primary)
        self._nft(REPL_TABLE.format(name=self._table, primary=primary, replica=port))
        self._table_made = True

    def _heal_replication(self) -> None:
        if self._table_made:
            self._nft(f"delete table inet {self._table}\n")
            self._table_made = False

    def lossy_failover(self, write_window_s: float) -> FailoverReport:
        """Promote a replica that lacks the last ``write_window_s`` of the primary's writes."""
        old = self.master_port()
        new = self.replica_port if old == self.primary_port else self.primary_port
        self._cut_replication(old)
        try:
            time.sleep(write_window_s)
            replica_offset = self._offset(new, "slave_repl_offset")
            primary_offset = self._offset(old, "master_repl_offset")
            self._procs[old].send_signal(signal.SIGKILL)
            self._procs[old].wait(10)
            killed = time.monotonic()
            self._wait("failover", lambda: self.master_port() == new, FAILOVER_TIMEOUT_S)
            with self.client(new) as r:
                self._wait("promoted replica is a primary",
                           lambda: r.info("replication")["role"] == "master")  # fmt: skip
        finally:
            self._heal_replication()
        return FailoverReport(old, new, primary_offset, replica_offset, time.monotonic() - killed)

    def restore_replica(self) -> None:
        """Restart the killed primary empty; the Sentinels make it a replica of the new one."""
        port = self.primary_port if self.master_port() != self.primary_port else self.replica_port
        self._procs.pop(port, None)
        self._server(port)

        def following() -> bool:
            with self.client(port) as r:
                info = r.info("replication")
            return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")

        self._wait("old primary rejoins as a replica", following, FAILOVER_TIMEOUT_S)

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._procs.clear()
        with contextlib.suppress(SentinelError):
            self._heal_replication()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SentinelRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
