"""Open an IMAP connection and log in; classify every IMAP failure once.

Security modes come from Alga's two columns (``secure``, ``allow_starttls``): implicit TLS,
mandatory STARTTLS (never a silent downgrade when the server does not offer it), or plain
text as an explicit opt-in.  Certificates are always verified.

Errors are classified where they are caught (:func:`classify_error`): ``ImapAuthError`` is
terminal until someone acts, ``ImapTransientError`` is retried.  RFC 5530 response codes
decide first, because servers reject logins for temporary reasons too (``[UNAVAILABLE]``,
Dovecot's ``[LIMIT]``) and pausing a provider for those would be wrong.

No message, log line or exception chain leaving a login carries the password or token:
servers and imaplib can echo what they were sent, so every string built after credentials
went out is scrubbed of each form the secret was sent in.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import imaplib
import logging
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from imapclient import IMAPClient, SocketTimeout
from imapclient import exceptions as imap_exc

from shardworker.deadline import Deadline, Watch, watch
from shardworker.errors import (
    ConfigError,
    FolderError,
    ImapAuthError,
    ImapError,
    ImapProtocolError,
    ImapTransientError,
    NotImapError,
)
from shardworker.imap.guard import Dialling, GuardedClient, literal_cap
from shardworker.logs import get_logger
from shardworker.netpolicy import OutboundPolicy

Security = Literal["tls", "starttls", "plain"]

log = get_logger(__name__)

# imapclient traces every protocol line, message bodies included, on this logger at DEBUG;
# SHARDWORKER_LOG_LEVEL=DEBUG must not turn mail content into log lines.
logging.getLogger("imapclient.imaplib").setLevel(logging.INFO)

REDACTED = "***"

# Settings' default max_raw_bytes (25 MiB) plus the margin: for callers without settings.
DEFAULT_MAX_LITERAL_BYTES = literal_cap(25 * 1024 * 1024)

# RFC 5530 response codes.  Auth codes need an operator (wrong or expired credentials,
# policy); the transient ones are server trouble that retrying fixes.
_AUTH_CODES = frozenset(
    {"AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "EXPIRED", "PRIVACYREQUIRED", "CONTACTADMIN"}
)
_TRANSIENT_CODES = {
    "LIMIT": "limit",
    "UNAVAILABLE": "unavailable",
    "INUSE": "unavailable",
    "SERVERBUG": "unavailable",
}
_FOLDER_CODES = frozenset({"NONEXISTENT", "NOPERM"})
_RESPONSE_CODE = re.compile(r"\[([A-Za-z][A-Za-z0-9-]*)")
# LOGIN sends the user name in a quoted string and XOAUTH2 puts it between ^A separators.
_USER_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")
_SECRET_FORBIDDEN = re.compile(r"[\r\n\x00]")
_TOKEN_FORBIDDEN = re.compile(r"[\r\n\x00\x01]")
_PLAINTEXT_HINT = "use TLS or STARTTLS, or set SHARDWORKER_ALLOW_PLAINTEXT_LOGIN=true"


@dataclass(frozen=True)
class Credentials:
    """Who logs in: a password, or an OAuth2 access token, in ``secret`` (never printed)."""

    kind: Literal["password", "oauth2"]
    username: str
    secret: str = field(repr=False)


def security_mode(secure: bool, allow_starttls: bool) -> Security:
    """Alga's ``secure`` / ``allow_starttls`` columns as one mode; plain only when both off."""
    if secure:
        return "tls"
    if allow_starttls:
        return "starttls"
    return "plain"


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """A verifying client context: system CAs plus ``ca_file``; one per file per process."""
    return _cached_tls_context(ca_file)


@functools.lru_cache(maxsize=16)
def _cached_tls_context(ca_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"SHARDWORKER_TLS_CA_FILE: cannot load {ca_file!r}: {exc}") from exc
    return context


# ---------------------------------------------------------------- classification


