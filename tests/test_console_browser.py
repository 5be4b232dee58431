"""The console in a real browser: Debian's chromium, driven by the Python playwright
package (its bundled driver; no browser download), against a live pool (`shardworker run`)
on the real Dovecot, PostgreSQL and Redis.

Log in, see the providers, add one with a failing and then a passing connection test,
watch a message arrive, pause and resume, backfill with live progress, replay a dead
letter, log out; a forged CSRF token and an expired session are refused.  A screenshot of
each page goes to ``build/console-screenshots/`` (git-ignored).
"""

from __future__ import annotations

import shutil
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
from playwright.sync_api import Browser, Page, expect, sync_playwright

from shardworker.admin.api import AdminApi
from shardworker.admin.service import AdminService
from shardworker.db.store import open_pool
from shardworker.sink.base import DeadLetter
from shardworker.sink.redis_streams import WORKFLOW_STREAM, RedisStreamsSink
from tests.admin_support import TOKEN, private_database
from tests.harness.dovecot import Dovecot
from tests.harness.net import free_port
from tests.pool_support import Cluster, Pod
from tests.support import make_mail

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "build" / "console-screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def live(redis_server: str, dovecot: Dovecot, tmp_path_factory: Any) -> Iterator[dict[str, Any]]:
    url = f"{redis_server}/0"
    flush = redis.Redis.from_url(url)
    flush.flushdb()
    flush.close()
    tmp: Path = tmp_path_factory.mktemp("console-browser")
    with private_database() as dsn:
        cluster = Cluster(dsn, url, dovecot, tmp, providers=2, workers="1")
        port = free_port()
        settings = replace(cluster.settings, admin_addr=f"127.0.0.1:{port}", admin_token=TOKEN)
        pod = Pod("pod-a", settings, tmp / "pod-a.log")
        cluster.pods["pod-a"] = pod
        pod.start()
        try:
            cluster.wait(lambda: cluster.all_served({"pod-a"}), 60, "both providers served")
            yield {"cluster": cluster, "settings": settings, "base": f"http://127.0.0.1:{port}"}
        finally:
            cluster.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert shutil.which("chromium") or Path(CHROMIUM).exists(), (
        "chromium is missing: run scripts/install-browser.sh"
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def log_in(page: Page, base: str, token: str = TOKEN) -> None:
    page.goto(base + "/console/login")
    page.fill("#token", token)
    page.click("#login")


def reload_until(page: Page, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in page.content():
        assert time.monotonic() < deadline, f"{text!r} did not appear on {page.url}"
        time.sleep(0.5)
        page.reload()


def append_old(dovecot: Dovecot, user: str, count: int) -> None:
    client = dovecot.connect(user)
    try:
        for _ in range(count):
            when = datetime.now(UTC) - timedelta(hours=2)
            mid = f"<old-{uuid.uuid4().hex[:8]}@example.com>"
            client.append("INBOX", make_mail(message_id=mid), msg_time=when)
    finally:
        client.logout()


def test_console_in_a_real_browser(live: dict[str, Any], browser: Browser) -> None:
    cluster, base = live["cluster"], live["base"]
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    # -- log in: a wrong token first -------------------------------------------------------
    log_in(page, base, "wrong-token")
    expect(page.locator("#login-error")).to_have_text("The token was not accepted.")
    shot(page, "01-login-refused")
    log_in(page, base)
    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator("#members")).to_contain_text("pod-a/0")
    shot(page, "02-overview")

    # -- the live figures change without a reload --------------------------------------------
    total = page.locator('[data-live="providers.total"]')
    expect(total).to_have_text("2")
    dovecot: Dovecot = cluster.dovecot
    user = dovecot.add_user()
    append_old(dovecot, user.name, 3)  # mail from before the provider exists: for the backfill

    # -- the providers -----------------------------------------------------------------------
    page.click("nav >> text=Providers")
    expect(page.locator("#providers tbody tr")).to_have_count(2)
    shot(page, "03-providers")

    # -- add a provider: the connection test fails, then passes --------------------------------
    page.click("nav >> text=Add provider")
    page.fill("#f-tenant", cluster.tenant)
    page.fill("#f-mailbox", f"{user.name}@example.com")
    page.fill("#f-host", "127.0.0.1")
    page.fill("#f-port", str(dovecot.plain_port))
    page.select_option("#f-tls", "plain")
    page.fill("#f-username", user.name)
    page.fill("#f-password", "wrong-" + uuid.uuid4().hex)
    page.click("#save")
    expect(page.locator("#test-result")).to_contain_text("auth_failed")
    expect(page.locator("#f-password")).to_have_value("")
    shot(page, "04-add-test-failed")
    page.fill("#f-password", user.password)
    page.click("#save")
    expect(page.locator(".flash")).to_contain_text("Saved: the connection test passed.")
    detail_url = page.url
    pid = detail_url.rstrip("/").rsplit("/", 1)[1]
    reload_until(page, "pod-a/0")  # the leader assigned it and a worker serves it
    shot(page, "05-provider-added")

    # -- back on the overview, the figure moved by itself ---------------------------------------
    page.click("nav >> text=Overview")
    expect(total).to_have_text("3", timeout=10_000)

    # -- watch a message arrive ---------------------------------------------------------------
    page.goto(detail_url)
    cluster.wait(lambda: pid in cluster.leases(), 30, "the new provider's lease")
    mid = f"<arrive-{uuid.uuid4().hex[:8]}@example.com>"
    dovecot.doveadm("save", "-u", user.name, "-m", "INBOX",
                    input_text=make_mail(message_id=mid).decode())  # fmt: skip
    reload_until(page, mid.strip("<>"))  # the page shows it HTML-escaped
    expect(page.locator("#ledger")).to_contain_text("published")
    shot(page, "06-message-arrived")

    # -- pause and resume ------------------------------------------------------------------------
    page.click("#do-pause")
    expect(page.locator(".flash")).to_have_text("Paused.")
    expect(page.locator("#provider-status")).to_contain_text("paused (manual)")
    shot(page, "07-paused")
    cluster.wait(lambda: pid not in cluster.leases(), 30, "the paused provider drained")
    page.click("#do-resume")
    expect(page.locator(".flash")).to_have_text("Resumed.")
    cluster.wait(lambda: pid in cluster.leases(), 30, "the resumed provider served again")
    reload_until(page, "pod-a/0")

    # -- reconnect and resync to now, each followed live to its end ----------------------------
    for button, label in (("#do-reconnect", "Reconnect"), ("#do-resync", "Resync to now")):
        page.click(button)
        expect(page.locator(".flash")).to_contain_text(f"{label} queued on pod-a/0")
        expect(page.locator("#command")).to_have_attribute("data-state", "done", timeout=30_000)

    # -- backfill with live progress ---------------------------------------------------------
    since = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    page.fill("#since", since)
    page.click("#do-backfill")
    expect(page.locator("#command")).to_have_attribute("data-state", "done", timeout=30_000)
    expect(page.locator("#command-progress")).to_contain_text("published 3")
    shot(page, "08-backfill-done")

    # -- a real poison message, and a replay -------------------------------------------------
    client = dovecot.connect(user.name)
    try:
        client.append("INBOX", b"\r\n")  # empty: the parser refuses it
    finally:
        client.logout()
    page.click("nav >> text=Dead letters")
    reload_until(page, "empty message")
    page.locator("#dead-letters .replay").first.click()
    expect(page.locator(".flash")).to_contain_text("still does not parse")
    fixed = _fixed_dead_letter(live, pid)
    page.reload()
    row = page.locator("#dead-letters tr", has_text=fixed)
    row.locator(".replay").click()
    expect(page.locator(".flash")).to_contain_text(f"Replayed {fixed}: published")
    expect(page.locator("#dead-letters tr", has_text=fixed)).to_contain_text("replayed")
    shot(page, "09-dead-letters")
    assert _events_with(cluster, "<fixed-") == 1

    # -- a forged CSRF token is refused ------------------------------------------------------------
    page.goto(detail_url)
    page.evaluate("document.querySelectorAll('input[name=csrf]').forEach(e => e.value = 'forged')")
    page.click("#do-pause")
    expect(page.locator("#message")).to_contain_text("CSRF check failed")
    shot(page, "10-csrf-refused")
    page.goto(detail_url)
    expect(page.locator("#provider-status")).not_to_contain_text("paused")

    # -- log out ---------------------------------------------------------------------------------
    page.click("#logout")
    expect(page.locator("h1")).to_have_text("Log in")
    page.goto(base + "/console/providers")
    expect(page.locator("h1")).to_have_text("Log in")
    shot(page, "11-logged-out")
    context.close()
    assert not [e for e in errors if "Content Security Policy" in e], errors


def _fixed_dead_letter(live: dict[str, Any], pid: str) -> str:
    """A dead letter whose raw message parses today (as after a parser fix), recorded in
    the stream and the ledger as the engine records one."""
    settings, tenant = live["settings"], live["cluster"].tenant
    client = redis.Redis.from_url(settings.redis_url)
    try:
        raw = make_mail(message_id=f"<fixed-{uuid.uuid4().hex[:8]}@example.com>")
        entry = RedisStreamsSink(client, settings).dead_letter(
            DeadLetter(
                tenant=tenant,
                provider_id=pid,
                folder="INBOX",
                uid_validity=1,
                uid=999_999,
                message_id=None,
                reason="parse_error: before the fix",
                raw=raw,
            ),
            None,
        )
    finally:
        client.close()
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "INSERT INTO shardworker_ledger (tenant, provider_id, folder, uid_validity, uid, "
            "message_id, status, reason) VALUES (%s, %s, 'INBOX', 1, 999999, 'uid:999999', "
            "'dead_lettered', 'parse_error: before the fix')", (tenant, pid),
        )  # fmt: skip
    return entry


