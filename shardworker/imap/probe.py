"""One-shot connectivity probe of a provider, for ``shardworker providers test``.

It does what a worker does before watching a mailbox (connect, log in, LIST, resolve the
folder filters, EXAMINE each folder) and reports the first thing that failed as one
classification an operator can act on.  It never raises for IMAP trouble and never
returns the secret.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from imapclient import IMAPClient

from shardworker.errors import FolderError, ImapAuthError, ImapError, ImapTransientError
from shardworker.imap.connect import (
    Credentials,
    Security,
    capabilities,
    classify_error,
    close_client,
    open_client,
)
from shardworker.imap.folders import resolve_folders
from shardworker.netpolicy import OutboundPolicy

Classification = Literal[
    "ok",
    "dns",
    "tcp_refused",
    "tcp_timeout",
    "tls_certificate",
    "tls",
    "auth_failed",
    "folder_missing",
    "protocol",
    "not_imap",
    "outbound_denied",
    "plaintext_refused",
]

# Transient reasons as the probe reports them; anything else is "protocol".
_REASONS: dict[str, Classification] = {
    "dns": "dns",
    "refused": "tcp_refused",
    "timeout": "tcp_timeout",
    "tls_certificate": "tls_certificate",
    "tls": "tls",
    "starttls_unavailable": "tls",
    "not_imap": "not_imap",
    "outbound_denied": "outbound_denied",
    "plaintext_refused": "plaintext_refused",
}


@dataclass(frozen=True)
class ProbeResult:
    """What the probe found; JSON-serialisable with ``dataclasses.asdict``."""

    ok: bool
    classification: Classification
    message: str
    capabilities: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    missing_folders: tuple[str, ...] = ()


def probe(
    host: str,
    port: int,
    security: Security,
    creds: Credentials,
    folders: Sequence[str],
    *,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None,
    policy: OutboundPolicy | None = None,
) -> ProbeResult:
    """Connect, log in, resolve ``folders`` (empty: INBOX), EXAMINE them, log out."""
    try:
        client = open_client(
            host,
            port,
            security,
            creds,
            timeout_s=timeout_s,
            connect_timeout_s=timeout_s,
            ssl_context=ssl_context,
            policy=policy,
        )
    except ImapError as exc:
        return _failure(exc)
    try:
        return _inspect(client, folders, f"{host}:{port} ({security})")
    except ImapError as exc:
        return _failure(exc)
    finally:
        close_client(client)


def _inspect(client: IMAPClient, filters: Sequence[str], where: str) -> ProbeResult:
    caps = capabilities(client)
    resolution = resolve_folders(client, filters)
    ready: list[str] = []
    refused: list[str] = list(resolution.unselectable)
    for name in resolution.folders:
        if _examine(client, name):
            ready.append(name)
        else:
            refused.append(name)
    missing = (*resolution.missing, *refused)
    if missing:
        return ProbeResult(
            ok=False,
            classification="folder_missing",
            message=_missing_message(where, resolution.missing, refused),
            capabilities=caps,
            folders=tuple(ready),
            missing_folders=missing,
        )
    return ProbeResult(
        ok=True,
        classification="ok",
        message=f"{where}: logged in; {len(ready)} folder(s) ready: {', '.join(ready)}",
        capabilities=caps,
        folders=tuple(ready),
    )


def _examine(client: IMAPClient, name: str) -> bool:
    """True when ``name`` can be opened read-only (EXAMINE never changes the mailbox)."""
    try:
        client.select_folder(name, readonly=True)
    except Exception as exc:
        error = classify_error(exc)
        if isinstance(error, FolderError):
            return False
        if isinstance(error, ImapTransientError) and error.reason == "protocol":
            return False  # a plain NO without a response code: the folder is the problem
        raise error from exc
    return True


def _missing_message(where: str, missing: Sequence[str], refused: Sequence[str]) -> str:
    parts = []
    if missing:
        parts.append(f"no folder matches {', '.join(missing)}")
    if refused:
        parts.append(f"cannot be selected: {', '.join(refused)}")
    return f"{where}: " + "; ".join(parts)


def _failure(exc: ImapError) -> ProbeResult:
    classification: Classification
    if isinstance(exc, ImapAuthError):
        classification = "auth_failed"
    elif isinstance(exc, FolderError):
        classification = "folder_missing"
    elif isinstance(exc, ImapTransientError):
        classification = _REASONS.get(exc.reason, "protocol")
    else:
        classification = "protocol"
    return ProbeResult(ok=False, classification=classification, message=str(exc))
