"""The one place URLs and DSNs are made safe to show: structure, not string matching.

A password may hold any character, ``@`` and ``/`` included, so the user information is
taken to run to the *last* ``@`` of the address: a URL whose query holds an ``@`` loses
a little more than it must, never a secret's tail.  Key/value DSNs
(``host=db password=...``) lose their password value.
"""

from __future__ import annotations

import os
import re

HIDDEN = "***"
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with any user name and password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _KV_PASSWORD.sub(lambda m: m.group(1) + HIDDEN, url)
    at = rest.rfind("@")
    if at < 0:
        return url
    return f"{scheme}://{HIDDEN}@{rest[at + 1 :]}"


def redact_text(text: str, urls: tuple[str, ...]) -> str:
    """``text`` with every occurrence of each URL (and of its password) redacted."""
    for url in urls:
        if url and url in text:
            text = text.replace(url, redact_url(url))
        for secret in _password_forms(_password_of(url)):
            text = text.replace(secret, HIDDEN)
    return text


def _password_forms(password: str) -> list[str]:
    """The password, and each tail after an ``@`` in it (what a parser that split at the
    first ``@`` would show as part of the host name)."""
    forms = [password] if len(password) >= 3 else []
    forms += [tail for tail in password.split("@")[1:] if len(tail) >= 3]
    return sorted(forms, key=len, reverse=True)


def _password_of(url: str) -> str:
    _, sep, rest = url.partition("://")
    if not sep:
        m = _KV_PASSWORD.search(url)
        return m.group(2).strip("'") if m else ""
    at = rest.rfind("@")
    if at < 0:
        return ""
    _, colon, password = rest[:at].partition(":")
    return password if colon else ""


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a libpq DSN, for messages; never any part of a password."""
    _, sep, rest = dsn.partition("://")
    if not sep:
        fields = {m.group(1): m.group(2).strip("'") for m in _KV_FIELD.finditer(dsn)}
        host, port, db = fields.get("host", "localhost"), fields.get("port", "5432"), ""
        return f"{host}:{port}/{fields.get('dbname', db)}"
    hostpart = rest[rest.rfind("@") + 1 :]
    authority, _, path = hostpart.partition("/")
    return f"{authority or 'localhost'}/{path.split('?', 1)[0]}"


_KV_FIELD = re.compile(r"(host|port|dbname)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def redact_configured(text: str, environ: dict[str, str] | None = None) -> str:
    """``text`` with the configured DSN and Redis URL redacted (for boot failures, where
    settings may not have loaded)."""
    env = dict(os.environ) if environ is None else environ
    urls = tuple(env.get(k, "") for k in ("SHARDWORKER_DATABASE_URL", "SHARDWORKER_REDIS_URL"))
    return redact_text(text, urls)
