"""A pool of real `shardworker run` pods against the test session's servers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import redis

from shardworker.config import Settings
from shardworker.db.providers import create_provider
from shardworker.db.store import open_pool
from shardworker.pool.registry import Registry
from shardworker.secrets.store import SecretStore, secret_name
from tests.support import TEST_KEYS, rig_settings, worker_env

POOL_TIMINGS = {
    "lease_ttl_s": "4", "lease_renew_s": "1", "member_grace_s": "4", "leader_ttl_s": "3",
    "leader_round_s": "0.5", "assignment_poll_s": "0.25", "join_debounce_s": "0.5",
    "drain_deadline_s": "8", "provider_refresh_s": "1", "workers": "2",
    "worker_ping_timeout_s": "30", "metrics_addr": "127.0.0.1:0",
}  # fmt: skip


# Warnings every plaintext test rig logs, left out of :meth:`Cluster.warnings`.
QUIET_EVENTS = frozenset({"imap_plaintext_connection"})


class Pod:
    def __init__(self, name: str, settings: Settings, log_path: Path) -> None:
        self.name = name
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = worker_env(self.settings)
        env["SHARDWORKER_POD_NAME"] = self.name
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shardworker", "run"], env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole pod (coordinator and workers), as a node failure would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                try:
                    out.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue
        return out

    def worker_pids(self) -> dict[str, int]:
        """member → pid of the latest worker_started line of each member."""
        return {line["member"]: line["pid"] for line in self.log_lines()
                if line.get("event") == "worker_started" and "member" in line}  # fmt: skip

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            with_kill = False
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with_kill = True
            if with_kill:
                self.kill()
        if self.proc is not None:
            # Orphaned workers of a killed coordinator must not outlive the test.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


class Cluster:
    def __init__(
        self, dsn: str, redis_url: str, dovecot: Any, tmp: Path, providers: int, **overrides: str
    ) -> None:
        timings = {**POOL_TIMINGS, **overrides}
        self.settings = rig_settings(dsn, redis_url, str(dovecot.cafile), **timings)
        self.dovecot = dovecot
        self.tmp = tmp
        self.redis = redis.Redis.from_url(redis_url)
        self.registry = Registry(self.redis)
        self.tenant = str(uuid.uuid4())
        self.users: dict[str, str] = {}
        self.pods: dict[str, Pod] = {}
        self._create_providers(providers)

    def _create_providers(self, n: int) -> None:
        users = self.dovecot.add_users(n, prefix="pool")
        with open_pool(self.settings.database_url, max_size=2) as pool:
            secrets = SecretStore(self.settings, pool)
            for user, password in users:
                pid = create_provider(
                    pool, tenant=self.tenant, mailbox=f"{user}@example.com", host="127.0.0.1",
                    port=self.dovecot.plain_port, secure=False, allow_starttls=False,
                    auth_type="password", username=user,
                )  # fmt: skip
                secrets.put(self.tenant, pid, secret_name("password", pid), password)
                self.users[pid] = user

    def start_pod(self, name: str) -> Pod:
        pod = Pod(name, self.settings, self.tmp / f"{name}.log")
        self.pods[name] = pod
        pod.start()
        return pod

    def leases(self, tenant: str | None = None) -> dict[str, str]:
        """provider id → member holding a final (non-provisional) lease token, of the
        cluster's tenant (or ``tenant``)."""
        prefix = f"sw:lease:{tenant or self.tenant}:"
        out = {}
        for key in self.redis.scan_iter(match=prefix + "*", count=1000):
            token = self.redis.get(key)
            if token is None:
                continue
            member, _, rest = token.decode().partition("|")
            if not rest.startswith("p|"):
                out[key.decode()[len(prefix) :]] = member
        return out

    def sessions(self) -> Counter[str]:
        self.dovecot.close_admin_sessions()
        who = self.dovecot.who()
        return Counter({u: who.get(u, 0) for u in self.users.values()})

    def all_served(self, by_pods: set[str] | None = None) -> bool:
        """Every provider leased by a live member, and exactly one IMAP session per mailbox."""
        leases = self.leases()
        if set(leases) != set(self.users):
            return False
        if by_pods is not None and {m.split("/")[0] for m in leases.values()} - by_pods:
            return False
        return all(n == 1 for n in self.sessions().values())

    def owners(self, tenant: str | None = None) -> dict[str, str]:
        """provider id → assigned member, of the cluster's tenant (or ``tenant``)."""
        prefix = f"{tenant or self.tenant}:"
        assignment = self.registry.read_assignment()
        owners = {} if assignment is None else assignment.owners
        return {k[len(prefix) :]: m for k, m in owners.items() if k.startswith(prefix)}

    def wait(self, predicate: Any, timeout_s: float, what: str) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if predicate():
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout_s}s; {self.diagnose()}")

    def diagnose(self) -> str:
        leases = self.leases()
        by_pod = Counter(m.split("/")[0] for m in leases.values())
        unleased = len(set(self.users) - set(leases))
        sessions = Counter(self.sessions().values())
        owners = Counter(m.split("/")[0] for m in self.owners().values())
        members = self.registry.live_members(60)
        return (
            f"leases by pod {dict(by_pod)}, unleased {unleased}, sessions per mailbox "
            f"{dict(sessions)}, assignment by pod {dict(owners)}, live members {members}, "
            f"leader {self.registry.current_leader()}"
        )

    def unserved(self, by_pods: set[str]) -> str:
        """Why :meth:`all_served` says no: the raw lease values of providers not leased
        by ``by_pods`` and the mailboxes without exactly one session (a few of each)."""
        prefix = f"sw:lease:{self.tenant}:"
        raw = {pid: self.redis.get(prefix + pid) for pid in self.users}
        leased = {p: (v.decode() if v else None) for p, v in raw.items()}
        off = {p: v for p, v in leased.items()
               if v is None or "|p|" in v or v.split("/")[0] not in by_pods}  # fmt: skip
        sessions = {u: n for u, n in self.sessions().items() if n != 1}
        some_off, some_sessions = dict(list(off.items())[:5]), dict(list(sessions.items())[:5])
        return (f"{len(off)} not leased by {sorted(by_pods)}: {some_off}; "
                f"{len(sessions)} without one session: {some_sessions}")  # fmt: skip

    def warnings(self, limit: int = 40) -> str:
        """The pods' warning and error lines, counted by event, with the first few in
        full: what a failed timing assertion shows (expected plaintext notes left out)."""
        counts: Counter[str] = Counter()
        first: list[str] = []
        for name, pod in self.pods.items():
            for line in pod.log_lines():
                event = str(line.get("event"))
                if line.get("level") not in ("warning", "error") or event in QUIET_EVENTS:
                    continue
                counts[f"{name}:{event}"] += 1
                if len(first) < limit:
                    first.append(f"{name} {line}")
        return f"warnings {dict(counts)}\n" + "\n".join(first)

    def close(self) -> None:
        for pod in self.pods.values():
            pod.stop()
        self.redis.close()


__all__ = ["TEST_KEYS", "Cluster", "Pod"]
