"""What Gmail and Microsoft 365 / Exchange Online do differently from a plain IMAP server.

Pure functions over what a server said (greeting, capabilities, LIST, FETCH, a tagged NO),
so the engine can ask them at the points listed in docs/providers.md and tests can drive
them without a network.  Nothing here talks to a socket.

* :func:`detect_dialect`: Gmail by its ``X-GM-EXT-1`` capability; Exchange by its greeting
  (``The Microsoft Exchange IMAP4 service is ready``) or the capability shape it alone
  sends (``IMAP4`` beside ``IMAP4rev1``, with ``AUTH=XOAUTH2``).
* :func:`classify_provider_answer`: the provider answers that the generic RFC 5530
  classification gets wrong: Exchange's throttling (an honoured backoff, not an error),
  "User is authenticated but not connected" (its usual causes, for the operator), Gmail's
  connection cap and bandwidth limit (transient, never a pause for bad credentials),
  Gmail's app-password and web-login demands (terminal, with what to do).
* :func:`password_mechanism`: LOGIN for Exchange shared-mailbox names (``user/shared``,
  ``DOMAIN\\user\\shared``), which Exchange refuses over AUTHENTICATE PLAIN.
* :func:`all_mail_folder`: Gmail's All Mail by its ``\\All`` special-use flag, whatever
  its localised name (``[Gmail]/Alle Nachrichten``).
* :func:`meta_fetch_items` / :func:`gmail_attrs` / :func:`apply_gmail`: ``X-GM-MSGID``,
  ``X-GM-THRID`` and ``X-GM-LABELS`` in the metadata FETCH, parsed from imapclient's
  answer, and put into ``emailData`` (``threadId`` fallback, the headers map).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from imapclient.imap_utf7 import decode as decode_utf7

from shardworker.errors import ImapAuthError, ImapError, ImapThrottledError, ImapTransientError


class Dialect(enum.Enum):
    GENERIC = "generic"
    GMAIL = "gmail"
    EXCHANGE = "exchange"


# Keys this module writes into ``emailData.headers``.  Header names from the message are
# lower-cased there, so a sender could forge these: every writer drops what the message
# brought under the ``x-shardworker-`` prefix first (:func:`shardworker.loops.drop_forged_headers`).
GMAIL_HEADER_PREFIX = "x-shardworker-gmail-"
HEADER_GMAIL_MSGID = "x-shardworker-gmail-msgid"
HEADER_GMAIL_THRID = "x-shardworker-gmail-thrid"
HEADER_GMAIL_LABELS = "x-shardworker-gmail-labels"

GMAIL_FETCH_ITEMS = ("X-GM-MSGID", "X-GM-THRID", "X-GM-LABELS")
BASE_META_ITEMS = ("UID", "RFC822.SIZE", "INTERNALDATE")

# Throttling: Exchange names the delay; a bare [THROTTLED] gets the default.  The cap keeps
# a garbled or hostile number from parking a mailbox for days.
DEFAULT_THROTTLE_S = 30.0
MAX_THROTTLE_S = 900.0
# Gmail's bandwidth limit is counted over a day; an hour between tries is polite enough.
GMAIL_BANDWIDTH_BACKOFF_S = 3600.0

_EXCHANGE_GREETING = re.compile(r"microsoft exchange", re.IGNORECASE)
_BACKOFF = re.compile(r"suggested\s+backoff\s+time:\s*(\d{1,12})\s*(milliseconds|ms)\b", re.I)
_THROTTLED_CODE = re.compile(r"\[THROTTLED\]", re.IGNORECASE)
_THROTTLED_TEXT = re.compile(r"request is throttled", re.IGNORECASE)
_NOT_CONNECTED = re.compile(r"user is authenticated but not connected", re.IGNORECASE)
_GMAIL_CONN_CAP = re.compile(r"too many simultaneous connections", re.IGNORECASE)
_GMAIL_BANDWIDTH = re.compile(r"exceeded command or bandwidth limits", re.IGNORECASE)
_GMAIL_APP_PASSWORD = re.compile(r"application-specific password required", re.IGNORECASE)
_GMAIL_WEB_LOGIN = re.compile(r"\[WEBALERT|web login required", re.IGNORECASE)


# ---------------------------------------------------------------- detection


def detect_dialect(capabilities: Iterable[str | bytes], greeting: str | bytes = "") -> Dialect:
    """Which provider this server is, from its capabilities and greeting line."""
    caps = {_text(c).upper() for c in capabilities}
    if "X-GM-EXT-1" in caps:
        return Dialect.GMAIL
    if _EXCHANGE_GREETING.search(_text(greeting)):
        return Dialect.EXCHANGE
    # Exchange (on-premises and Online) alone lists the obsolete IMAP4 beside IMAP4rev1.
    if {"IMAP4", "IMAP4REV1", "AUTH=XOAUTH2"} <= caps:
        return Dialect.EXCHANGE
    return Dialect.GENERIC


# ---------------------------------------------------------------- answers


def throttle_delay_s(text: str, *, default_s: float = DEFAULT_THROTTLE_S) -> float | None:
    """The backoff a throttling answer asks for, in seconds; None when ``text`` is not one.

    ``Request is throttled. Suggested Backoff Time: 2000 milliseconds`` gives 2.0;
    ``[THROTTLED]`` or a throttling text without a time gives ``default_s``.  The result is
    capped at :data:`MAX_THROTTLE_S`.  Some servers put ``[THROTTLED]`` on a tagged OK
    (the command worked, but slow down): callers may apply it to OK texts as a pacing hint.
    """
    found = _BACKOFF.search(text)
    if found is not None:
        return min(int(found.group(1)) / 1000, MAX_THROTTLE_S)
    if _THROTTLED_CODE.search(text) or _THROTTLED_TEXT.search(text):
        return min(default_s, MAX_THROTTLE_S)
    return None


def not_connected_message(*, where: str, username: str, auth_type: str) -> str:
    """The operator's explanation of Exchange's "authenticated but not connected"."""
    causes = []
    if auth_type == "oauth2":
        causes.append(
            "the OAuth token lacks the IMAP scope (https://outlook.office.com/IMAP."
            "AccessAsUser.All, or for app-only access https://outlook.office365.com/.default "
            "with the service principal granted FullAccess on the mailbox)"
        )
    if is_shared_mailbox_login(username):
        causes.append(
            "the shared-mailbox login is wrong: use user@domain/shared@domain with the "
            "user's own password, and the user needs FullAccess on the shared mailbox"
        )
    else:
        causes.append(
            "for a shared mailbox, log in as user@domain/shared@domain (LOGIN), or with "
            "OAuth as the shared address with a token of a user who has FullAccess"
        )
    causes.append("the mailbox has IMAP disabled, is not licensed, or is not yet provisioned")
    causes.append("the account's connection cap is reached (Exchange Online allows 20)")
    return (
        f"{where}: Exchange says 'User is authenticated but not connected': "
        "the login succeeded but the mailbox could not be opened. Usual causes: "
        + "; ".join(causes)
    )


def classify_provider_answer(
    text: str, *, where: str = "", username: str = "", auth_type: str = "password"
) -> ImapError | None:
    """The error for a provider-specific answer, or None to leave it to the generic rules.

    ``text`` is the server's answer (an imaplib error's text; never a credential: callers
    pass what :func:`shardworker.imap.connect.classify_error` has already scrubbed).
    """
    prefix = f"{where}: " if where else ""
    delay = throttle_delay_s(text)
    if delay is not None:
        return ImapThrottledError(f"{prefix}server throttled us: {text}", retry_after_s=delay)
    if _GMAIL_BANDWIDTH.search(text):
        return ImapThrottledError(
            f"{prefix}Gmail's daily bandwidth limit is used up: {text}",
            retry_after_s=GMAIL_BANDWIDTH_BACKOFF_S,
        )
    if _NOT_CONNECTED.search(text):
        return ImapAuthError(
            not_connected_message(where=where or "server", username=username, auth_type=auth_type),
            code="not_connected",
        )
    if _GMAIL_CONN_CAP.search(text):
        return ImapTransientError(
            f"{prefix}Gmail's limit of 15 connections per account is reached "
            f"(lower SHARDWORKER_MAX_CONNECTIONS_PER_ACCOUNT or watch All Mail): {text}",
            reason="limit",
        )
    if _GMAIL_APP_PASSWORD.search(text):
        return ImapAuthError(
            f"{prefix}Gmail wants an app password (the account has 2-step verification): "
            "create one under Google Account > Security > App passwords, or use OAuth",
            code="app_password_required",
        )
    if _GMAIL_WEB_LOGIN.search(text):
        return ImapAuthError(
            f"{prefix}Gmail wants a web login first (a security check): sign in once in a "
            "browser from this network, or use OAuth",
            code="web_login_required",
        )
    return None


# ---------------------------------------------------------------- login


def is_shared_mailbox_login(username: str) -> bool:
    """Exchange's shared-mailbox forms: ``user@dom/shared@dom`` or ``DOM\\user\\shared``."""
    return "/" in username or "\\" in username


