"""Helpers shared by the ingestion, pool and reliability tests.

``Rig`` wires one in-process worker engine to the real Dovecot, PostgreSQL and Redis of the
test session; ``make_mail`` builds RFC 5322 messages; ``events`` reads the workflow stream
back the way Alga's runtime does.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

import orjson
import psycopg
import redis

from shardworker import metrics
from shardworker.config import Settings, load_settings
from shardworker.db.providers import create_provider
from shardworker.db.store import ProviderConfig, open_pool
from shardworker.secrets.crypto import generate_key_setting
from shardworker.secrets.store import SecretStore, secret_name
from shardworker.sink import SINKS, SinkFactory
from shardworker.sink.base import Fence
from shardworker.worker import WorkerContext, build_worker

STREAM = "workflow:events:global"
TEST_KEYS = generate_key_setting("test1")


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(every_s)


def make_mail(
    *,
    subject: str = "hello",
    sender: str = "Alice Sender <alice@example.com>",
    to: str | None = "Bob <bob@example.com>",
    cc: str | None = None,
    text: str = "body text\n",
    html: str | None = None,
    message_id: str | None = "auto",
    attachments: Sequence[tuple[str, str, bytes]] = (),
    headers: Mapping[str, str] | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = sender
    if to is not None:
        msg["To"] = to
    if cc is not None:
        msg["Cc"] = cc
    msg["Date"] = format_datetime(datetime.now(UTC))
    if message_id == "auto":
        msg["Message-ID"] = make_msgid(domain="example.com")
    elif message_id is not None:
        msg["Message-ID"] = message_id
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for filename, ctype, data in attachments:
        maintype, subtype = ctype.split("/", 1)
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def events(client: redis.Redis, stream: str = STREAM) -> list[dict[str, Any]]:
    """Every entry of the stream as {'id', 'fields', 'payload'}."""
    out = []
    for entry_id, fields in client.xrange(stream):
        decoded = {k.decode(): v.decode() for k, v in fields.items()}
        out.append(
            {
                "id": entry_id.decode(),
                "fields": decoded,
                "payload": orjson.loads(decoded["payload_json"]),
            }
        )
    return out


def message_ids(client: redis.Redis) -> list[str]:
    return [e["payload"]["emailData"]["id"] for e in events(client)]


class Rig:
    """An in-process worker engine against the session's real servers."""

    def __init__(
        self, settings: Settings, dovecot: Any, sinks: Mapping[str, SinkFactory] = SINKS
    ) -> None:
        self.settings = settings
        self.dovecot = dovecot
        self.sinks = sinks
        self.pool = open_pool(settings.database_url, max_size=2)
        self.secrets = SecretStore(settings, self.pool)
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.tenant = str(uuid.uuid4())
        self.ctx: WorkerContext | None = None
        self.thread: threading.Thread | None = None

    def add_provider(
        self,
        user: str,
        password: str,
        *,
        folders: Sequence[str] = (),
        secure: bool = False,
        port: int | None = None,
        allow_starttls: bool = False,
        max_per_sync: int = 50,
    ) -> str:
        port = port or (self.dovecot.tls_port if secure else self.dovecot.plain_port)
        pid = create_provider(
            self.pool,
            tenant=self.tenant,
            mailbox=f"{user}@example.com",
            host="127.0.0.1",
            port=port,
            secure=secure,
            allow_starttls=allow_starttls,
            auth_type="password",
            username=user,
            folder_filters=tuple(folders),
            max_emails_per_sync=max_per_sync,
        )
        self.secrets.put(self.tenant, pid, secret_name("password", pid), password)
        return pid

    def providers(self) -> list[ProviderConfig]:
        assert self.ctx is not None
        return [
            p for p in self.ctx.store.load_providers() if p.tenant == self.tenant and not p.paused
        ]

    def start(self, fences: Mapping[str, Fence] | None = None) -> WorkerContext:
        self.ctx = build_worker(self.settings, sinks=self.sinks)
        self.thread = threading.Thread(
            target=self.ctx.engine.run, kwargs={"drain_deadline_s": 10}, daemon=True
        )
        self.thread.start()
        self.refresh(fences)
        return self.ctx

    def refresh(self, fences: Mapping[str, Fence] | None = None) -> None:
        """Serve this tenant's providers (fenced by ``tenant:provider_id`` when given)."""
        assert self.ctx is not None
        self.ctx.engine.update_providers(self.providers(), fences)

    def stop(self) -> None:
        if self.ctx is None:
            return
        self.ctx.engine.request_stop()
        assert self.thread is not None
        self.thread.join(30)
        assert not self.thread.is_alive(), "engine did not stop within 30 s"
        self.ctx.close()
        self.ctx = None

    def close(self) -> None:
        self.stop()
        # Later tests may run a worker over the whole database: leave nothing active behind.
        with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE email_providers SET is_active = false WHERE tenant = %s", (self.tenant,)
            )
        self.pool.close()
        self.redis.close()

    def row(self, pid: str) -> dict[str, Any]:
        with psycopg.connect(self.settings.database_url) as conn:
            cur = conn.execute(
                "SELECT p.*, c.folder_state, c.last_error, c.server_capabilities, c.last_uid, "
                "c.uid_validity FROM email_providers p JOIN imap_email_provider_config c "
                "ON c.email_provider_id = p.id AND c.tenant = p.tenant WHERE p.id = %s",
                (pid,),
            )
            names = [d.name for d in cur.description or ()]
            values = cur.fetchone()
            assert values is not None
            return dict(zip(names, values, strict=True))

    def ledger(self, pid: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.settings.database_url) as conn:
            return conn.execute(
                "SELECT folder, uid_validity, uid, message_id, stream_id, status FROM "
                "shardworker_ledger WHERE provider_id = %s ORDER BY folder, uid",
                (pid,),
            ).fetchall()


