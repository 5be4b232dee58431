"""Provider management over the HTTP admin API and the CLI, against the real PostgreSQL,
Redis and Dovecot: happy paths, invalid input (the field named, nothing half-written),
authentication, the `test` classifications, and no secret in any answer or log line."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import orjson
import psycopg
import pytest
import redis

from shardworker.admin.api import MAX_BODY_BYTES, AdminApi
from shardworker.admin.service import AdminService
from shardworker.cli import main
from shardworker.config import Settings
from shardworker.db.store import open_pool
from shardworker.pool.inbox import CommandInbox, status_key
from shardworker.pool.registry import Assignment, Registry
from tests.admin_support import (
    TOKEN,
    ApiClient,
    assert_no_secret,
    captured_logs,
    private_database,
)
from tests.harness.dovecot import Dovecot
from tests.harness.net import free_port
from tests.support import rig_settings, worker_env

pytestmark = pytest.mark.timeout(60)

PASSWORD = "pw-" + uuid.uuid4().hex  # never a real user's: for rows the API only stores


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    with private_database() as made:
        yield made


@pytest.fixture(scope="module")
def settings(dsn: str, redis_server: str, dovecot: Dovecot) -> Settings:
    # DB 0 of the private server: the per-test redis_url fixture never hands it out, so
    # one API server can serve the whole module.
    url = f"{redis_server}/0"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return rig_settings(dsn, url, str(dovecot.cafile), admin_addr="127.0.0.1:0",
                        admin_token=TOKEN)  # fmt: skip


@pytest.fixture(scope="module")
def logs() -> Iterator[io.StringIO]:
    with captured_logs() as stream:
        yield stream


@pytest.fixture(scope="module")
def api(settings: Settings, logs: io.StringIO) -> Iterator[ApiClient]:
    pool = open_pool(settings.database_url, max_size=2)
    client = redis.Redis.from_url(settings.redis_url)
    server = AdminApi(settings, AdminService(settings, pool, client))
    server.start()
    yield ApiClient(server.port)
    server.close()
    pool.close()
    client.close()


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> Any:
    """Runs `shardworker ...` in-process; returns (exit code, parsed stdout, stderr)."""
    for name, value in worker_env(settings).items():
        if name.startswith("SHARDWORKER_"):
            monkeypatch.setenv(name, value)

    def run(*argv: str, stdin: str = "") -> tuple[int, Any, str]:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, orjson.loads(out) if out.strip() else None, err

    return run


def body(tenant: str, **over: Any) -> dict[str, Any]:
    made = {
        "tenant": tenant, "mailbox": f"m{uuid.uuid4().hex[:8]}@example.com",
        "host": "imap.example.com", "port": 993, "secure": True, "auth_type": "password",
        "username": "someone", "password": PASSWORD, "folder_filters": ["INBOX", "Sent"],
        "max_emails_per_sync": 20,
    }  # fmt: skip
    made.update(over)
    return {k: v for k, v in made.items() if v is not None}


def counts(dsn: str, tenant: str) -> tuple[int, int, int]:
    """(email_providers, imap configs, secrets) rows of the tenant."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM email_providers WHERE tenant = %(t)s), "
            "(SELECT count(*) FROM imap_email_provider_config WHERE tenant = %(t)s), "
            "(SELECT count(*) FROM shardworker_secrets WHERE tenant = %(t)s)",
            {"t": tenant},
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


# -- CRUD over the API ---------------------------------------------------------------------