def password_mechanism(
    username: str, secret: str, capabilities: Iterable[str | bytes]
) -> Literal["login", "plain"]:
    """LOGIN or AUTHENTICATE PLAIN for a password login.

    LOGIN by default; PLAIN when the server disables LOGIN or the credentials are not
    ASCII (imaplib sends LOGIN's arguments as ASCII).  A shared-mailbox name always uses
    LOGIN: Exchange refuses such names over PLAIN.  A shared-mailbox name with non-ASCII
    credentials fits neither, so it raises an ImapAuthError that says what to change.
    """
    caps = {_text(c).upper() for c in capabilities}
    ascii_only = (username + secret).isascii()
    if not is_shared_mailbox_login(username):
        return "plain" if "LOGINDISABLED" in caps or not ascii_only else "login"
    if ascii_only and "LOGINDISABLED" not in caps:
        return "login"
    raise ImapAuthError(
        "a shared-mailbox login (user/shared) needs LOGIN, which "
        + (
            "this server disables"
            if "LOGINDISABLED" in caps
            else "cannot carry non-ASCII credentials"
        )
        + ", and Exchange refuses it over AUTHENTICATE PLAIN: use an ASCII password or OAuth",
        code="unsupported_mechanism",
    )


# ---------------------------------------------------------------- Gmail folders


