"""The console over HTTP against the real PostgreSQL, Redis and Dovecot: login (no hint,
rate limit), CSRF, session expiry, security headers on every page, no secret in any page,
validation errors beside the field, the connection test before saving, dead-letter
download and replay through the exactly-once path."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from shardworker.admin.api import AdminApi
from shardworker.admin.service import AdminService
from shardworker.admin.sessions import LoginLimiter, RedisLoginLimiter
from shardworker.config import Settings
from shardworker.db.store import open_pool
from shardworker.sink.base import DeadLetter
from shardworker.sink.redis_streams import WORKFLOW_STREAM, RedisStreamsSink
from tests.admin_support import TOKEN, ApiClient, assert_no_secret, captured_logs, private_database
from tests.console_support import ConsoleClient
from tests.harness.dovecot import Dovecot
from tests.support import make_mail, rig_settings

pytestmark = pytest.mark.timeout(90)

PASSWORD = "pw-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def settings(redis_server: str, dovecot: Dovecot) -> Iterator[Settings]:
    url = f"{redis_server}/0"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    with private_database() as dsn:
        yield rig_settings(dsn, url, str(dovecot.cafile), admin_addr="127.0.0.1:0",
                           admin_token=TOKEN)  # fmt: skip


@pytest.fixture(scope="module")
def logs() -> Iterator[io.StringIO]:
    with captured_logs() as stream:
        yield stream


@pytest.fixture(scope="module")
def server(settings: Settings, logs: io.StringIO) -> Iterator[AdminApi]:
    pool = open_pool(settings.database_url, max_size=4)
    client = redis.Redis.from_url(settings.redis_url)
    api = AdminApi(settings, AdminService(settings, pool, client))
    api.start()
    yield api
    api.close()
    pool.close()
    client.close()


@pytest.fixture
def console(server: AdminApi) -> ConsoleClient:
    server.console.limiter = LoginLimiter()
    browser = ConsoleClient(f"http://127.0.0.1:{server.port}")
    assert browser.login(TOKEN).status_code == 303
    return browser


@pytest.fixture
def api(server: AdminApi) -> ApiClient:
    return ApiClient(server.port)


def provider(api: ApiClient, **over: Any) -> dict[str, Any]:
    body = {"tenant": str(uuid.uuid4()), "mailbox": f"c{uuid.uuid4().hex[:8]}@example.com",
            "host": "imap.example.com", "port": 993, "username": "someone",
            "password": PASSWORD, **over}  # fmt: skip
    status, made = api.call("POST", "/v1/providers", body)
    assert status == 201, made
    return dict(made)


def test_login_gives_no_hint_and_is_rate_limited(server: AdminApi) -> None:
    server.console.limiter = RedisLoginLimiter(server.console.service.bus.client, per_client=3)
    browser = ConsoleClient(f"http://127.0.0.1:{server.port}")
    assert browser.get("/console/").headers["location"] == "/console/login"
    answers = [browser.login(token) for token in ("wrong", "", TOKEN + "x")]
    assert [a.status_code for a in answers] == [401, 401, 401]
    assert len({a.text.split('name="nonce"')[0] for a in answers}) == 1  # the same page
    assert "The token was not accepted." in answers[0].text
    limited = browser.login(TOKEN)  # even the right token waits out the window
    assert limited.status_code == 429
    server.console.limiter = LoginLimiter()
    ok = browser.login(TOKEN)
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie


def test_every_page_is_locked_down_and_shows_no_secret(
    console: ConsoleClient, api: ApiClient, logs: io.StringIO
) -> None:
    made = provider(api)
    here = f"/console/providers/{made['tenant']}/{made['provider_id']}"
    for path in ("/console/", "/console/providers", f"/console/providers?q={made['mailbox']}",
                 here, here + "/edit", here + "/remove", "/console/providers/new",
                 "/console/dead-letters", "/console/login"):  # fmt: skip
        page = console.get(path)
        assert page.status_code in (200, 303), (path, page.status_code)
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "'unsafe-inline'" not in csp
        assert page.headers["x-frame-options"] == "DENY"
    listed = console.get(f"/console/providers?q={made['mailbox']}")
    assert made["mailbox"] in listed.text and 'id="matches">1 matching' in listed.text
    assert console.get("/console/static/console.js").status_code == 200
    assert_no_secret([*console.seen, logs.getvalue()], [PASSWORD, TOKEN])


def test_state_changes_need_the_csrf_token(console: ConsoleClient, api: ApiClient) -> None:
    made = provider(api)
    action = f"/console/providers/{made['tenant']}/{made['provider_id']}/do/pause"
    for form in ({}, {"csrf": "forged"}):
        refused = console.post(action, form, csrf=False)
        assert refused.status_code == 403 and "CSRF" in refused.text
    assert api.call("GET", f"/v1/providers/{made['provider_id']}")[1]["paused"] is False
    done = console.follow(console.post(action))
    assert "Paused." in done.text
    assert api.call("GET", f"/v1/providers/{made['provider_id']}")[1]["paused"] is True
    assert console.post("/console/logout", csrf=False).status_code == 403  # logout too


def test_a_session_expires_and_logout_ends_it(server: AdminApi, api: ApiClient) -> None:
    made = provider(api)
    action = f"/console/providers/{made['tenant']}/{made['provider_id']}/do/pause"
    browser = ConsoleClient(f"http://127.0.0.1:{server.port}")
    server.console.limiter = LoginLimiter()
    browser.login(TOKEN)
    server.console.sessions.idle_s = 1.0
    try:
        assert browser.get("/console/live.json").status_code == 200
        time.sleep(1.3)
        assert browser.get("/console/").headers["location"] == "/console/login"
        assert browser.post(action).headers["location"] == "/console/login"
        assert browser.get("/console/live.json").status_code == 401
    finally:
        server.console.sessions.idle_s = 1800.0
    assert api.call("GET", f"/v1/providers/{made['provider_id']}")[1]["paused"] is False
    browser.login(TOKEN)
    assert browser.get("/console/").status_code == 200
    assert browser.follow(browser.post("/console/logout")).url.endswith("/console/login")
    assert browser.get("/console/").status_code == 303


def test_edit_shows_the_error_beside_the_field(console: ConsoleClient, api: ApiClient) -> None:
    made = provider(api)
    edit = f"/console/providers/{made['tenant']}/{made['provider_id']}/edit"
    form = {"mailbox": made["mailbox"], "host": "imap.example.com", "port": "70000",
            "username": "someone", "tls": "implicit", "folder_filters": "INBOX",
            "max_emails_per_sync": "50", "is_active": "on",
            "auto_process_emails": "on"}  # fmt: skip
    refused = console.post(edit, form)
    assert refused.status_code == 400
    assert 'id="error-port">port: must be between 1 and 65535' in refused.text
    refused = console.post(edit, {**form, "port": "993", "folder_filters": "INBOX\nINBOX"})
    assert 'id="error-folder_filters[1]"' in refused.text
    saved = console.follow(console.post(edit, {**form, "port": "143", "tls": "starttls"}))
    assert "Saved." in saved.text
    row = api.call("GET", f"/v1/providers/{made['provider_id']}")[1]
    assert (row["port"], row["secure"], row["allow_starttls"]) == (143, False, True)
    assert row["secrets"] == {"password": "stored"}  # a blank password leaves it


def test_add_tests_the_connection_before_saving(
    console: ConsoleClient, dovecot: Dovecot, settings: Settings
) -> None:
    user = dovecot.add_user()
    tenant = str(uuid.uuid4())
    form = {"tenant": tenant, "mailbox": f"{user.name}@example.com", "host": "127.0.0.1",
            "port": str(dovecot.tls_port), "tls": "implicit", "username": user.name,
            "password": "wrong-" + uuid.uuid4().hex, "folder_filters": "INBOX",
            "max_emails_per_sync": "50", "is_active": "on"}  # fmt: skip
    failed = console.post("/console/providers/new", form)
    assert failed.status_code == 400 and "auth_failed" in failed.text
    assert "Nothing was saved" in failed.text and form["password"] not in failed.text
    with psycopg.connect(settings.database_url) as conn:
        count = conn.execute("SELECT count(*) FROM email_providers WHERE tenant = %s",
                             (tenant,)).fetchone()  # fmt: skip
    assert count == (0,)
    saved = console.follow(console.post("/console/providers/new",
                                        {**form, "password": user.password}))  # fmt: skip
    assert "Saved: the connection test passed." in saved.text
    assert user.password not in saved.text
    tested = console.follow(console.post(saved.url.split(console.base)[1] + "/do/test"))
    assert "Connection test: ok" in tested.text


def _dead_letter(settings: Settings, made: dict[str, Any], raw: bytes) -> str:
    client = redis.Redis.from_url(settings.redis_url)
    entry = RedisStreamsSink(client, settings).dead_letter(
        DeadLetter(
            tenant=made["tenant"],
            provider_id=made["provider_id"],
            folder="INBOX",
            uid_validity=7,
            uid=5,
            message_id=None,
            reason="parse_error: test",
            raw=raw,
        ),
        None,
    )
    client.close()
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "INSERT INTO shardworker_ledger (tenant, provider_id, folder, uid_validity, uid, "
            "message_id, status, reason) VALUES (%s, %s, 'INBOX', 7, 5, 'uid:5', "
            "'dead_lettered', 'parse_error: test')", (made["tenant"], made["provider_id"]),
        )  # fmt: skip
    return entry


def _events_of(settings: Settings, pid: str) -> int:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return sum(pid.encode() in fields[b"payload_json"]
                   for _, fields in client.xrange(WORKFLOW_STREAM))  # fmt: skip
    finally:
        client.close()


def test_dead_letter_download_and_replay_exactly_once(
    console: ConsoleClient, api: ApiClient, settings: Settings
) -> None:
    made = provider(api)
    raw = make_mail(message_id=f"<dl-{uuid.uuid4().hex}@example.com>")
    entry = _dead_letter(settings, made, raw)
    listing = console.get("/console/dead-letters")
    assert entry in listing.text and "parse_error: test" in listing.text
    download = console.get(f"/console/dead-letters/{entry}/raw")
    assert download.content == raw and "attachment" in download.headers["content-disposition"]
    replayed = console.follow(console.post(f"/console/dead-letters/{entry}/replay"))
    assert f"Replayed {entry}: published" in replayed.text
    assert _events_of(settings, made["provider_id"]) == 1
    assert "replayed</span>" in replayed.text  # no second Replay button for it
    again = console.follow(console.post(f"/console/dead-letters/{entry}/replay"))
    assert "replayed already" in again.text
    assert _events_of(settings, made["provider_id"]) == 1
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("SELECT status, stream_id FROM shardworker_ledger WHERE "
                           "provider_id = %s", (made["provider_id"],)).fetchone()  # fmt: skip
    assert row is not None and row[0] == "published" and row[1]
    detail = console.get(f"/console/providers/{made['tenant']}/{made['provider_id']}")
    assert row[1] in detail.text  # the ledger row with its stream id


def test_remove_needs_the_mailbox_typed(console: ConsoleClient, api: ApiClient) -> None:
    made = provider(api)
    remove = f"/console/providers/{made['tenant']}/{made['provider_id']}/remove"
    assert console.post(remove, {"confirm": "nope"}).status_code == 400
    assert api.call("GET", f"/v1/providers/{made['provider_id']}")[0] == 200
    done = console.follow(console.post(remove, {"confirm": made["mailbox"]}))
    assert f"Removed {made['mailbox']}." in done.text
    assert api.call("GET", f"/v1/providers/{made['provider_id']}")[0] == 404


def test_a_session_holds_on_every_pod_and_survives_a_restart(
    server: AdminApi, settings: Settings, console: ConsoleClient
) -> None:
    """Sessions live in Redis: another pod's listener (or a restarted one) knows them."""
    pool = open_pool(settings.database_url, max_size=2)
    client = redis.Redis.from_url(settings.redis_url)
    other = AdminApi(settings, AdminService(settings, pool, client))
    other.start()
    try:
        elsewhere = ConsoleClient(f"http://127.0.0.1:{other.port}", http=console.http)
        assert elsewhere.get("/console/").status_code == 200
        assert elsewhere.follow(elsewhere.post("/console/logout", {"csrf": console.csrf}))
        assert console.get("/console/").status_code == 303  # logged out on the first pod too
        keys = client.keys("sw:console:session:*")
        assert all(console.csrf.encode() not in k for k in keys)
    finally:
        other.close()
        pool.close()
        client.close()


def test_hostile_ids_in_paths_and_queries_get_pages_not_errors(console: ConsoleClient) -> None:
    for path in ("/console/dead-letters/nope/raw", "/console/dead-letters?before=x)(",
                 "/console/providers/not-a-uuid/also-not", "/console/providers?after_tenant=zz"
                 "&after_mailbox=a", "/console/static/%2e%2e%2fconsole.py",
                 f"/console/providers/{uuid.uuid4()}/{uuid.uuid4()}?command=../live"):  # fmt: skip
        answer = console.get(path)
        assert answer.status_code in (200, 303, 400, 404), (path, answer.status_code)
        assert "Traceback" not in answer.text
    replay = console.post("/console/dead-letters/0-0/replay")
    assert console.follow(replay).status_code == 200
