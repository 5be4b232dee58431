"""The admin API fuzzed from its own OpenAPI document (schemathesis), against the real
server on PostgreSQL and Redis: valid and invalid bodies, paths and queries for every
operation.  No answer is a 5xx, every error has the one error shape, and no answer holds
a secret (the admin token, or any secret value the request carried)."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from shardworker.admin.api import AdminApi
from shardworker.admin.service import AdminService
from shardworker.config import Settings
from shardworker.db.store import open_pool
from tests.admin_support import TOKEN, captured_logs, private_database
from tests.harness.dovecot import Dovecot
from tests.support import rig_settings

pytestmark = pytest.mark.timeout(600)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET_FIELDS = ("password", "oauth_client_secret", "refresh_token", "access_token")


@pytest.fixture(scope="module")
def fuzz_settings(redis_server: str, dovecot: Dovecot) -> Iterator[Settings]:
    with private_database() as dsn:
        yield rig_settings(dsn, f"{redis_server}/0", str(dovecot.cafile),
                           admin_addr="127.0.0.1:0", admin_token=TOKEN)  # fmt: skip


@pytest.fixture(scope="module")
def logs() -> Iterator[io.StringIO]:
    with captured_logs() as stream:
        yield stream


@pytest.fixture(scope="module")
def server(fuzz_settings: Settings, logs: io.StringIO) -> Iterator[AdminApi]:
    pool = open_pool(fuzz_settings.database_url, max_size=4)
    client = redis.Redis.from_url(fuzz_settings.redis_url)
    api = AdminApi(fuzz_settings, AdminService(fuzz_settings, pool, client))
    api.start()
    yield api
    api.close()
    pool.close()
    client.close()


def _secrets_in(body: Any) -> list[str]:
    if not isinstance(body, dict):
        return []
    values = [body.get(name) for name in SECRET_FIELDS]
    # Short values ("a", "0") appear in any answer by chance: only real-looking secrets.
    return [v for v in values if isinstance(v, str) and len(v.strip()) >= 6]


def _check(case: Any, seen: Counter[int]) -> None:
    response = case.call(headers=AUTH, timeout=30)
    seen[response.status_code] += 1
    label = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, (label, case.body, response.text[:300])
    text = response.text
    assert TOKEN not in text
    for secret in _secrets_in(case.body):
        assert secret not in text, f"a secret came back from {label}"
    if response.status_code >= 400:
        answer = orjson.loads(response.content)
        assert isinstance(answer.get("error"), str), (label, answer)
        if response.status_code != 401:
            assert set(answer) == {"error", "field", "message"}, (label, answer)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_holds_up_to_its_own_schema(server: AdminApi, mode: GenerationMode) -> None:
    """Every operation, with data the schema allows and with data it forbids.

    Driven through hypothesis directly: schemathesis' pytest plugin does not load under
    pytest 9 here."""
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{server.port}/openapi.json",
                                           headers=AUTH)  # fmt: skip
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    seen: Counter[int] = Counter()
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)  # fmt: skip
        def fuzz(case: Any) -> None:
            _check(case, seen)

        fuzz()
    print(f"{mode.value}: {sum(seen.values())} requests, by status {dict(sorted(seen.items()))}")
    # The fuzz reached the service, not only the validation: some calls succeeded.
    assert sum(seen.values()) > 100 and any(200 <= code < 300 for code in seen)


def test_the_openapi_document_is_behind_the_token(server: AdminApi) -> None:
    import requests

    base = f"http://127.0.0.1:{server.port}"
    assert requests.get(base + "/openapi.json", timeout=10).status_code == 401
    document = requests.get(base + "/openapi.json", headers=AUTH, timeout=10).json()
    paths = set(document["paths"])
    assert {"/v1/providers", "/v1/providers/{provider_id}", "/v1/commands/{command_id}",
            "/v1/providers/{provider_id}/resync"} <= paths  # fmt: skip
    secret = document["components"]["schemas"]["NewProvider"]["properties"]["password"]
    assert "writeOnly" in str(secret)


def test_no_secret_in_any_log_line(logs: io.StringIO) -> None:
    assert TOKEN not in logs.getvalue()


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1,
                max_size=40).filter(lambda t: t.strip() == t and t)  # fmt: skip
_SECRET = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=8,
                  max_size=64).filter(lambda t: t.strip() == t)  # fmt: skip
_LABEL = st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)


@st.composite
def valid_providers(draw: Any) -> dict[str, Any]:
    """Bodies validate.py accepts, with a password: every add must answer 201."""
    host = ".".join(draw(st.lists(_LABEL, min_size=2, max_size=3)))
    return {
        "tenant": str(draw(st.uuids())),
        "mailbox": f"{draw(_LABEL)}@{host}",
        "provider_name": draw(_TEXT),
        "host": host,
        "port": draw(st.integers(1, 65535)),
        "secure": draw(st.booleans()),
        "username": draw(_TEXT),
        "password": "pw-" + draw(_SECRET),
        "folder_filters": draw(st.lists(_TEXT, max_size=4, unique=True)),
        "max_emails_per_sync": draw(st.integers(1, 1000)),
    }


def _elsewhere(secret: str, body: dict[str, Any]) -> bool:
    """The secret's text also stands in a non-secret field (then a match proves nothing)."""
    public = orjson.dumps({k: v for k, v in body.items() if k != "password"}).decode()
    return secret in public


@given(body=valid_providers(), new_password=_SECRET)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
          database=None)  # fmt: skip
def test_valid_providers_round_trip_without_a_secret(
    server: AdminApi, body: dict[str, Any], new_password: str
) -> None:
    import requests

    new_password = "np-" + new_password
    assume(not _elsewhere(body["password"], body) and not _elsewhere(new_password, body))
    base = f"http://127.0.0.1:{server.port}"
    made = requests.post(base + "/v1/providers", json=body, headers=AUTH, timeout=30)
    assert made.status_code == 201, made.text
    pid = made.json()["provider_id"]
    answers = [made.text]
    for method, path, payload in (
        ("GET", f"/v1/providers/{pid}", None),
        ("GET", f"/v1/providers?tenant={body['tenant']}", None),
        ("PATCH", f"/v1/providers/{pid}", {"password": new_password, "port": 993}),
        ("POST", f"/v1/providers/{pid}/pause", {}),
        ("DELETE", f"/v1/providers/{pid}", None),
    ):
        answer = requests.request(method, base + path, json=payload, headers=AUTH, timeout=30)
        assert answer.status_code == 200, (method, path, answer.text)
        answers.append(answer.text)
    for text in answers:
        assert body["password"] not in text and new_password not in text