def test_add_show_list_update_remove(api: ApiClient, dsn: str, logs: io.StringIO) -> None:
    tenant = str(uuid.uuid4())
    status, made = api.call("POST", "/v1/providers", body(tenant))
    assert status == 201, made
    pid = made["provider_id"]
    assert made["tenant"] == tenant and made["port"] == 993 and made["secure"] is True
    assert made["folder_filters"] == ["INBOX", "Sent"] and made["status"] == "configuring"
    assert made["secrets"] == {"password": "stored"} and made["owner"] is None
    assert counts(dsn, tenant) == (1, 1, 1)
    with psycopg.connect(dsn) as conn:
        [(envelope,)] = conn.execute(
            "SELECT envelope FROM shardworker_secrets WHERE tenant = %s", (tenant,)
        ).fetchall()
    assert envelope.startswith("sw1.") and PASSWORD not in envelope

    assert api.call("GET", f"/v1/providers/{pid}")[1]["mailbox"] == made["mailbox"]
    status, listed = api.call("GET", f"/v1/providers?tenant={tenant}")
    assert status == 200 and [p["provider_id"] for p in listed] == [pid]

    new_password = "pw-" + uuid.uuid4().hex
    status, changed = api.call("PATCH", f"/v1/providers/{pid}",
                               {"port": 143, "secure": False, "allow_starttls": True,
                                "folder_filters": ["INBOX"], "password": new_password})  # fmt: skip
    assert status == 200, changed
    provider = changed["provider"]
    assert (provider["port"], provider["secure"], provider["allow_starttls"]) == (143, False, True)
    assert provider["folder_filters"] == ["INBOX"]
    assert changed["command"] is None  # nobody serves it, so nothing to reconnect

    status, removed = api.call("DELETE", f"/v1/providers/{pid}")
    assert status == 200 and removed["removed"] is True and removed["secrets_deleted"] == 1
    assert counts(dsn, tenant) == (0, 0, 0)
    assert api.call("GET", f"/v1/providers/{pid}")[0] == 404
    assert_no_secret([*api.seen, logs.getvalue()], [PASSWORD, new_password])


INVALID = [
    ({"port": "993"}, "port"),
    ({"port": 0}, "port"),
    ({"port": 70000}, "port"),
    ({"port": True}, "port"),
    ({"host": "imaps://imap.example.com"}, "host"),
    ({"host": "imap.example.com:993"}, "host"),
    ({"host": ""}, "host"),
    ({"host": None}, "host"),
    ({"secure": "yes"}, "secure"),
    ({"allow_starttls": 1}, "allow_starttls"),
    ({"auth_type": "kerberos"}, "auth_type"),
    ({"username": ""}, "username"),
    ({"username": "a\r\nb"}, "username"),
    ({"folder_filters": "INBOX"}, "folder_filters"),
    ({"folder_filters": ["INBOX", "INBOX"]}, "folder_filters[1]"),
    ({"folder_filters": ["ok", "bad\nname"]}, "folder_filters[1]"),
    ({"folder_filters": ["x"] * 51}, "folder_filters"),
    ({"mailbox": "not-an-address"}, "mailbox"),
    ({"max_emails_per_sync": 0}, "max_emails_per_sync"),
    ({"max_emails_per_sync": 5000}, "max_emails_per_sync"),
    ({"connection_timeout_ms": 5}, "connection_timeout_ms"),
    ({"colour": "blue"}, "colour"),
    ({"password": ""}, "password"),
    ({"refresh_token": "rt"}, "refresh_token"),
    ({"auth_type": "oauth2", "password": None}, "oauth_token_url"),
    ({"auth_type": "oauth2", "password": None, "oauth_token_url": "http://idp.example.com/t",
      "oauth_client_id": "c"}, "oauth_token_url"),
    ({"auth_type": "oauth2", "oauth_token_url": "https://idp.example.com/t",
      "oauth_client_id": "c"}, "password"),
    ({"token_expires_at": "tomorrow"}, "token_expires_at"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "field"), INVALID, ids=[f for _, f in INVALID])
def test_invalid_add_names_the_field_and_writes_nothing(
    api: ApiClient, dsn: str, change: dict[str, Any], field: str
) -> None:
    tenant = str(uuid.uuid4())
    status, answer = api.call("POST", "/v1/providers", {**body(tenant), **change})
    assert status == 400, answer
    assert answer["field"] == field and answer["message"].startswith(f"{field}: ")
    assert counts(dsn, tenant) == (0, 0, 0)