def classify_error(exc: BaseException, *, where: str = "", redact: Sequence[str] = ()) -> ImapError:
    """The shardworker error for any failure talking IMAP (connect, login, SELECT, IDLE...).

    ``where`` prefixes the message (e.g. ``host:port``); each string in ``redact`` is
    replaced by ``***`` in it.  An ``ImapError`` is returned unchanged.
    """
    if isinstance(exc, ImapError):
        return exc
    text = _scrub(f"{type(exc).__name__}: {exc}", redact)
    if where:
        text = f"{where}: {text}"
    if isinstance(exc, OSError):
        return ImapTransientError(text, reason=_socket_reason(exc))
    if isinstance(exc, EOFError):
        return ImapTransientError(text, reason="network")
    if isinstance(exc, UnicodeError):
        # The idna codec refuses the host name before any lookup: it cannot resolve.
        return ImapTransientError(text, reason="dns")
    if isinstance(exc, imaplib.IMAP4.error):
        cause = exc.__context__
        # imapclient re-raises every failure during login as LoginError, a dropped
        # connection or a timeout included: those are not rejected credentials.
        if isinstance(exc, imap_exc.LoginError) and isinstance(
            cause, (imaplib.IMAP4.abort, OSError)
        ):
            return classify_error(cause, where=where, redact=redact)
        return _classify_imap_error(exc, text)
    return ImapProtocolError(text)


def _socket_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls_certificate"
    if isinstance(exc, (ssl.SSLZeroReturnError, ssl.SSLEOFError)):
        return "network"  # the peer went away; nothing wrong with TLS itself
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "network"


def _classify_imap_error(exc: imaplib.IMAP4.error, text: str) -> ImapError:
    for found in _RESPONSE_CODE.findall(text):
        code = found.upper()
        if code in _TRANSIENT_CODES:
            return ImapTransientError(text, reason=_TRANSIENT_CODES[code])
        if code in _AUTH_CODES:
            return ImapAuthError(text, code=code.lower())
        if code in _FOLDER_CODES:
            return FolderError(text)
    if isinstance(exc, imap_exc.LoginError):
        return ImapAuthError(text, code="auth_failed")
    if isinstance(exc, imaplib.IMAP4.abort):
        reason = _abort_reason(text)
        if reason == "protocol":
            return ImapProtocolError(text)
        return ImapTransientError(text, reason=reason)
    if isinstance(exc, imap_exc.CapabilityError) and "STARTTLS" in text.upper():
        return ImapTransientError(text, reason="starttls_unavailable")
    if "* BYE" in text:
        # A BYE greeting: the server refuses connections for now (busy, shutting down).
        return ImapTransientError(text, reason="unavailable")
    return ImapProtocolError(text)


def _abort_reason(text: str) -> str:
    if "timed out" in text:
        return "timeout"
    if "unexpected" in text:
        return "protocol"
    return "network"  # EOF, reset, or an untagged BYE