class WorkerProcess:
    """`shardworker run` as a real process, with these settings."""

    def __init__(self, settings: Settings, log_path: str) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shardworker", "run"],
                env=worker_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.proc

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def peak_rss_kib(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as status:
            lines = status.read().splitlines()
        for line in lines:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def rig_settings(dsn: str, redis_url: str, cafile: str, **overrides: str) -> Settings:
    env = {
        "SHARDWORKER_DATABASE_URL": dsn,
        "SHARDWORKER_REDIS_URL": redis_url,
        "SHARDWORKER_SECRET_KEYS": TEST_KEYS,
        "SHARDWORKER_TLS_CA_FILE": cafile,
        "SHARDWORKER_SECRET_READ_CHAIN": "db",
        "SHARDWORKER_BACKOFF_BASE_S": "0.2",
        "SHARDWORKER_BACKOFF_MAX_S": "2",
        "SHARDWORKER_AUTH_BACKOFF_BASE_S": "0.3",
        "SHARDWORKER_AUTH_BACKOFF_MAX_S": "1",
        "SHARDWORKER_NET_TIMEOUT_S": "5",
        "SHARDWORKER_CONNECT_TIMEOUT_S": "3",
        "SHARDWORKER_POLL_INTERVAL_S": "0.5",
        "SHARDWORKER_FOLDER_REPROBE_S": "1",
        "SHARDWORKER_SYNC_THREADS": "4",
        # Ingestion tests send thousands of mails from one sender; the rate guard's own
        # tests (test_loop_demo, test_providers_engine) set a limit.
        "SHARDWORKER_LOOP_RATE_LIMIT": "0",
        # Every `shardworker run` of a test listens for /metrics: an ephemeral port each.
        "SHARDWORKER_METRICS_ADDR": "127.0.0.1:0",
    }
    env.update({f"SHARDWORKER_{k.upper()}": v for k, v in overrides.items()})
    return load_settings(env)


@contextmanager
def rig(settings: Settings, dovecot: Any) -> Iterator[Rig]:
    r = Rig(settings, dovecot)
    try:
        yield r
    finally:
        r.close()


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment for a `shardworker run` subprocess with these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDWORKER_")}
    for name, value in vars(settings).items():
        text = ",".join(value) if isinstance(value, tuple) else str(value)
        env[f"SHARDWORKER_{name.upper()}"] = text.lower() if isinstance(value, bool) else text
    return env


__all__ = [
    "Rig",
    "base64",
    "events",
    "make_mail",
    "message_ids",
    "replace",
    "rig",
    "rig_settings",
    "wait_until",
    "worker_env",
]


def counter(name: str, labels: Mapping[str, str] | None = None) -> float:
    """A counter's value in this process's exposition (0 when absent)."""
    text = metrics.render().decode()
    inner = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
    wanted = f"{name}_total{{{inner}}}" if inner else f"{name}_total"
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
