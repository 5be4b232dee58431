"""Issue 12 items 1, 6 and 13: the OAuth2 token URL is checked on every use, the request has
a total deadline, redirects stay on the origin, the extra CA file is trusted, and neither
URL userinfo nor a secret reaches an error."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from shardworker.errors import TokenEndpointError, TokenRefreshError
from shardworker.imap.connect import tls_context
from shardworker.netpolicy import OutboundPolicy, _networks
from shardworker.oauth import post_token_request  # the name the refresher has always used
from shardworker.tokenclient import check_token_url
from tests.drip_http import DripServer
from tests.harness.tls import make_tls_files

pytestmark = pytest.mark.timeout(30)
FORM = {"grant_type": "refresh_token", "refresh_token": "rt-S3cretRefresh"}


class Endpoint:
    """A token endpoint answering ``status`` with ``headers`` (and a token on 200)."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.hits: list[str] = []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.hits.append(self.path)
                body = orjson.dumps({"access_token": "at-1", "expires_in": 60})
                code = 200 if self.path == "/final" else status
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints() -> Iterator[list[Endpoint]]:
    made: list[Endpoint] = []
    yield made
    for e in made:
        e.close()


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/token",
        "gopher://127.0.0.1:70/",
        "http://login.example.com/token",  # plain http off loopback
        "https://user:S3cretPW@login.example.com/token",
        "https:///no-host",
        "https://login.example.com:99999/token",
    ],
)
def test_token_urls_outside_the_rules_are_refused_without_leaking(url: str) -> None:
    with pytest.raises(TokenRefreshError) as info:
        post_token_request(url, FORM, 2.0, ["rt-S3cretRefresh"])
    assert info.value.code == "invalid_token_url"
    assert "S3cretPW" not in str(info.value) and "rt-S3cret" not in str(info.value)


def test_a_file_url_holding_a_token_is_not_read(tmp_path: Path) -> None:
    token_file = tmp_path / "token.json"
    token_file.write_text('{"access_token": "stolen", "expires_in": 3600}')
    with pytest.raises(TokenRefreshError):
        post_token_request(token_file.as_uri(), FORM, 2.0)


def test_http_to_loopback_and_https_are_accepted() -> None:
    assert check_token_url("http://127.0.0.1:8080/token").hostname == "127.0.0.1"
    assert check_token_url("http://localhost/token").hostname == "localhost"
    assert check_token_url("https://login.example.com/oauth2/token").port is None


def test_a_dripping_endpoint_is_cut_at_the_total_deadline() -> None:
    server = DripServer(every_s=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(TokenEndpointError, match="timed out"):
            post_token_request(server.url, FORM, 1.0)
        assert time.monotonic() - started < 2.0
    finally:
        server.close()


def test_a_redirect_to_another_origin_is_refused(endpoints: list[Endpoint]) -> None:
    other = Endpoint()
    endpoints.append(other)
    first = Endpoint(302, {"Location": f"http://127.0.0.1:{other.port}/final"})
    endpoints.append(first)
    with pytest.raises(TokenRefreshError) as info:
        post_token_request(f"http://127.0.0.1:{first.port}/token", FORM, 2.0)
    assert info.value.code == "redirect_refused"
    assert other.hits == []


def test_a_same_origin_307_is_followed_but_a_302_is_not(endpoints: list[Endpoint]) -> None:
    keep = Endpoint(307, {"Location": "/final"})
    endpoints.append(keep)
    answer = post_token_request(f"http://127.0.0.1:{keep.port}/token", FORM, 2.0)
    assert answer["access_token"] == "at-1" and keep.hits == ["/token", "/final"]
    drop = Endpoint(302, {"Location": "/final"})
    endpoints.append(drop)
    with pytest.raises(TokenRefreshError, match="302"):
        post_token_request(f"http://127.0.0.1:{drop.port}/token", FORM, 2.0)


def test_the_outbound_policy_applies_to_token_urls(endpoints: list[Endpoint]) -> None:
    e = Endpoint()
    endpoints.append(e)
    deny_loopback = OutboundPolicy(deny=_networks(["127.0.0.0/8", "::1/128"]))
    with pytest.raises(TokenEndpointError, match="outbound policy"):
        post_token_request(f"http://localhost:{e.port}/token", FORM, 2.0, policy=deny_loopback)
    assert e.hits == []


def test_the_extra_ca_file_is_trusted_for_token_requests(
    tmp_path: Path, endpoints: list[Endpoint]
) -> None:
    files = make_tls_files(tmp_path, hostname="localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(files.certfile, files.keyfile)
    e = Endpoint(tls=server_ctx)
    endpoints.append(e)
    url = f"https://localhost:{e.port}/token"
    with pytest.raises(TokenEndpointError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
        post_token_request(url, FORM, 2.0)
    answer = post_token_request(url, FORM, 2.0, ssl_context=tls_context(str(files.cafile)))
    assert answer["access_token"] == "at-1"


def test_userinfo_never_reaches_an_error_message() -> None:
    with pytest.raises(TokenRefreshError) as info:
        post_token_request("https://admin:S3cretPW@127.0.0.1:1/token", FORM, 1.0)
    assert "S3cretPW" not in str(info.value) and "admin" not in str(info.value)
