"""The OAuth2 token endpoint over HTTP: one POST with a total deadline and a vetted URL.

The URL comes from a provider row, which Alga's UI writes, so it is checked on every use:

* ``https``, or ``http`` to a loopback address only; no other scheme (no ``file://``);
* no user name or password in the URL (the client secret goes in the form body);
* the host is resolved and vetted by the outbound policy (shardworker.netpolicy), and the
  connection goes to the vetted address while TLS verifies the host name;
* a redirect is followed only to the same origin and only when it keeps the POST
  (307/308), at most ``MAX_REDIRECTS`` times; any other redirect is refused;
* ``SHARDWORKER_TLS_CA_FILE`` is trusted, as for IMAP;
* the whole exchange (DNS, TCP, TLS, request, answer) has one deadline, so an endpoint
  that drips one byte at a time cannot keep a thread for longer than that.

No token, secret, form body or URL userinfo reaches an error message.
"""

from __future__ import annotations

import http.client
import re
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import SplitResult, urlencode, urljoin, urlsplit

import orjson

from shardworker.deadline import Deadline, Watch, watch
from shardworker.errors import ImapTransientError, TokenEndpointError, TokenRefreshError
from shardworker.netpolicy import OutboundPolicy, connect, is_loopback_host
from shardworker.redact import redact_url

MAX_ANSWER_BYTES = 64 * 1024
MAX_REDIRECTS = 3
_TRANSIENT_STATUS = frozenset({408, 425, 429})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LOOPBACK_HINT = "http token URLs must point at a loopback address; use https"


def check_token_url(url: str) -> SplitResult:
    """The parsed URL, or ``TokenRefreshError`` (terminal: someone must fix the row)."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (parsing the port is the check)
    except ValueError:
        raise _bad_url(f"oauth_token_url {shown} is not a valid URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise _bad_url(f"oauth_token_url {shown}: only https (or http to loopback) is allowed")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise _bad_url(f"oauth_token_url {shown}: {_LOOPBACK_HINT}")
    if parts.username is not None or parts.password is not None:
        raise _bad_url(
            f"oauth_token_url {shown}: credentials in the URL are not supported "
            "(the client secret is sent in the form body)"
        )
    if _CONTROL.search(url):
        raise _bad_url(f"oauth_token_url {shown}: contains control characters")
    return parts


def _bad_url(message: str) -> TokenRefreshError:
    return TokenRefreshError(message, code="invalid_token_url")


class _VettedConnection(http.client.HTTPSConnection):
    """HTTP(S) to a policy-vetted address, its socket tracked by the deadline watch."""

    def __init__(
        self,
        parts: SplitResult,
        *,
        policy: OutboundPolicy,
        deadline: Deadline,
        watch: Watch,
        context: ssl.SSLContext,
    ) -> None:
        self._sw_tls = parts.scheme == "https"
        port = parts.port or (443 if self._sw_tls else 80)
        assert parts.hostname is not None
        super().__init__(parts.hostname, port, timeout=deadline.remaining(), context=context)
        self._sw_policy, self._sw_deadline, self._sw_watch = policy, deadline, watch
        self._sw_context = context

    def connect(self) -> None:
        loopback_only = "" if self._sw_tls else _LOOPBACK_HINT
        sock = connect(self.host, self.port, self._sw_policy, self._sw_deadline,
                       what="token endpoint", loopback_only=loopback_only)  # fmt: skip
        self._sw_watch.track(sock)
        sock.settimeout(max(0.01, self._sw_deadline.remaining()))
        if self._sw_tls:
            sock = self._sw_context.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


def post_token_request(
    url: str,
    form: dict[str, str],
    timeout_s: float,
    redact: Sequence[str] = (),
    *,
    policy: OutboundPolicy | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """POST a token request; the JSON answer, or a classified error without secrets."""
    parts = check_token_url(url)
    where = f"token endpoint {parts.hostname}"
    deadline = Deadline(timeout_s)
    context = ssl_context if ssl_context is not None else ssl.create_default_context()
    body = urlencode(form).encode()
    with watch(deadline) as w:
        try:
            status, answer = _exchange(parts, body, policy or OutboundPolicy(),
                                       deadline=deadline, w=w, context=context)  # fmt: skip
        except (TokenRefreshError, TokenEndpointError):
            raise
        except ImapTransientError as exc:  # the outbound policy refused the address
            raise TokenEndpointError(f"{where}: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            if w.fired:
                raise TokenEndpointError(
                    f"{where}: timed out: no complete answer within {timeout_s:g}s"
                ) from None
            raise TokenEndpointError(f"{where}: {type(exc).__name__}: {exc}") from None
    if not 200 <= status < 300:
        raise _classify_refusal(where, status, answer, redact)
    data = _json_object(answer)
    if data is None:
        raise TokenEndpointError(f"{where}: the answer is not a JSON object")
    return data


def _exchange(
    parts: SplitResult,
    body: bytes,
    policy: OutboundPolicy,
    *,
    deadline: Deadline,
    w: Watch,
    context: ssl.SSLContext,
) -> tuple[int, bytes]:
    for _ in range(MAX_REDIRECTS + 1):
        conn = _VettedConnection(parts, policy=policy, deadline=deadline, watch=w,
                                 context=context)  # fmt: skip
        try:
            conn.request("POST", _target(parts), body=body, headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            })  # fmt: skip
            response = conn.getresponse()
            answer = response.read(MAX_ANSWER_BYTES)
            location = response.getheader("Location")
        finally:
            conn.close()
        if response.status not in (301, 302, 303, 307, 308):
            return response.status, answer
        parts = _redirect(parts, response.status, location)
    raise TokenEndpointError(f"token endpoint {parts.hostname}: too many redirects")


def _target(parts: SplitResult) -> str:
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _redirect(parts: SplitResult, status: int, location: str | None) -> SplitResult:
    where = f"token endpoint {parts.hostname}"
    if not location:
        raise TokenEndpointError(f"{where}: HTTP {status} without a Location")
    target = urlsplit(urljoin(parts.geturl(), location))
    same_origin = (target.scheme, target.hostname, target.port) == (
        parts.scheme, parts.hostname, parts.port,
    )  # fmt: skip
    if not same_origin:
        raise TokenRefreshError(
            f"{where}: refused a redirect to another origin ({redact_url(target.geturl())})",
            code="redirect_refused",
        )
    if status not in (307, 308):
        raise TokenRefreshError(
            f"{where}: refused an HTTP {status} redirect (it would turn the POST into a GET)",
            code="redirect_refused",
        )
    return check_token_url(target.geturl())


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _classify_refusal(
    where: str, status: int, body: bytes, redact: Sequence[str]
) -> TokenRefreshError | TokenEndpointError:
    if status >= 500 or status in _TRANSIENT_STATUS:
        return TokenEndpointError(f"{where}: HTTP {status}")
    answer = _json_object(body) or {}
    error = answer.get("error")
    code = error if isinstance(error, str) and error.isascii() and error else f"http_{status}"
    detail = answer.get("error_description")
    text = f"{where}: {_clean(code, redact)[:64]}"
    if isinstance(detail, str) and detail:
        text += f" ({_clean(detail, redact)})"
    return TokenRefreshError(text, code=code[:64])


def _clean(text: str, redact: Sequence[str]) -> str:
    text = _CONTROL.sub(" ", text)[:200]
    for secret in redact:
        if secret:
            text = text.replace(secret, "***")
    return text
