"""One blocking cycle of a folder slot, run on a sync thread.

connect (if needed) → resolve folders (first slot) → EXAMINE → cursor policy → leave IDLE
→ drain → enter IDLE (or poll).  The cycle returns an outcome; the loop thread decides
what happens next.  Every error is classified here, once.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Literal

from shardworker.config import Settings
from shardworker.db.store import FolderCursor, Store
from shardworker.engine.state import ProviderRuntime, Slot
from shardworker.engine.sync import FolderSync, SyncContext, SyncResult
from shardworker.errors import FolderError, ShardworkerError
from shardworker.imap.connect import (
    Credentials,
    capabilities,
    classify_error,
    open_client,
    security_mode,
)
from shardworker.imap.folders import resolve_folders
from shardworker.imap.session import FolderStatus
from shardworker.mime import Caps
from shardworker.publish import Publisher
from shardworker.secrets.store import SecretStore, secret_name

OutcomeKind = Literal["idle", "poll", "backpressure", "stopped", "error"]


@dataclass
class Outcome:
    kind: OutcomeKind
    buffered: bool = False
    cursor: FolderCursor | None = None
    status: FolderStatus | None = None
    result: SyncResult | None = None
    error: ShardworkerError | None = None
    connected_now: bool = False
    capabilities: tuple[str, ...] = ()
    other_folders: tuple[str, ...] = ()
    missing_folders: tuple[str, ...] = ()


@dataclass(frozen=True)
class CycleDeps:
    settings: Settings
    store: Store
    secrets: SecretStore
    publisher: Publisher
    caps: Caps
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)


def load_credentials(deps: CycleDeps, provider: ProviderRuntime) -> Credentials:
    cached = provider.credentials
    if cached is not None:
        return cached
    cfg = provider.config
    if cfg.auth_type == "oauth2":
        name = secret_name("access_token", cfg.provider_id)
        creds = Credentials(
            "oauth2", cfg.username, deps.secrets.get(cfg.tenant, cfg.provider_id, name)
        )
    else:
        name = secret_name("password", cfg.provider_id)
        creds = Credentials(
            "password", cfg.username, deps.secrets.get(cfg.tenant, cfg.provider_id, name)
        )
    provider.credentials = creds
    return creds


class Cycle:
    def __init__(self, deps: CycleDeps) -> None:
        self.deps = deps

    def run(self, slot: Slot) -> Outcome:
        try:
            return self._run(slot)
        except ShardworkerError as exc:
            return Outcome("error", error=exc, cursor=slot.cursor, status=slot.status)
        except Exception as exc:
            return Outcome(
                "error", error=classify_error(exc), cursor=slot.cursor, status=slot.status
            )

    def _run(self, slot: Slot) -> Outcome:
        out = Outcome("idle", cursor=slot.cursor, status=slot.status)
        if not slot.connected:
            self._connect(slot, out)
        elif slot.session.idling:
            slot.session.leave_idle()
        elif not slot.session.has_idle:
            slot.session.poll()
        if slot.want_stop:
            slot.session.close(logout=True)
            out.kind = "stopped"
            return out
        sync = FolderSync(self._context(slot.provider), slot.session)
        assert out.cursor is not None
        out.cursor, out.result = sync.drain(out.cursor)
        if out.result.backpressured:
            out.kind = "backpressure"
            return out
        if slot.session.has_idle:
            out.buffered = slot.session.enter_idle()
        else:
            out.kind = "poll"
        return out

    def _context(self, provider: ProviderRuntime) -> SyncContext:
        d = self.deps
        return SyncContext(
            d.settings,
            d.store,
            d.publisher,
            d.caps,
            provider.config,
            provider.fence,
            provider.epoch,
        )

    def _connect(self, slot: Slot, out: Outcome) -> None:
        d, cfg = self.deps, slot.provider.config
        creds = load_credentials(d, slot.provider)
        connect_timeout = (
            cfg.connection_timeout_ms / 1000
            if cfg.connection_timeout_ms
            else d.settings.connect_timeout_s
        )
        client = open_client(
            cfg.host,
            cfg.port,
            security_mode(cfg.secure, cfg.allow_starttls),
            creds,
            timeout_s=d.settings.net_timeout_s,
            connect_timeout_s=connect_timeout,
            ssl_context=d.ssl_context,
        )
        caps = capabilities(client)
        slot.session.attach(client, caps)
        out.connected_now, out.capabilities = True, caps
        if slot.resolving:
            self._adopt_folder(slot, out)
        out.status = slot.session.examine()
        sync = FolderSync(self._context(slot.provider), slot.session)
        known = (
            slot.cursor
            if slot.cursor is not None
            else slot.provider.config.cursors.get(slot.folder)
        )
        out.cursor = sync.ensure_cursor(known, out.status)

    def _adopt_folder(self, slot: Slot, out: Outcome) -> None:
        filters = slot.provider.config.folder_filters
        client = slot.session.client
        assert client is not None
        resolution = resolve_folders(client, filters)
        out.missing_folders = tuple(resolution.missing) + tuple(resolution.unselectable)
        folders = list(resolution.folders)
        if not folders:
            raise FolderError(f"no selectable folder matches {list(filters)}")
        slot.session.folder = folders[0]
        out.other_folders = tuple(folders[1:])