def test_invalid_tenant_and_missing_fields(api: ApiClient) -> None:
    assert api.call("POST", "/v1/providers", body("not-a-uuid"))[1]["field"] == "tenant"
    for missing in ("tenant", "mailbox", "host", "port", "username"):
        made = body(str(uuid.uuid4()))
        del made[missing]
        status, answer = api.call("POST", "/v1/providers", made)
        assert (status, answer["field"]) == (400, missing)
    assert api.call("POST", "/v1/providers", ["a", "list"])[1]["field"] == "body"


def test_duplicate_mailbox_is_refused_and_its_secret_not_kept(api: ApiClient, dsn: str) -> None:
    tenant = str(uuid.uuid4())
    first = body(tenant)
    assert api.call("POST", "/v1/providers", first)[0] == 201
    status, answer = api.call(
        "POST", "/v1/providers", {**body(tenant), "mailbox": first["mailbox"]}
    )
    assert (status, answer["field"]) == (400, "mailbox")
    assert counts(dsn, tenant) == (1, 1, 1)


def test_secret_write_failure_rolls_the_provider_back(
    dsn: str, redis_url: str, dovecot: Dovecot
) -> None:
    """No encryption key: the secret cannot be written, so neither are the rows."""
    keyless = replace(rig_settings(dsn, redis_url, str(dovecot.cafile)), secret_keys="")
    tenant = str(uuid.uuid4())
    with open_pool(dsn, max_size=1) as pool:
        client = redis.Redis.from_url(redis_url)
        service = AdminService(keyless, pool, client)
        with pytest.raises(Exception, match="no encryption key"):
            service.add(body(tenant))
        client.close()
    assert counts(dsn, tenant) == (0, 0, 0)


def test_invalid_update_changes_nothing(api: ApiClient, dsn: str) -> None:
    tenant = str(uuid.uuid4())
    pid = api.call("POST", "/v1/providers", body(tenant))[1]["provider_id"]
    before = api.call("GET", f"/v1/providers/{pid}")[1]
    for patch, field in [
        ({"port": "x"}, "port"),
        ({"tenant": str(uuid.uuid4())}, "tenant"),
        ({"auth_type": "oauth2"}, "oauth_token_url"),
        ({"host": "ok.example.com", "folder_filters": [""]}, "folder_filters[0]"),
        ({}, "body"),
    ]:
        status, answer = api.call("PATCH", f"/v1/providers/{pid}", patch)
        assert (status, answer["field"]) == (400, field), answer
    assert api.call("GET", f"/v1/providers/{pid}")[1] == before
    assert api.call("PATCH", f"/v1/providers/{uuid.uuid4()}", {"port": 1})[0] == 404


def test_switching_to_oauth2_replaces_the_password(api: ApiClient, dsn: str) -> None:
    tenant = str(uuid.uuid4())
    pid = api.call("POST", "/v1/providers", body(tenant))[1]["provider_id"]
    status, changed = api.call("PATCH", f"/v1/providers/{pid}", {
        "auth_type": "oauth2", "oauth_token_url": "https://login.example.com/token",
        "oauth_client_id": "client-1", "oauth_client_secret": "cs-" + uuid.uuid4().hex,
        "refresh_token": "rt-" + uuid.uuid4().hex,
    })  # fmt: skip
    assert status == 200, changed
    assert changed["provider"]["secrets"] == {
        "oauth_client_secret": "stored", "refresh_token": "stored", "access_token": "external"
    }  # fmt: skip
    assert counts(dsn, tenant) == (1, 1, 2)  # the password is gone