def _events_with(cluster: Cluster, marker: str) -> int:
    return sum(marker.encode() in fields[b"payload_json"]
               for _, fields in cluster.redis.xrange(WORKFLOW_STREAM))  # fmt: skip


def test_an_expired_session_is_refused_in_the_browser(
    live: dict[str, Any], browser: Browser
) -> None:
    """A second admin listener on the same pool, its sessions ending after 2 s idle."""
    settings = replace(live["settings"], admin_addr="127.0.0.1:0")
    pool = open_pool(settings.database_url, max_size=2)
    client = redis.Redis.from_url(settings.redis_url)
    api = AdminApi(settings, AdminService(settings, pool, client))
    api.console.sessions.idle_s = 2.0
    api.start()
    context = browser.new_context()
    try:
        page = context.new_page()
        base = f"http://127.0.0.1:{api.port}"
        log_in(page, base)
        expect(page.locator("h1")).to_have_text("Overview")
        page.click("nav >> text=Providers")
        page.locator("#providers a").first.click()
        expect(page.locator("#do-pause")).to_be_visible()
        time.sleep(2.5)
        page.click("#do-pause")
        expect(page.locator("h1")).to_have_text("Log in")
        shot(page, "12-session-expired")
    finally:
        context.close()
        api.close()
        pool.close()
        client.close()
    # The pause never happened.
    states = [p["paused"] for p in AdminServiceView(settings).list()]
    assert not any(states)


class AdminServiceView:
    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def list(self) -> list[dict[str, Any]]:
        with open_pool(self.settings.database_url, max_size=1) as pool:
            client = redis.Redis.from_url(self.settings.redis_url)
            try:
                return AdminService(self.settings, pool, client).list()
            finally:
                client.close()
