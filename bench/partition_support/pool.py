"""Real `shardworker run` pods, each in its own network namespace, through Sentinel."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.chaos_support.pool import ChaosPool
from bench.partition_support.servers import PartitionServers
from shardworker.config import Settings
from shardworker.db.providers import create_provider
from shardworker.db.store import open_pool
from shardworker.redisconn import redis_client
from shardworker.secrets.store import SecretStore, secret_name
from tests.harness.dovecot import ImapUser
from tests.harness.netns import PodNet
from tests.pool_support import Pod
from tests.support import worker_env


def partition_timings() -> dict[str, str]:
    """Short pool timings (a fault lasts seconds, not minutes), production semantics otherwise."""
    return {
        "workers": "2", "lease_ttl_s": "6", "lease_renew_s": "1.5", "member_grace_s": "6",
        "leader_ttl_s": "4", "leader_round_s": "0.5", "assignment_poll_s": "0.25",
        "join_debounce_s": "0.5", "drain_deadline_s": "8", "provider_refresh_s": "2",
        "worker_ping_timeout_s": "60", "metrics_addr": "127.0.0.1:0", "log_level": "INFO",
        "sync_threads": "8", "net_timeout_s": "5", "connect_timeout_s": "3",
        # Dovecot's plain port at the host side of the veth pairs: not a loopback address,
        # so the plaintext guard would refuse every login.  The rig has no TLS endpoint
        # there; what it tests is the network, not the transport.
        "allow_plaintext_login": "true",
    }  # fmt: skip


class NsPod(Pod):
    """A pod whose processes run inside its network namespace."""

    def __init__(self, name: str, settings: Settings, log_path: Path, net: PodNet) -> None:
        super().__init__(name, settings, log_path)
        self.net = net

    def start(self) -> None:
        env = worker_env(self.settings)
        env["SHARDWORKER_POD_NAME"] = self.name
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.net.wrap([sys.executable, "-m", "shardworker", "run"]), env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip


class PartitionPool(ChaosPool):
    def __init__(self, servers: PartitionServers, log_dir: Path, timings: dict[str, str]) -> None:
        assert servers.dovecot is not None
        super().__init__(
            servers.database_url, servers.redis_url, str(servers.dovecot.cafile), log_dir,
            imap_port=servers.dovecot.plain_port, timings={**timings, **servers.service_settings()},
        )  # fmt: skip
        self.servers = servers
        self.redis.close()
        self.redis = redis_client(self.settings, timeout_s=5)

    def create_providers(self, users: Sequence[ImapUser]) -> None:
        with open_pool(self.settings.database_url, max_size=2) as pool:
            secrets = SecretStore(self.settings, pool)
            for user in users:
                pid = create_provider(
                    pool, tenant=self.tenant, mailbox=f"{user.name}@example.com",
                    host=self.servers.net.service_addr, port=self.imap_port, secure=False,
                    allow_starttls=False, auth_type="password", username=user.name,
                )  # fmt: skip
                secrets.put(self.tenant, pid, secret_name("password", pid), user.password)
                self.users[pid] = user.name

    def start_pod(self, name: str) -> Pod:
        pod = self.pods.get(name)
        if pod is None:
            net = self.servers.net.pods.get(name) or self.servers.net.add_pod(name)
            pod = NsPod(name, self.settings, self.log_dir / f"{name}.log", net)
            self.pods[name] = pod
        pod.start()
        return pod

    def net(self, name: str) -> PodNet:
        pod = self.pods[name]
        assert isinstance(pod, NsPod)
        return pod.net

    def lease_owners(self) -> dict[str, str]:
        """provider → member holding a final (non-provisional) lease token."""
        out = {}
        for key in self.redis.scan_iter(match=f"sw:lease:{self.tenant}:*", count=1000):
            token: Any = self.redis.get(key)
            if token is not None and b"|p|" not in token:
                out[key.decode().rsplit(":", 1)[1]] = token.decode().split("|")[0]
        return out

    def leader_pod(self) -> str | None:
        from shardworker.pool.registry import Registry

        leader = Registry(self.redis).current_leader()
        return None if leader is None else leader.split("|")[0].split("/")[0]

    def served(self, exclude_pods: frozenset[str] = frozenset()) -> bool:
        """Every provider leased by a pod not excluded, one session per mailbox from those."""
        return not self.unserved(exclude_pods)

    def unserved(self, exclude_pods: frozenset[str] = frozenset()) -> str:
        """Why not every provider is served ('' when all are)."""
        owners = self.lease_owners()
        unleased = len(set(self.users) - set(owners))
        excluded = sum(1 for m in owners.values() if m.split("/")[0] in exclude_pods)
        counts = Counter(self.sessions_by_user(exclude_pods).get(u, 0) for u in self.users.values())
        if not unleased and not excluded and set(counts) == {1}:
            return ""
        return (f"{unleased} unleased, {excluded} leased by {sorted(exclude_pods)}, "
                f"sessions per mailbox {dict(counts)}")  # fmt: skip

    def sessions_by_user(self, exclude_pods: frozenset[str] = frozenset()) -> Counter[str]:
        skip = {self.net(p).addr for p in exclude_pods}
        out: Counter[str] = Counter()
        for (user, ip), n in self.servers.sessions().items():
            if ip not in skip:
                out[user] += n
        return out

    def sessions_of(self, pod: str) -> int:
        """IMAP sessions open from this pod's namespace."""
        addr = self.net(pod).addr
        return sum(n for (_, ip), n in self.servers.sessions().items() if ip == addr)
