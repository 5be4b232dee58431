"""The demo behind `make demo` (see scripts/demo.sh).

Uses a private Dovecot on free ports, a fresh `shardworker_demo` database on the local
PostgreSQL and DB 15 of the local Redis, so it touches nothing else.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import psycopg
import redis

from shardworker.config import load_settings
from shardworker.db.migrate import migrate
from shardworker.db.providers import create_provider
from shardworker.db.store import open_pool
from shardworker.secrets.crypto import generate_key_setting
from shardworker.secrets.store import SecretStore, secret_name
from tests.harness.dovecot import Dovecot
from tests.support import make_mail, worker_env

ADMIN_DSN = "postgresql://127.0.0.1:5432/postgres"
DSN = "postgresql://127.0.0.1:5432/shardworker_demo"
REDIS_URL = "redis://127.0.0.1:6379/15"
# The pool's /metrics, /healthz and /readyz while the demo runs (DEMO_METRICS_PORT overrides).
METRICS_PORT = int(os.environ.get("DEMO_METRICS_PORT", "9464"))
METRICS_URL = f"http://127.0.0.1:{METRICS_PORT}"
TENANT = "11111111-2222-4333-8444-555555555555"
SUBJECTS = [
    "Printer on fire",
    "VPN down again",
    "Invoice #4711",
    "Re: onboarding",
    "Grüße aus München",
    "Password reset",
    "Server room too hot",
]


def fresh_database() -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS shardworker_demo WITH (FORCE)")
        conn.execute("CREATE DATABASE shardworker_demo")
    migrate(DSN)


def register(dovecot: Dovecot, env: dict[str, str]) -> list[tuple[str, str]]:
    settings = load_settings(env)
    mailboxes = []
    with open_pool(DSN, max_size=2) as pool:
        secrets = SecretStore(settings, pool)
        for name in ("helpdesk", "billing", "ops"):
            user, password = dovecot.add_user(name)
            pid = create_provider(
                pool, tenant=TENANT, mailbox=f"{user}@demo.example", host="127.0.0.1",
                port=dovecot.tls_port, secure=True, allow_starttls=False, auth_type="password",
                username=user, provider_name=f"Demo {name}",
            )  # fmt: skip
            secrets.put(TENANT, pid, secret_name("password", pid), password)
            mailboxes.append((user, pid))
            print(f"  provider {pid}  mailbox {user}@demo.example  (IMAP over TLS)")
    return mailboxes


def wait_connected(count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(DSN) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM email_providers WHERE status = 'connected'"
            ).fetchone()
            if row and row[0] == count:
                return
            time.sleep(0.2)
    raise SystemExit("demo: the providers did not connect; see .dev/demo-worker.log")


def show(entry_id: bytes, fields: dict[bytes, bytes], sent_at: float) -> None:
    data = orjson.loads(fields[b"payload_json"])["emailData"]
    to = ", ".join(a["email"] for a in data["to"])
    print(f"  event {entry_id.decode()}  {time.monotonic() - sent_at:5.3f}s after APPEND")
    print(f"    subject: {data['subject']!r}  from: {data['from']['email']}  to: {to}")
    print(f"    id: {data['id']}  attachments: {len(data.get('attachments', []))}")


def deliver(dovecot: Dovecot, mailboxes: list[tuple[str, str]], r: redis.Redis, n: int) -> None:
    last = "$"
    for i in range(n):
        user, _ = random.choice(mailboxes)
        attachments = [("notes.txt", "text/plain", b"demo attachment\n")] if i % 3 == 0 else []
        raw = make_mail(
            subject=random.choice(SUBJECTS),
            to=f"{user}@demo.example",
            sender="Customer <customer@example.org>",
            html="<p>Hello!</p>",
            attachments=attachments,
        )
        sent_at = time.monotonic()
        dovecot.append(user, "INBOX", raw)
        print(f"APPEND to {user}: {len(raw)} bytes")
        got = r.xread({"workflow:events:global": last}, count=1, block=10_000)
        if not got:
            raise SystemExit("demo: no event within 10 s; see .dev/demo-worker.log")
        for entry_id, fields in got[0][1]:
            show(entry_id, fields, sent_at)
            last = entry_id.decode()
        time.sleep(0.5)


def show_metrics() -> None:
    """A few lines of the pool's own /metrics, as Prometheus would scrape them."""
    with urllib.request.urlopen(f"{METRICS_URL}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = ('shardworker_messages_total{result="published"}', "shardworker_push_latency_seconds_",
              'shardworker_connections{state="idle"}', "shardworker_is_leader ")  # fmt: skip
    print(f"\ndemo: from {METRICS_URL}/metrics:")
    for line in text.splitlines():
        if line.startswith(wanted) and "_bucket" not in line:
            print(f"  {line}")


def main() -> int:
    print("demo: starting a private Dovecot, a fresh database and Redis DB 15 ...")
    fresh_database()
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    log_path = Path(".dev/demo-worker.log")
    log_path.parent.mkdir(exist_ok=True)
    with Dovecot() as dovecot:
        env = {
            "SHARDWORKER_DATABASE_URL": DSN,
            "SHARDWORKER_REDIS_URL": REDIS_URL,
            "SHARDWORKER_SECRET_KEYS": generate_key_setting("demo1"),
            "SHARDWORKER_TLS_CA_FILE": str(dovecot.cafile),
            "SHARDWORKER_WORKERS": "1",
            "SHARDWORKER_METRICS_ADDR": f"127.0.0.1:{METRICS_PORT}",
        }
        mailboxes = register(dovecot, env)
        worker_settings = load_settings(env)
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "shardworker", "run"],
                env=worker_env(worker_settings),
                stdout=log,
                stderr=log,
            )
        try:
            wait_connected(len(mailboxes))
            print(f"demo: metrics at {METRICS_URL}/metrics (probes: /healthz, /readyz)")
            print("demo: all mailboxes are IDLE; delivering mail\n")
            deliver(dovecot, mailboxes, r, n=int(sys.argv[1]) if len(sys.argv) > 1 else 8)
            show_metrics()
        finally:
            worker.terminate()
            worker.wait(30)
    print(f"\ndemo: done. Worker log: {log_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
