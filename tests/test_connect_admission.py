"""The per-host admission caps connection attempts, not whole first cycles (issue 14).

A connect used to hold its host's admission slot through its cursor write and its whole
first drain: one mailbox with a slow backlog kept every other mailbox on that host from
even logging in.  Now the slot is freed once the connect has logged in and EXAMINEd.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from shardworker.db.store import Store
from tests.hostile_imap import HostileImap
from tests.support import Rig, make_mail, rig_settings, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileImap]:
    server = HostileImap().start()
    yield server
    server.close()


@pytest.fixture
def rig(migrated_dsn: str, redis_url: str, dovecot: Any) -> Iterator[Rig]:
    settings = rig_settings(migrated_dsn, redis_url, str(dovecot.cafile),
                            connect_concurrency_per_host="1")  # fmt: skip
    r = Rig(settings, dovecot)
    yield r
    r.close()


def connected(r: Rig, pid: str) -> bool:
    row = r.row(pid)
    return row["status"] == "connected" and bool(row["folder_state"])


def test_a_slow_first_drain_does_not_hold_the_hosts_admission(
    hostile: HostileImap, rig: Rig, dovecot: Any
) -> None:
    slow_user = f"driplit-{uuid.uuid4().hex[:8]}"  # its body FETCH drips for ~30 s
    hostile.deliver(slow_user, make_mail())
    slow = rig.add_provider(slow_user, "pw", port=hostile.port)
    # A backlog from UID 0 (as after an outage): the first cycle drains, slowly.
    Store(rig.pool).reseed_folder(rig.tenant, slow, "INBOX", 1000, 0, None)
    rig.start()
    box = hostile.mailbox(slow_user)
    wait_until(lambda: box.commands["UID"] >= 2, timeout_s=10)  # the body FETCH is dripping

    user, password = dovecot.add_user()
    fast = rig.add_provider(user, password)  # same host (127.0.0.1), admission cap 1
    started = time.monotonic()
    rig.refresh()
    wait_until(lambda: connected(rig, fast), timeout_s=3)
    assert time.monotonic() - started < 3
    assert box.idle_entered == [], "the slow mailbox's first cycle should still be draining"