def all_mail_folder(listing: Sequence[Sequence[Any]]) -> str | None:
    """The selectable folder flagged ``\\All`` in imapclient's ``LIST`` answer, decoded.

    Gmail localises the name (``[Gmail]/All Mail``, ``[Gmail]/Alle Nachrichten``,
    ``[Google Mail]/Tous les messages``); the flag is the same everywhere.
    """
    for flags, _delimiter, name in listing:
        lowered = {_text(f).lower() for f in flags}
        if "\\all" in lowered and not lowered & {"\\noselect", "\\nonexistent"}:
            return str(decode_utf7(name)) if isinstance(name, bytes) else str(name)
    return None


# Special-use flags (RFC 6154) and the system label Gmail shows in X-GM-LABELS for them.
_SYSTEM_LABELS = {
    "\\sent": "\\Sent",
    "\\flagged": "\\Starred",
    "\\important": "\\Important",
    "\\drafts": "\\Draft",
}


def labels_for_folders(listing: Sequence[Sequence[Any]], folders: Iterable[str]) -> frozenset[str]:
    """The X-GM-LABELS that stand for ``folders`` (resolved names) when All Mail is watched.

    INBOX is ``\\Inbox``; a special-use folder is its system label (``\\Sent``,
    ``\\Starred``...); any other folder is a user label of the same name.
    """
    flags_of = {
        (str(decode_utf7(name)) if isinstance(name, bytes) else str(name)): {
            _text(f).lower() for f in flags
        }
        for flags, _delimiter, name in listing
    }
    out = set()
    for folder in folders:
        if folder.upper() == "INBOX":
            out.add("\\Inbox")
            continue
        system = [_SYSTEM_LABELS[f] for f in flags_of.get(folder, ()) if f in _SYSTEM_LABELS]
        out.add(system[0] if system else folder)
    return frozenset(out)


