"""The servers of a partition run, reachable from the pods' namespaces at one address.

Private instances only: PostgreSQL (tests/harness/pgserver.py), Redis primary + replica +
3 Sentinels (tests/harness/sentinel.py) and Dovecot, each listening on 127.0.0.1 and on
the topology's service address (tests/harness/netns.py).  Their ports are registered as
the dependencies ``redis`` (both servers and every Sentinel), ``postgres`` and ``imap``,
so ``pod.cut("redis")`` silences one pod's Redis, Sentinel included.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import psycopg

from shardworker.db.migrate import migrate
from tests.harness.dovecot import Dovecot
from tests.harness.dovecot_conf import DovecotOptions, render_config
from tests.harness.netns import NET_PREFIX, Topology
from tests.harness.pgserver import PgServer
from tests.harness.sentinel import MASTER, SentinelRedis

DEPENDENCIES = ("redis", "postgres", "imap")


def _listen_conf(addr: str, plain: int, tls: int) -> str:
    # A later section of the same name overrides the addresses of the harness's listeners.
    return f"""\
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1, {addr}
    port = {plain}
  }}
  inet_listener imaps {{
    address = 127.0.0.1, {addr}
    port = {tls}
  }}
}}
"""


@dataclass
class PartitionServers:
    net: Topology = field(default_factory=Topology)
    pg: PgServer | None = None
    redis: SentinelRedis | None = None
    dovecot: Dovecot | None = None

    def start(self) -> PartitionServers:
        try:
            self.net.start()
            svc = self.net.service_addr
            self.pg = PgServer(["127.0.0.1", svc], trust=f"{NET_PREFIX}.{self.net.subnet}.0/24")
            self.pg.start()
            with psycopg.connect(self.pg.dsn(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE partitions")
            migrate(self.database_url)
            self.redis = SentinelRedis(listen=("127.0.0.1", svc), announce=svc).start()
            self.dovecot = Dovecot()
            lay = self.dovecot.layout
            self.dovecot.options = DovecotOptions(
                extra_conf=_listen_conf(svc, lay.plain_port, lay.tls_port)
            )
            lay.conf_path.write_text(render_config(lay, self.dovecot.options))
            self.dovecot.start()
        except BaseException:
            self.close()
            raise
        self.net.register("redis", self.redis.ports)
        self.net.register("postgres", [self.pg.port])
        self.net.register("imap", [self.dovecot.plain_port, self.dovecot.tls_port])
        return self

    @property
    def database_url(self) -> str:
        assert self.pg is not None
        return self.pg.dsn(self.net.service_addr, "partitions")

    def service_settings(self) -> dict[str, str]:
        """Settings overrides that point a pod at these servers (through Sentinel)."""
        assert self.redis is not None
        return {
            "redis_sentinels": self.redis.sentinel_setting,
            "redis_sentinel_master": MASTER,
        }

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return f"redis://{self.net.service_addr}:{self.redis.primary_port}/0"

    def sessions(self) -> Counter[tuple[str, str]]:
        """IMAP sessions per (user, client address) opened from a pod's namespace."""
        assert self.dovecot is not None
        out: Counter[tuple[str, str]] = Counter()
        text = self.dovecot.doveadm("-f", "tab", "who")
        for line in text.splitlines()[1:]:
            cols = line.split("\t")
            if len(cols) >= 5:
                for ip in cols[4].strip("()").split():
                    if ip.startswith(f"{NET_PREFIX}."):
                        out[(cols[0], ip)] += 1
        return out

    def close(self) -> None:
        for closer in (self.dovecot, self.redis, self.pg):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        self.net.close()
