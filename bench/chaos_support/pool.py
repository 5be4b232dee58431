"""The pool under test: providers behind the fault proxy, and real `shardworker run` pods."""

from __future__ import annotations

import contextlib
import os
import random
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import redis

from shardworker.config import Settings
from shardworker.db.providers import create_provider
from shardworker.db.store import open_pool
from shardworker.secrets.store import SecretStore, secret_name
from tests.harness.dovecot import ImapUser
from tests.pool_support import Pod
from tests.support import rig_settings


def chaos_timings(stop_s: float) -> dict[str, str]:
    """Short pool timings (a run takes minutes, not hours), production semantics.

    The ping timeout is above the SIGSTOP pause on purpose: the stopped worker must come
    back as a stale owner (the case fencing exists for), not be replaced by its supervisor.
    """
    return {
        "workers": "2", "lease_ttl_s": "6", "lease_renew_s": "1.5", "member_grace_s": "6",
        "leader_ttl_s": "4", "leader_round_s": "0.5", "assignment_poll_s": "0.25",
        "join_debounce_s": "0.5", "drain_deadline_s": "8", "provider_refresh_s": "2",
        "worker_ping_timeout_s": str(int(stop_s + 20)), "metrics_addr": "127.0.0.1:0",
        "log_level": "INFO", "sync_threads": "8",
    }  # fmt: skip


class ChaosPool:
    """``pods`` pods of W workers serving one provider (INBOX) per user via ``imap_port``."""

    def __init__(
        self, dsn: str, redis_url: str, cafile: str, log_dir: Path, *, imap_port: int,
        timings: dict[str, str],
    ) -> None:  # fmt: skip
        self.settings: Settings = rig_settings(dsn, redis_url, cafile, **timings)
        self.log_dir = log_dir
        self.imap_port = imap_port
        self.tenant = str(uuid.uuid4())
        self.users: dict[str, str] = {}  # provider id → IMAP user
        self.pods: dict[str, Pod] = {}
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)

    def create_providers(self, users: Sequence[ImapUser]) -> None:
        with open_pool(self.settings.database_url, max_size=2) as pool:
            secrets = SecretStore(self.settings, pool)
            for user in users:
                pid = create_provider(
                    pool, tenant=self.tenant, mailbox=f"{user.name}@example.com",
                    host="127.0.0.1", port=self.imap_port, secure=False, allow_starttls=False,
                    auth_type="password", username=user.name,
                )  # fmt: skip
                secrets.put(self.tenant, pid, secret_name("password", pid), user.password)
                self.users[pid] = user.name

    # -- pods ----------------------------------------------------------------------------

    def start_pod(self, name: str) -> Pod:
        pod = self.pods.get(name) or Pod(name, self.settings, self.log_dir / f"{name}.log")
        self.pods[name] = pod
        pod.start()
        return pod

    def alive_pods(self) -> list[str]:
        return [n for n, p in self.pods.items() if p.alive]

    def worker_pids(self, name: str) -> dict[str, int]:
        """member → pid of each live worker of pod ``name`` (latest start per member)."""
        pod = self.pods[name]
        found: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in pod.log_path.read_bytes().splitlines():
                if b'"worker_started"' in line:
                    entry = _json(line)
                    if entry and "member" in entry:
                        found[entry["member"]] = int(entry["pid"])
        return {m: pid for m, pid in found.items() if _running(pid)}

    def log_entries(self, name: str) -> Iterator[dict[str, Any]]:
        """Pod ``name``'s JSON log lines, each with ``t``: its time as a Unix timestamp."""
        with contextlib.suppress(FileNotFoundError):
            for line in self.pods[name].log_path.read_bytes().splitlines():
                entry = _json(line) if line.startswith(b"{") else None
                if entry is not None and "ts" in entry:
                    ts = str(entry["ts"]).replace("Z", "+00:00")
                    entry["t"] = datetime.fromisoformat(ts).timestamp()
                    yield entry

    def random_worker(self, rng: random.Random, exclude: set[str]) -> tuple[str, int] | None:
        names = [n for n in self.alive_pods() if n not in exclude]
        rng.shuffle(names)
        for name in names:
            pids = sorted(self.worker_pids(name).items())
            if pids:
                return rng.choice(pids)
        return None

    def close(self) -> None:
        for pod in self.pods.values():
            with contextlib.suppress(Exception):
                pod.stop()
        self.redis.close()

    # -- readiness -----------------------------------------------------------------------

    def leased(self) -> int:
        """Providers holding a final (non-provisional) lease."""
        count = 0
        for key in self.redis.scan_iter(match=f"sw:lease:{self.tenant}:*", count=1000):
            token: Any = self.redis.get(key)
            if token is not None and b"|p|" not in token:
                count += 1
        return count

    def cursors(self) -> int:
        """Providers whose INBOX cursor is recorded: only then is delivered mail owed."""
        with psycopg.connect(self.settings.database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM imap_email_provider_config "
                "WHERE tenant = %s AND folder_state ? 'INBOX'",
                (self.tenant,),
            ).fetchone()
        return int(row[0]) if row else 0


def _json(line: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed worker lingers until its supervisor reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def signal_pid(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True
