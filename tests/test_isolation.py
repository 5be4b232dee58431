"""Issue 12 item 1: one tenant's slow OAuth2 token endpoint never stops another tenant.

Two providers (tenants A and B) whose token endpoints drip one byte a second, and a
healthy password provider of tenant C, in one `shardworker run` pod with two sync
threads.  Before the fix both sync threads sat in the token POSTs (a per-read timeout
never fires on a drip), C never logged in, and the drain ended in SIGKILL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from shardworker.db.providers import create_provider
from shardworker.db.store import open_pool
from shardworker.secrets.store import SecretStore, secret_name
from tests.drip_http import DripServer
from tests.pool_support import Cluster

pytestmark = pytest.mark.timeout(120)

# A healthy provider connects and enters IDLE in about a second on this machine.
NORMAL_CONNECT_S = 15.0


@pytest.fixture
def drips() -> Iterator[list[DripServer]]:
    servers = [DripServer(every_s=1.0), DripServer(every_s=1.0)]
    yield servers
    for server in servers:
        server.close()


def add_oauth_provider(c: Cluster, tenant: str, url: str) -> str:
    with open_pool(c.settings.database_url, max_size=1) as pool:
        pid = create_provider(
            pool, tenant=tenant, mailbox=f"slow-{tenant[:8]}@example.com", host="127.0.0.1",
            port=c.dovecot.plain_port, secure=False, allow_starttls=False, auth_type="oauth2",
            username="nobody", oauth_token_url=url, oauth_client_id="client",
        )  # fmt: skip
        SecretStore(c.settings, pool).put(
            tenant, pid, secret_name("refresh_token", pid), "rt-" + uuid.uuid4().hex
        )
    return pid


def status(c: Cluster, pid: str) -> str | None:
    with psycopg.connect(c.settings.database_url) as conn:
        row = conn.execute(
            "SELECT status FROM email_providers WHERE id = %s::uuid", (pid,)
        ).fetchone()
    return None if row is None else str(row[0])


def test_slow_token_endpoints_of_two_tenants_do_not_stop_a_third(
    fresh_dsn: str, redis_url: str, dovecot: Any, tmp_dir: Path, drips: list[DripServer]
) -> None:
    c = Cluster(fresh_dsn, redis_url, dovecot, tmp_dir, 0, workers="1", sync_threads="2",
                connect_timeout_s="5", drain_deadline_s="8")  # fmt: skip
    try:
        for server in drips:
            add_oauth_provider(c, str(uuid.uuid4()), server.url)
        c._create_providers(1)  # tenant C's healthy password provider
        (healthy,) = c.users
        pod = c.start_pod("pod-a")
        # Both slow refreshes have started before the healthy provider is judged.
        c.wait(lambda: all(s.requests for s in drips), 30, "both token endpoints asked")
        spent = c.wait(
            lambda: status(c, healthy) == "connected" and c.sessions()[c.users[healthy]] == 1,
            NORMAL_CONNECT_S, "the healthy provider logged in and idling",
        )  # fmt: skip
        print(f"healthy provider connected {spent:.1f}s after both slow refreshes started")
        code = pod.terminate(timeout_s=30)
        assert code == 0
        drained = [line for line in pod.log_lines() if line.get("event") == "drain_finished"]
        assert drained and drained[-1]["killed"] == 0, drained
    finally:
        c.close()
