"""Admin operations across processes: two `shardworker run` pods (one worker each), the
admin API served by pod-a's coordinator, and each operation observed on the owner, on
whichever pod it runs: reconnect, resync to now, backfill, pause/resume, and password and
folder changes without a restart."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.admin_support import TOKEN, ApiClient, assert_no_secret, private_database
from tests.harness.dovecot import Dovecot
from tests.harness.net import free_port
from tests.pool_support import Cluster, Pod
from tests.support import events, make_mail, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

OLD_2020 = datetime(2020, 1, 2, 12, 0, tzinfo=UTC)


class AdminCluster:
    def __init__(self, cluster: Cluster, api: ApiClient) -> None:
        self.c = cluster
        self.api = api
        self.pids = list(cluster.users)
        self.old_mail: dict[str, list[str]] = {}
        self.used: set[str] = set()

    def owner(self, pid: str) -> str:
        return self.c.owners()[pid]

    def take(self, pod: str) -> str:
        """A provider no earlier test touched, owned by ``pod`` if one is left."""
        fresh = [p for p in self.pids if p not in self.used]
        mine = [p for p in fresh if self.owner(p).startswith(pod + "/")]
        pid = (mine or fresh)[0]
        self.used.add(pid)
        return pid

    def published(self, pid: str) -> list[str]:
        return [e["payload"]["emailData"]["id"] for e in events(self.c.redis)
                if e["payload"]["providerId"] == pid]  # fmt: skip

    def deliver(self, pid: str, tag: str, folder: str = "INBOX") -> str:
        mid = f"<{tag}-{uuid.uuid4().hex[:8]}@example.com>"
        raw = make_mail(message_id=mid).decode()
        # doveadm, not IMAP: works whatever the user's password is at the moment.
        self.c.dovecot.doveadm("save", "-u", self.c.users[pid], "-m", folder, input_text=raw)
        return mid

    def logins(self, pid: str) -> int:
        return self.c.dovecot.log_text().count(f"Login: user=<{self.c.users[pid]}>")

    def row(self, pid: str) -> dict[str, Any]:
        return dict(self.api.call("GET", f"/v1/providers/{pid}")[1])


def _append_old(dovecot: Dovecot, user: str) -> list[str]:
    """Mail that arrived before the first sync: one from 2020, two from today."""
    client = dovecot.connect(user)
    mids = []
    try:
        for when in (OLD_2020, None, None):
            mid = f"<old-{uuid.uuid4().hex[:8]}@example.com>"
            client.append("INBOX", make_mail(message_id=mid), msg_time=when)
            mids.append(mid)
    finally:
        client.logout()
    return mids


@pytest.fixture(scope="module")
def admin(redis_server: str, dovecot: Dovecot, tmp_path_factory: Any) -> Iterator[AdminCluster]:
    url = f"{redis_server}/0"
    flush = redis.Redis.from_url(url)
    flush.flushdb()
    flush.close()
    tmp: Path = tmp_path_factory.mktemp("admin-pool")
    with private_database() as dsn:
        cluster = Cluster(dsn, url, dovecot, tmp, providers=6, workers="1",
                          metrics_addr="127.0.0.1:0")  # fmt: skip
        old = {pid: _append_old(dovecot, user) for pid, user in cluster.users.items()}
        port = free_port()
        with_api = replace(cluster.settings, admin_addr=f"127.0.0.1:{port}", admin_token=TOKEN)
        for name, settings in (("pod-a", with_api), ("pod-b", cluster.settings)):
            pod = Pod(name, settings, tmp / f"{name}.log")
            cluster.pods[name] = pod
            pod.start()
        try:
            cluster.wait(lambda: cluster.all_served({"pod-a", "pod-b"}), 60, "all served")
            cluster.wait(lambda: {m.split("/")[0] for m in cluster.owners().values()}
                         == {"pod-a", "pod-b"}, 30, "both pods own providers")  # fmt: skip
            # And the leases have followed the assignment: a command sent while a provider
            # is still moving would meet its first login and be counted twice.
            cluster.wait(lambda: cluster.leases() == cluster.owners() and cluster.all_served(),
                         30, "leases follow the assignment")  # fmt: skip
            made = AdminCluster(cluster, ApiClient(port))
            made.old_mail = old
            yield made
        finally:
            cluster.close()


def test_reconnect_reaches_the_owner_on_either_pod(admin: AdminCluster) -> None:
    for pod in ("pod-a", "pod-b"):
        pid = admin.take(pod)
        before = admin.logins(pid)
        status, done = admin.api.call("POST", f"/v1/providers/{pid}/reconnect", {"wait_s": 20})
        assert status == 200, done
        assert (done["state"], done["owner"]) == ("done", admin.owner(pid)), done
        wait_until(lambda pid=pid, before=before: admin.logins(pid) == before + 1, 30)
        wait_until(lambda pid=pid: admin.c.sessions()[admin.c.users[pid]] == 1, 30)
        sent = admin.deliver(pid, "after-reconnect")
        wait_until(lambda pid=pid, sent=sent: sent in admin.published(pid), 30)


def test_resync_to_now_publishes_nothing_again(admin: AdminCluster) -> None:
    pid = admin.take("pod-b")
    sent = [admin.deliver(pid, "before-resync") for _ in range(2)]
    wait_until(lambda: set(sent) <= set(admin.published(pid)), 30)
    status, done = admin.api.call("POST", f"/v1/providers/{pid}/resync", {"wait_s": 20})
    assert status == 200 and done["state"] == "done", done
    assert done["folders"] == {"INBOX": "done"} and done["owner"].startswith("pod-b/")
    uidnext = admin.c.dovecot.folder_status(admin.c.users[pid], "INBOX")["UIDNEXT"]
    assert admin.row(pid)["cursors"]["INBOX"]["last_uid"] == uidnext - 1
    after = admin.deliver(pid, "after-resync")
    wait_until(lambda: after in admin.published(pid), 30)
    time.sleep(0.5)
    assert sorted(admin.published(pid)) == sorted([*sent, after])
    assert not set(admin.old_mail[pid]) & set(admin.published(pid))


def test_backfill_publishes_only_older_mail_not_yet_published(admin: AdminCluster) -> None:
    pid = admin.take("pod-a")
    new = admin.deliver(pid, "new")
    wait_until(lambda: new in admin.published(pid), 30)
    since = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    status, done = admin.api.call("POST", f"/v1/providers/{pid}/resync",
                                  {"since": since, "wait_s": 30})  # fmt: skip
    assert status == 200 and done["state"] == "done", done
    # Candidates: the two recent old messages and the new one (already published).
    assert (done["total"], done["published"], done["duplicates"]) == (3, 2, 0), done
    old_2020, *recent = admin.old_mail[pid]
    wait_until(lambda: len(admin.published(pid)) == 3, 30)
    assert sorted(admin.published(pid)) == sorted([new, *recent])
    # Again: everything is in the ledger now, nothing is published twice.
    again = admin.api.call("POST", f"/v1/providers/{pid}/resync", {"since": since, "wait_s": 30})
    assert again[1]["state"] == "done" and again[1].get("published", 0) == 0, again
    assert sorted(admin.published(pid)) == sorted([new, *recent])
    assert old_2020 not in admin.published(pid)
    log = (admin.c.tmp / "pod-a.log").read_text() + (admin.c.tmp / "pod-b.log").read_text()
    assert "backfill_progress" in log


def test_pause_and_resume_reach_the_owner(admin: AdminCluster) -> None:
    pid = admin.take("pod-b")
    user = admin.c.users[pid]
    status, paused = admin.api.call("POST", f"/v1/providers/{pid}/pause", {"wait_s": 20})
    assert status == 200 and paused["drained"] is True, paused
    assert paused["provider"]["pause_reason"] == "manual"
    wait_until(lambda: admin.c.sessions()[user] == 0, 30)
    held = admin.deliver(pid, "while-paused")
    time.sleep(1.5)
    assert held not in admin.published(pid)
    status, resumed = admin.api.call("POST", f"/v1/providers/{pid}/resume", {"wait_s": 20})
    assert status == 200 and resumed["served"] is True, resumed
    wait_until(lambda: held in admin.published(pid), 30)
    time.sleep(0.5)
    assert admin.published(pid).count(held) == 1


def test_password_and_folder_changes_take_effect_without_restart(admin: AdminCluster) -> None:
    pid = admin.take("pod-a")
    user = admin.c.users[pid]
    admin.c.dovecot.create_folder(user, "Archive")
    pods_before = {name: pod.worker_pids() for name, pod in admin.c.pods.items()}
    new_password = "np-" + uuid.uuid4().hex
    passwd = admin.c.dovecot.layout.passwd_dir / user
    passwd.write_text(f"{user}:{{PLAIN}}{new_password}::::::\n")
    time.sleep(1.1)  # Dovecot re-reads a changed passwd-file at most once a second
    status, changed = admin.api.call("PATCH", f"/v1/providers/{pid}", {"password": new_password})
    assert status == 200 and changed["command"]["op"] == "reconnect", changed
    cid = changed["command"]["command_id"]
    wait_until(lambda: admin.api.call("GET", f"/v1/commands/{cid}")[1]["state"] == "done", 30)
    admin.c.dovecot.kick(user)  # a later reconnect must also use the new password
    sent = admin.deliver(pid, "new-password")
    wait_until(lambda: sent in admin.published(pid), 30)
    # A reconnect between the passwd change and the PATCH fails with the old password and
    # counts; the next successful login clears it, through the batched status writer.
    wait_until(lambda: admin.row(pid)["auth_failure_count"] == 0, 15)

    status, changed = admin.api.call("PATCH", f"/v1/providers/{pid}",
                                     {"folder_filters": ["INBOX", "Archive"]})  # fmt: skip
    assert status == 200, changed
    wait_until(lambda: "Archive" in admin.row(pid)["cursors"], 30)
    archived = admin.deliver(pid, "archived", folder="Archive")
    wait_until(lambda: archived in admin.published(pid), 30)
    assert {name: pod.worker_pids() for name, pod in admin.c.pods.items()} == pods_before

    secrets = [new_password, *(admin.c.dovecot.password(u) for u in admin.c.users.values())]
    logs = [(admin.c.tmp / f"{name}.log").read_bytes() for name in admin.c.pods]
    assert_no_secret([*admin.api.seen, *logs], secrets)
    with psycopg.connect(admin.c.settings.database_url) as conn:
        rows = conn.execute("SELECT count(*) FROM shardworker_ledger").fetchone()
    assert rows is not None and rows[0] > 0