def test_pause_and_resume_write_alga_columns(api: ApiClient, dsn: str) -> None:
    tenant = str(uuid.uuid4())
    pid = api.call("POST", "/v1/providers", body(tenant))[1]["provider_id"]
    status, paused = api.call("POST", f"/v1/providers/{pid}/pause", {})
    assert status == 200
    assert (paused["provider"]["paused"], paused["provider"]["pause_reason"]) == (True, "manual")
    status, resumed = api.call("POST", f"/v1/providers/{pid}/resume")
    assert (status, resumed["provider"]["paused"], resumed["provider"]["pause_reason"]) == (
        200, False, None,
    )  # fmt: skip
    assert api.call("POST", f"/v1/providers/{pid}/pause", {"wait_s": "x"})[1]["field"] == "wait_s"


def test_commands_need_an_owner(api: ApiClient) -> None:
    pid = api.call("POST", "/v1/providers", body(str(uuid.uuid4())))[1]["provider_id"]
    status, answer = api.call("POST", f"/v1/providers/{pid}/reconnect")
    assert status == 409 and "not served by any worker" in answer["message"]
    status, answer = api.call("POST", f"/v1/providers/{pid}/resync", {"since": "2999-01-01"})
    assert (status, answer["field"]) == (400, "since")
    status, answer = api.call("POST", f"/v1/providers/{pid}/resync", {"folder": 7})
    assert (status, answer["field"]) == (400, "folder")
    assert api.call("GET", f"/v1/commands/{uuid.uuid4().hex}")[0] == 404


def test_a_command_for_a_provider_we_do_not_hold_is_rejected(redis_url: str) -> None:
    class NotMine:
        def holds(self, provider_id: str) -> bool:
            return False

        def invalidate_configs(self) -> None:
            raise AssertionError("must not be called")

    import time

    client = redis.Redis.from_url(redis_url)
    inbox = CommandInbox(client, None, None, "pod-x/0", owner=NotMine())  # type: ignore[arg-type]
    inbox.handle(
        {
            "command_id": "c" * 32,
            "op": "reconnect",
            "tenant": str(uuid.uuid4()),
            "provider_id": str(uuid.uuid4()),
            "args": {},
            "created_at": time.time(),
        }
    )
    inbox.handle(
        {
            "command_id": "d" * 32,
            "op": "reconnect",
            "tenant": str(uuid.uuid4()),
            "provider_id": str(uuid.uuid4()),
            "args": {},
            "created_at": time.time() - 900,
        }
    )
    assert client.hget(status_key("c" * 32), "state") == b"rejected"
    assert client.hget(status_key("c" * 32), "detail") == b"not_owner"
    assert client.hget(status_key("d" * 32), "state") == b"expired"
    client.close()


class _Worker:
    """The small interfaces a command inbox uses, faked: lease ownership, store, engine."""

    def __init__(self) -> None:
        self.mine = False
        self.reconnects: list[str] = []

    def holds(self, provider_id: str) -> bool:
        return self.mine

    def invalidate_configs(self) -> None:
        pass

    def load_provider(self, tenant: str, provider_id: str) -> None:
        return None

    def reconnect_provider(self, provider_id: str, config: Any, on_done: Any) -> None:
        self.reconnects.append(provider_id)
        on_done(True)


def test_wait_resends_a_rejected_command_and_always_ends(redis_url: str) -> None:
    import threading
    import time

    from shardworker.admin.commands import CommandBus

    client = redis.Redis.from_url(redis_url)
    pid, tenant = str(uuid.uuid4()), str(uuid.uuid4())
    registry = Registry(client)
    token = registry.elect("test-leader", 5.0, None)
    assert token is not None
    registry.publish(token, Assignment(1, 1, {f"{tenant}:{pid}": "m/0"}), ["m/0"], [])
    worker = _Worker()
    inbox = CommandInbox(client, worker, worker, "m/0", owner=worker)  # type: ignore[arg-type]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if inbox.serve(0.05) and not worker.mine:
                worker.mine = True  # the lease follows the assignment a moment later

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    bus = CommandBus(client)
    try:
        done = bus.wait(bus.send(tenant, pid, "reconnect", {})["command_id"], 10)
        assert (done["state"], done["attempts"]) == ("done", 2)
        assert worker.reconnects == [f"{tenant}:{pid}"]
        inbox.owner = _Never()  # a lease that never follows: wait still ends
        started = time.monotonic()
        stuck = bus.wait(bus.send(tenant, pid, "reconnect", {})["command_id"], 1.5)
        assert stuck["state"] in ("rejected", "queued") and time.monotonic() - started < 5
    finally:
        stop.set()
        thread.join(5)
        client.close()