def wanted_in_all_mail(attrs: GmailAttrs, labels: frozenset[str]) -> bool:
    """Whether a message seen in All Mail carries one of the watched folders' labels.

    All Mail holds sent and archived mail too: publishing it all would turn the helpdesk's
    own replies into tickets.  Labels compare case-insensitively (Gmail answers ``\\Inbox``
    or ``INBOX`` depending on the account's age).
    """
    wanted = {label.casefold() for label in labels}
    return any(label.casefold() in wanted for label in attrs.labels) or (
        "\\inbox" in wanted and "inbox" in {label.casefold() for label in attrs.labels}
    )


# ---------------------------------------------------------------- Gmail FETCH attributes


@dataclass(frozen=True)
class GmailAttrs:
    """A message's Gmail identity: the account-wide message id, thread id and labels."""

    msgid: int
    thrid: int | None
    labels: tuple[str, ...]

    @property
    def dedupe_key(self) -> str:
        """The cross-folder identity: the same message in two labels has one X-GM-MSGID."""
        return f"gm:{self.msgid}"


def meta_fetch_items(dialect: Dialect) -> str:
    """The item list of the metadata ``UID FETCH n:*`` for this server."""
    items = BASE_META_ITEMS + (GMAIL_FETCH_ITEMS if dialect is Dialect.GMAIL else ())
    return "(" + " ".join(items) + ")"


def gmail_attrs(item: Mapping[bytes, Any]) -> GmailAttrs | None:
    """The X-GM attributes of one imapclient FETCH item; None without a usable X-GM-MSGID."""
    msgid = _as_id(item.get(b"X-GM-MSGID"))
    if msgid is None:
        return None
    labels = item.get(b"X-GM-LABELS") or ()
    if isinstance(labels, (bytes, str, int)):
        labels = (labels,)
    return GmailAttrs(
        msgid=msgid,
        thrid=_as_id(item.get(b"X-GM-THRID")),
        labels=tuple(_label(v) for v in labels),
    )


def apply_gmail(email_data: Mapping[str, Any], attrs: GmailAttrs) -> dict[str, Any]:
    """``emailData`` with the Gmail identity: a new dict, the input is left alone.

    * ``threadId`` falls back to the decimal X-GM-THRID when the message has no
      References / In-Reply-To (Alga's own rule gave it none).
    * ``headers`` gets ``x-shardworker-gmail-msgid`` / ``-thrid`` (decimal strings) and
      ``x-shardworker-gmail-labels`` (a JSON array of label names: labels may hold commas).
    """
    data = dict(email_data)
    if "threadId" not in data and attrs.thrid is not None:
        data["threadId"] = str(attrs.thrid)
    headers = {
        k: v
        for k, v in dict(data.get("headers") or {}).items()
        if not k.startswith("x-shardworker-gmail-")
    }
    headers[HEADER_GMAIL_MSGID] = str(attrs.msgid)
    if attrs.thrid is not None:
        headers[HEADER_GMAIL_THRID] = str(attrs.thrid)
    headers[HEADER_GMAIL_LABELS] = json.dumps(list(attrs.labels), ensure_ascii=False)
    data["headers"] = headers
    return data


def _as_id(value: Any) -> int | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 < number < 2**64 else None


def _label(value: Any) -> str:
    # Gmail sends labels as atoms or quoted strings, non-ASCII ones in modified UTF-7.
    if isinstance(value, bytes):
        return str(decode_utf7(value))
    return str(value)


def _text(value: str | bytes) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value
