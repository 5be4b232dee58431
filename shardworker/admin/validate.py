"""Validation of provider bodies (the JSON the CLI and the HTTP API share).

Every error is a ``ValidationError`` naming the field.  Validation is complete before
anything is written, so a refused request leaves nothing behind.  Secret values are
checked for shape only and never echoed in a message.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from shardworker.errors import ValidationError

AUTH_TYPES = ("password", "oauth2")
# Secrets a body may carry, by the kind SecretStore names them with.
SECRET_KINDS = ("password", "oauth_client_secret", "refresh_token", "access_token")
MAX_FOLDERS = 50
MAX_FOLDER_CHARS = 1000
MAX_SECRET_CHARS = 16384
MAX_EMAILS_PER_SYNC = 1000

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_MAILBOX = re.compile(r"[^@\s<>\"(),;:\\\[\]]+@[^@\s<>\"(),;:\\\[\]]+\.[^@\s<>\"(),;:\\\[\]]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


@dataclass
class ProviderFields:
    """A validated provider: column values and secrets (a value, or None to delete)."""

    values: dict[str, Any]
    secrets: dict[str, str | None] = field(default_factory=dict, repr=False)


# -- single fields -----------------------------------------------------------------------


def _text(name: str, value: Any, *, max_len: int = 255, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValidationError(name, "must be a string")
    text = value.strip()
    if not text and not allow_empty:
        raise ValidationError(name, "must not be empty")
    if len(text) > max_len:
        raise ValidationError(name, f"must be at most {max_len} characters")
    if _CONTROL.search(text):
        raise ValidationError(name, "must not contain control characters")
    return text


def _optional_text(name: str, value: Any, max_len: int = 255) -> str | None:
    return None if value is None else _text(name, value, max_len=max_len)


def _integer(name: str, value: Any, low: int, high: int) -> int:
    # bool is an int in Python; `true` is never a port.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, "must be an integer")
    if not low <= value <= high:
        raise ValidationError(name, f"must be between {low} and {high}")
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(name, "must be true or false")
    return value


def uuid_text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(name, "must be a uuid string")
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise ValidationError(name, "must be a uuid") from None


def host_name(name: str, value: Any) -> str:
    host = _text(name, value, max_len=253).rstrip(".")
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host.strip("[]")
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValidationError(name, "is not a valid host name") from None
    labels = ascii_host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValidationError(name, "must be a host name or IP address, without scheme or port")
    return host


def _mailbox(name: str, value: Any) -> str:
    text = _text(name, value)
    if not _MAILBOX.fullmatch(text):
        raise ValidationError(name, "must be an email address")
    return text


def _folders(name: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValidationError(name, "must be a list of folder names")
    if len(value) > MAX_FOLDERS:
        raise ValidationError(name, f"at most {MAX_FOLDERS} folders")
    out: list[str] = []
    for index, item in enumerate(value):
        folder = _text(f"{name}[{index}]", item, max_len=MAX_FOLDER_CHARS)
        if folder in out:
            raise ValidationError(f"{name}[{index}]", f"duplicate folder {folder!r}")
        out.append(folder)
    return out


def _token_url(name: str, value: Any) -> str | None:
    if value is None:
        return None
    url = _text(name, value, max_len=2000)
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValidationError(name, "must be an https URL")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        # The client secret and refresh token travel in the body: never in clear text,
        # except to a token endpoint on this machine.
        raise ValidationError(name, "must use https (http only for a loopback host)")
    return url


def _loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _timestamp(name: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(name, "must be an ISO-8601 timestamp")
    try:
        stamp = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(name, "must be an ISO-8601 timestamp") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def _secret(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_SECRET_CHARS:
        raise ValidationError(name, f"must be a non-empty string of at most {MAX_SECRET_CHARS}")
    if "\0" in value or "\r" in value or "\n" in value:
        raise ValidationError(name, "must not contain NUL or line breaks")
    return value


def _auth_type(name: str, value: Any) -> str:
    if value not in AUTH_TYPES:
        raise ValidationError(name, f"must be one of {list(AUTH_TYPES)}")
    return str(value)


# Column fields: parser per field (None means the field is set to NULL).
_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "tenant": uuid_text,
    "provider_id": uuid_text,
    "mailbox": _mailbox,
    "provider_name": _optional_text,
    "host": host_name,
    "port": lambda n, v: _integer(n, v, 1, 65535),
    "secure": _boolean,
    "allow_starttls": _boolean,
    "auth_type": _auth_type,
    "username": _text,
    "folder_filters": _folders,
    "max_emails_per_sync": lambda n, v: _integer(n, v, 1, MAX_EMAILS_PER_SYNC),
    "auto_process_emails": _boolean,
    "is_active": _boolean,
    "connection_timeout_ms": lambda n, v: None if v is None else _integer(n, v, 100, 300_000),
    "oauth_token_url": _token_url,
    "oauth_client_id": _optional_text,
    "oauth_scopes": lambda n, v: _optional_text(n, v, max_len=2000),
    "token_expires_at": _timestamp,
}
REQUIRED = ("tenant", "mailbox", "host", "port", "username")
DEFAULTS: Mapping[str, Any] = {
    "provider_name": None, "secure": True, "allow_starttls": False, "auth_type": "password",
    "folder_filters": [], "max_emails_per_sync": 50, "auto_process_emails": True,
    "is_active": True, "connection_timeout_ms": None, "oauth_token_url": None,
    "oauth_client_id": None, "oauth_scopes": None, "token_expires_at": None,
}  # fmt: skip
IMMUTABLE = ("tenant", "provider_id")
KNOWN = frozenset(_PARSERS) | frozenset(SECRET_KINDS)


# -- whole bodies ------------------------------------------------------------------------


def _parse(body: Any) -> ProviderFields:
    if not isinstance(body, dict):
        raise ValidationError("body", "must be a JSON object")
    for key in body:
        if key not in KNOWN:
            raise ValidationError(str(key), "unknown field")
    values = {k: _PARSERS[k](k, v) for k, v in body.items() if k in _PARSERS}
    secrets = {k: _secret(k, v) for k, v in body.items() if k in SECRET_KINDS}
    return ProviderFields(values, secrets)


def _check_auth(values: Mapping[str, Any], secrets: Mapping[str, str | None]) -> None:
    """Fields that only make sense for one auth type, and what oauth2 needs."""
    if values["auth_type"] == "password":
        for kind in ("oauth_client_secret", "refresh_token", "access_token"):
            if secrets.get(kind) is not None:
                raise ValidationError(kind, "only for auth_type oauth2")
        return
    if secrets.get("password") is not None:
        raise ValidationError("password", "not used with auth_type oauth2")
    for name in ("oauth_token_url", "oauth_client_id"):
        if not values.get(name):
            raise ValidationError(name, "required for auth_type oauth2 (token refresh)")


def validate_new(body: Any) -> ProviderFields:
    """A complete provider for ``add``: required fields present, defaults filled in."""
    parsed = _parse(body)
    for name in REQUIRED:
        if name not in parsed.values:
            raise ValidationError(name, "is required")
    values = {**DEFAULTS, **parsed.values}
    if not values.get("provider_name"):
        values["provider_name"] = values["mailbox"]
    _check_auth(values, parsed.secrets)
    return ProviderFields(values, {k: v for k, v in parsed.secrets.items() if v is not None})


def validate_patch(body: Any, current: Mapping[str, Any]) -> ProviderFields:
    """The changed fields of ``update``, checked together with what stays as it is."""
    parsed = _parse(body)
    if not parsed.values and not parsed.secrets:
        raise ValidationError("body", "no field to change")
    for name in IMMUTABLE:
        if name in parsed.values and parsed.values[name] != current.get(name):
            raise ValidationError(name, "cannot be changed")
    for name in REQUIRED:
        if name in parsed.values and parsed.values[name] is None:
            raise ValidationError(name, "is required")
    merged = {**current, **parsed.values}
    if "provider_name" in parsed.values and not merged.get("provider_name"):
        parsed.values["provider_name"] = merged["mailbox"]
    _check_auth(merged, parsed.secrets)
    changes = {k: v for k, v in parsed.values.items() if k not in IMMUTABLE}
    return ProviderFields(changes, parsed.secrets)