def _scrub(text: str, redact: Sequence[str]) -> str:
    for secret in sorted(redact, key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def _secret_forms(creds: Credentials, payloads: Sequence[str]) -> tuple[str, ...]:
    """Every shape in which the secret may come back: raw, IMAP-quoted, repr-escaped, base64."""
    quoted = creds.secret.replace("\\", "\\\\").replace('"', '\\"')
    forms = {creds.secret, quoted}
    forms |= {repr(form.encode())[2:-1] for form in (creds.secret, quoted)}
    forms |= {base64.b64encode(p.encode()).decode() for p in payloads}
    return tuple(forms)


# ---------------------------------------------------------------- opening


def open_client(
    host: str,
    port: int,
    security: Security,
    creds: Credentials,
    *,
    timeout_s: float,
    connect_timeout_s: float,
    ssl_context: ssl.SSLContext | None,
    max_literal_bytes: int = DEFAULT_MAX_LITERAL_BYTES,
    policy: OutboundPolicy | None = None,
) -> IMAPClient:
    """A logged-in client whose socket times out after ``timeout_s`` on every operation.

    DNS, TCP, TLS, the greeting, STARTTLS and the login share one total deadline of
    ``connect_timeout_s`` (a server dripping bytes cannot stretch it), and only an
    address the outbound ``policy`` permits is connected to.  Every read is bounded
    (shardworker.imap.guard): no literal above ``max_literal_bytes`` (use
    ``literal_cap(settings.max_raw_bytes)``), no endless line, no drip.  On failure the
    socket is closed and a classified ``ImapAuthError`` / ``ImapTransientError`` raised.
    """
    where = f"{host}:{port}"
    check_credentials(creds)
    policy = policy if policy is not None else OutboundPolicy()
    deadline = Deadline(connect_timeout_s)
    with watch(deadline) as w:
        try:
            return _open(host, port, security, creds, w=w, policy=policy, deadline=deadline,
                         ssl_context=ssl_context, timeout_s=timeout_s,
                         max_literal_bytes=max_literal_bytes)  # fmt: skip
        except ImapError as exc:
            if not w.fired or isinstance(exc, ImapAuthError):
                raise
        # Raised outside the handler: the shut-down socket's error says nothing useful.
        raise ImapTransientError(
            f"{where}: timed out: connecting and logging in took longer than the "
            f"{connect_timeout_s:g}s deadline",
            reason="timeout",
        )


def _open(
    host: str,
    port: int,
    security: Security,
    creds: Credentials,
    *,
    w: Watch,
    policy: OutboundPolicy,
    deadline: Deadline,
    ssl_context: ssl.SSLContext | None,
    timeout_s: float,
    max_literal_bytes: int,
) -> IMAPClient:
    where = f"{host}:{port}"
    plain = security == "plain"
    loopback_only = "" if not plain or policy.allow_plaintext_login else _PLAINTEXT_HINT
    if plain:
        log.warning("imap_plaintext_connection", host=host, port=port)
    context = ssl_context if ssl_context is not None else tls_context()
    try:
        client = GuardedClient(
            host,
            port,
            ssl=security == "tls",
            ssl_context=context,
            timeout=SocketTimeout(connect=deadline.remaining(), read=deadline.remaining()),
            max_literal_bytes=max_literal_bytes,
            dialling=Dialling(policy, deadline, w, loopback_only),
        )
    except ImapError:
        raise
    except Exception as exc:
        raise classify_greeting_error(exc, where=where) from None
    try:
        client._imap.debug = 0  # imapclient's 5 formats every response for a silent logger
        if security == "starttls":
            _start_tls(client, context, where)
        _log_in(client, creds, where)
        client.socket().settimeout(timeout_s)
    except BaseException as exc:
        close_client(client, logout=False)
        if isinstance(exc, ImapError) or not isinstance(exc, Exception):
            raise
        raise classify_error(exc, where=where) from exc
    return client


def classify_greeting_error(exc: BaseException, *, where: str) -> ImapError:
    """A failure before the greeting was understood; never echoes what the server said.

    A provider row can point at any port, so the "greeting" may be an SSH banner or an
    internal service's answer: repeating it in ``error_message`` would hand it to
    whoever can read the row.
    """
    if isinstance(exc, imaplib.IMAP4.error) and not isinstance(exc.__context__, OSError):
        if str(exc).endswith("socket error: EOF"):  # imaplib's words, not the server's
            return ImapTransientError(f"{where}: the server closed the connection "
                                      "before greeting", reason="network")  # fmt: skip
        if "BYE" in str(exc).upper():
            return ImapTransientError(
                f"{where}: the server refused the connection for now (BYE greeting)",
                reason="unavailable",
            )
        return NotImapError(f"{where}: the server did not answer with an IMAP greeting")
    return classify_error(exc, where=where)


def check_credentials(creds: Credentials) -> None:
    """Refuse a value that would break out of its IMAP command, naming the field.

    The admin API refuses control characters, but a row written by Alga or a secret
    from the env or file chain never went through it.  The guard refuses such a line
    again on the wire (shardworker.imap.guard); this check names what was wrong.
    """
    if _USER_FORBIDDEN.search(creds.username):
        raise ImapAuthError(
            "username contains a control character (CR, LF, NUL...); refused before sending",
            code="invalid_credentials",
        )
    field = "access token" if creds.kind == "oauth2" else "password"
    forbidden = _TOKEN_FORBIDDEN if creds.kind == "oauth2" else _SECRET_FORBIDDEN
    if forbidden.search(creds.secret):
        raise ImapAuthError(
            f"{field} contains a CR, LF or NUL character; refused before sending",
            code="invalid_credentials",
        )


def _start_tls(client: IMAPClient, context: ssl.SSLContext, where: str) -> None:
    if b"STARTTLS" not in client.capabilities():
        # Mandatory: carrying on in plain text would send the password in the clear.
        raise ImapTransientError(
            f"{where}: STARTTLS was required but the server does not offer it",
            reason="starttls_unavailable",
        )
    client.starttls(context)


def _log_in(client: IMAPClient, creds: Credentials, where: str) -> None:
    """Authenticate; on failure close the socket and raise a scrubbed, classified error."""
    payloads: list[str] = []
    try:
        _authenticate(client, creds, payloads, where)
        return
    except BaseException as exc:
        close_client(client, logout=False)
        if not isinstance(exc, Exception):
            raise
        error = classify_error(exc, where=where, redact=_secret_forms(creds, payloads))
    # Raised outside the handler so nothing is chained: the original text may echo secrets.
    raise error


def _authenticate(client: IMAPClient, creds: Credentials, payloads: list[str], where: str) -> None:
    caps = set(capabilities(client))
    if creds.kind == "oauth2":
        mech = _oauth_mechanism(caps)
        payloads.append(_oauth_payload(mech, creds))
        client.sasl_login(mech, _SaslResponder(payloads[-1]))
        return
    plain_needed = "LOGINDISABLED" in caps or not (creds.username + creds.secret).isascii()
    if not plain_needed:
        client.login(_quoted(creds.username), creds.secret)
        return
    if "AUTH=PLAIN" not in caps:
        code = "login_disabled" if "LOGINDISABLED" in caps else "unsupported_mechanism"
        raise ImapAuthError(
            f"{where}: LOGIN is disabled or cannot carry non-ASCII credentials, "
            "and the server does not offer AUTH=PLAIN",
            code=code,
        )
    payloads.append(f"\0{creds.username}\0{creds.secret}")
    client.sasl_login("PLAIN", _SaslResponder(payloads[-1]))


def _oauth_mechanism(caps: set[str]) -> str:
    # XOAUTH2 is what Gmail and Microsoft 365 speak; OAUTHBEARER (RFC 7628) when it is
    # the only one a server advertises.
    if "AUTH=OAUTHBEARER" in caps and "AUTH=XOAUTH2" not in caps:
        return "OAUTHBEARER"
    return "XOAUTH2"


def _oauth_payload(mech: str, creds: Credentials) -> str:
    if mech == "OAUTHBEARER":
        identity = creds.username.replace("=", "=3D").replace(",", "=2C")
        return f"n,a={identity},\x01auth=Bearer {creds.secret}\x01\x01"
    return f"user={creds.username}\x01auth=Bearer {creds.secret}\x01\x01"


class _SaslResponder:
    """Sends the initial response once; answers any later challenge with an empty line.

    After a rejected token, XOAUTH2 and OAUTHBEARER servers send an error challenge and
    expect an empty response before the tagged NO; sending the token again is wrong.
    """

    def __init__(self, payload: str) -> None:
        self._payload: str | None = payload

    def __call__(self, challenge: bytes) -> str:
        payload, self._payload = self._payload, None
        return payload if payload is not None else ""


def _quoted(value: str) -> str:
    # imaplib sends LOGIN's user name verbatim (it quotes only the password).
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------- helpers


def capabilities(client: IMAPClient) -> tuple[str, ...]:
    """The server's current capabilities, decoded and sorted."""
    try:
        raw = client.capabilities()
    except Exception as exc:
        raise classify_error(exc) from exc
    return tuple(
        sorted(c.decode("ascii", "replace") if isinstance(c, bytes) else str(c) for c in raw)
    )


def close_client(client: IMAPClient, *, logout: bool = True) -> None:
    """LOGOUT (when asked) and close the socket; never raises."""
    if logout:
        try:
            client.logout()
            return
        except Exception:
            pass  # already broken: closing the socket is all that is left
    with contextlib.suppress(Exception):  # the socket may already be closed
        client.shutdown()
