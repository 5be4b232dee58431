"""Request models of the HTTP admin API: the shapes of the JSON bodies, for the OpenAPI
document and a first check that names the field.

They check types and ranges only.  The rules that need more (host syntax, folder lists,
auth-type combinations, secrets) stay in ``validate.py``, which the CLI shares and which
runs again on every body: one source of truth for what a provider may be.  A model never
rejects what ``validate.py`` would accept.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shardworker.admin.validate import MAX_EMAILS_PER_SYNC, MAX_FOLDERS

_STRICT = ConfigDict(extra="forbid", strict=True)

Port = Annotated[int, Field(ge=1, le=65535)]
PerSync = Annotated[int, Field(ge=1, le=MAX_EMAILS_PER_SYNC)]
TimeoutMs = Annotated[int, Field(ge=100, le=300_000)]
Text = Annotated[str, Field(max_length=255)]
Secret = Annotated[str, Field(json_schema_extra={"writeOnly": True, "format": "password"})]
Folders = Annotated[list[str], Field(max_length=MAX_FOLDERS)]
# Formats for the document (and the fuzzer); validate.py checks them.
Uuid = Annotated[str, Field(json_schema_extra={"format": "uuid"})]
Mailbox = Annotated[str, Field(max_length=255, json_schema_extra={"format": "email"})]
Host = Annotated[str, Field(json_schema_extra={"format": "hostname"})]
WaitS = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _ProviderFields(BaseModel):
    model_config = _STRICT

    provider_name: Text | None = None
    secure: bool | None = None
    allow_starttls: bool | None = None
    auth_type: Literal["password", "oauth2"] | None = None
    folder_filters: Folders | None = None
    max_emails_per_sync: PerSync | None = None
    auto_process_emails: bool | None = None
    is_active: bool | None = None
    connection_timeout_ms: TimeoutMs | None = None
    oauth_token_url: str | None = None
    oauth_client_id: str | None = None
    oauth_scopes: str | None = None
    token_expires_at: str | None = None
    password: Secret | None = None
    oauth_client_secret: Secret | None = None
    refresh_token: Secret | None = None
    access_token: Secret | None = None


class NewProvider(_ProviderFields):
    """``POST /v1/providers``: a new provider; see docs/admin.md for every rule."""

    tenant: Uuid
    provider_id: Uuid | None = None
    mailbox: Mailbox
    host: Host
    port: Port
    username: str


class ProviderPatch(_ProviderFields):
    """``PATCH /v1/providers/{id}``: any subset of the fields; a secret ``null`` deletes it.

    ``tenant`` and ``provider_id`` are accepted only to be refused by name (they cannot
    change).
    """

    tenant: Uuid | None = None
    provider_id: Uuid | None = None
    mailbox: Mailbox | None = None
    host: Host | None = None
    port: Port | None = None
    username: str | None = None


class WaitBody(BaseModel):
    """pause, resume, reconnect: wait up to ``wait_s`` seconds (capped at 120) for the effect."""

    model_config = _STRICT

    wait_s: WaitS | None = None


class ResyncBody(WaitBody):
    """resync to now, or with ``since`` (ISO date or timestamp) a backfill of older mail."""

    folder: str | None = None
    since: str | None = None


def given(model: BaseModel | None) -> dict[str, Any] | None:
    """The fields the client sent (an explicit null included), as the service takes them."""
    return None if model is None else model.model_dump(exclude_unset=True)
