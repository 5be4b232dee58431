"""Helpers for the admin tests: an HTTP client that keeps every response, a private
migrated database, and a capture of every log line (for the no-secret scans)."""

from __future__ import annotations

import http.client
import io
import logging
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

from shardworker.db.migrate import migrate
from shardworker.logs import JsonFormatter
from tests.harness.pg import PG_ADMIN_DSN, create_database, drop_database, dsn_for

TOKEN = "adm-" + secrets.token_urlsafe(24)


@dataclass
class ApiClient:
    """Calls the admin API on 127.0.0.1:port; every response body is kept for scans."""

    port: int
    token: str = TOKEN
    seen: list[bytes] = field(default_factory=list)

    def raw(
        self, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, http.client.HTTPResponse]:  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.seen.append(data)
        return response.status, data, response

    def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        status, payload, _ = self.raw(method, path, data, headers)
        return status, orjson.loads(payload) if payload else None


@contextmanager
def private_database() -> Iterator[str]:
    """A migrated database of its own: providers made here never reach other tests' pools."""
    name = create_database(PG_ADMIN_DSN, prefix="sw_admin_")
    dsn = dsn_for(PG_ADMIN_DSN, name)
    try:
        migrate(dsn)
        yield dsn
    finally:
        drop_database(name, PG_ADMIN_DSN)


@contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every log line of this process (DEBUG and up), as the JSON the service writes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def assert_no_secret(texts: Sequence[bytes | str], secret_values: Sequence[str]) -> None:
    for text in texts:
        blob = text.decode(errors="replace") if isinstance(text, bytes) else text
        for value in secret_values:
            assert value not in blob, f"a secret leaked into: {blob[:300]!r}"