class _Never(_Worker):
    def holds(self, provider_id: str) -> bool:
        return False


# -- HTTP details ----------------------------------------------------------------------------


def test_missing_or_wrong_token_gets_a_bare_401(api: ApiClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):  # fmt: skip
        status, data, response = api.raw("GET", "/v1/providers", headers=headers)
        assert (status, orjson.loads(data)) == (401, {"error": "unauthorized"})
        assert response.getheader("WWW-Authenticate") == "Bearer"
    # Unauthenticated requests learn nothing, not even which paths exist.
    assert api.raw("GET", "/nope")[0] == 401


def test_body_limit_routes_and_bad_json(api: ApiClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    big = b"{" + b" " * (MAX_BODY_BYTES + 10) + b"}"
    assert api.raw("POST", "/v1/providers", big, auth)[0] == 413
    status, data, _ = api.raw("POST", "/v1/providers", b"{not json", auth)
    assert status == 400 and orjson.loads(data)["field"] == "body"
    assert api.call("GET", "/v1/nothing")[0] == 404
    assert api.call("PUT", "/v1/providers")[0] == 405
    assert api.call("DELETE", "/v1/providers")[0] == 405
    assert api.call("GET", "/v1/providers/not-a-uuid")[0] == 404


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_commands(cli: Any, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = str(uuid.uuid4())
    monkeypatch.setenv("NEW_PW", PASSWORD)
    code, made, _ = cli("providers", "add", "--tenant", tenant, "--mailbox", "cli@example.com",
                        "--host", "imap.example.com", "--port", "143", "--tls", "starttls",
                        "--username", "cli", "--folder", "INBOX", "--folder", "Archive",
                        "--password-env", "NEW_PW")  # fmt: skip
    assert code == 0 and made["allow_starttls"] is True and made["secure"] is False
    assert (
        made["folder_filters"] == ["INBOX", "Archive"] and made["secrets"]["password"] == "stored"
    )
    pid = made["provider_id"]
    assert cli("providers", "show", pid)[1]["mailbox"] == "cli@example.com"
    assert [p["provider_id"] for p in cli("providers", "list", "--tenant", tenant)[1]] == [pid]
    code, changed, _ = cli("providers", "update", pid, "--max-per-sync", "7",
                           "--password-stdin", stdin="pw-from-stdin\n")  # fmt: skip
    assert code == 0 and changed["provider"]["max_emails_per_sync"] == 7
    code, paused, _ = cli("providers", "pause", pid)
    assert code == 0 and paused["provider"]["pause_reason"] == "manual"
    assert cli("providers", "resume", pid)[1]["provider"]["paused"] is False
    code, _, err = cli("providers", "reconnect", pid)
    assert code == 1 and "not served by any worker" in err
    code, removed, _ = cli("providers", "remove", pid)
    assert code == 0 and removed["removed"] is True
    assert counts(dsn, tenant) == (0, 0, 0)


def test_cli_invalid_input_names_the_field(cli: Any, dsn: str) -> None:
    tenant = str(uuid.uuid4())
    code, out, err = cli("providers", "add", "--tenant", tenant, "--mailbox", "x@example.com",
                         "--host", "imap.example.com", "--port", "0",
                         "--username", "u")  # fmt: skip
    assert code == 1 and out is None and "port: must be between 1 and 65535" in err
    code, _, err = cli("providers", "add", "--json", "-",
                       stdin=orjson.dumps(body(tenant, host="bad host")).decode())  # fmt: skip
    assert code == 1 and "host:" in err
    code, _, err = cli("providers", "add", "--json", "-", "--password-env", "UNSET_VAR_X",
                       stdin=orjson.dumps(body(tenant)).decode())  # fmt: skip
    assert code == 1 and "UNSET_VAR_X" in err
    assert cli("providers", "show", str(uuid.uuid4()))[0] == 1
    assert counts(dsn, tenant) == (0, 0, 0)


def test_cli_json_body_matches_the_api(cli: Any, api: ApiClient) -> None:
    tenant = str(uuid.uuid4())
    code, made, _ = cli(
        "providers", "add", "--json", "-", stdin=orjson.dumps(body(tenant)).decode()
    )
    assert code == 0
    assert made == api.call("GET", f"/v1/providers/{made['provider_id']}")[1]


# -- test: connect, log in, folders ------------------------------------------------------------


@pytest.fixture(scope="module")
def mailbox(dovecot: Dovecot) -> Any:
    user = dovecot.add_user()
    dovecot.create_folder(user.name, "Archive")
    return user


def _probe_body(tenant: str, dovecot: Dovecot, user: Any, **over: Any) -> dict[str, Any]:
    settings = {"host": "127.0.0.1", "port": dovecot.tls_port, "username": user.name,
                "password": user.password, "folder_filters": ["INBOX", "Archive"]}  # fmt: skip
    return body(tenant, **{**settings, **over})


def test_test_classifies_each_failure(  # noqa: PLR0917 - fixtures
    api: ApiClient, cli: Any, dovecot: Dovecot, mailbox: Any, logs: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    tenant = str(uuid.uuid4())

    def probe(**over: Any) -> dict[str, Any]:
        status, made = api.call("POST", "/v1/providers", _probe_body(tenant, dovecot, mailbox,
                                                                     **over))  # fmt: skip
        assert status == 201, made
        status, result = api.call("POST", f"/v1/providers/{made['provider_id']}/test")
        assert status == 200
        return dict(result)

    ok = probe()
    assert (ok["ok"], ok["classification"]) == (True, "ok")
    assert "IDLE" in ok["capabilities"] and ok["folders"] == ["INBOX", "Archive"]
    assert probe(password="wrong-" + uuid.uuid4().hex)["classification"] == "auth_failed"
    assert probe(port=free_port())["classification"] == "tcp_refused"
    missing = probe(folder_filters=["INBOX", "Nowhere"])
    assert (missing["classification"], missing["missing_folders"]) == ("folder_missing",
                                                                        ["Nowhere"])  # fmt: skip
    # Without the test CA the self-signed certificate is not trusted.
    made = api.call("POST", "/v1/providers", _probe_body(tenant, dovecot, mailbox))[1]
    monkeypatch.setenv("SHARDWORKER_TLS_CA_FILE", "")
    code, result, _ = cli("providers", "test", made["provider_id"])
    assert (code, result["classification"]) == (1, "tls_certificate")
    assert_no_secret([*api.seen, logs.getvalue(), orjson.dumps(result)], [mailbox.password])


def test_test_with_the_secret_in_algas_store(
    cli: Any, dovecot: Dovecot, mailbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No password given: nothing stored; the read chain finds Alga's env secret."""
    tenant = str(uuid.uuid4())
    made_body = _probe_body(tenant, dovecot, mailbox)
    del made_body["password"]
    code, made, _ = cli("providers", "add", "--json", "-", stdin=orjson.dumps(made_body).decode())
    assert code == 0 and made["secrets"] == {"password": "external"}
    pid = made["provider_id"]
    code, result, _ = cli("providers", "test", pid)
    assert (code, result["classification"]) == (1, "secret_missing")
    monkeypatch.setenv("SHARDWORKER_SECRET_READ_CHAIN", "db,env")
    monkeypatch.setenv(f"TENANT_{tenant}_imap_password_{pid}", mailbox.password)
    code, result, _ = cli("providers", "test", pid)
    assert (code, result["classification"]) == (0, "ok")
