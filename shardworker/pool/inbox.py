"""The worker's command inbox, and the wire format of admin commands.

The admin side (:class:`shardworker.admin.commands.CommandBus`) writes commands in this
format; this module is the only one that knows it, so neither side imports the other's
internals:

* the command goes to the owning member's stream ``sw:cmd:<member>`` and its status into
  the hash ``sw:cmdstatus:<command_id>`` (state ``queued``), kept for a day;
* :class:`CommandInbox`, served from the pool agent's assign loop, ``XREAD BLOCK``s on its
  own stream, then ``XDEL``s; :meth:`CommandInbox.wait` blocks in the same single read on
  the member's assignment note stream too, so that one blocking read is the loop's whole
  pause: it ends on a command, on a note that the share changed, or at the timeout;
* a command is applied only while this member holds the lease of exactly the provider it
  names, ``(tenant, provider_id)``: a provider of another tenant with the same id is a
  different provider (``rejected``, ``not_owner``); it goes through the engine's
  thread-safe methods, and progress and the result are written into the status hash.

States: ``queued`` → ``running`` → ``done`` | ``failed``; or ``rejected`` (not the owner),
``expired`` (found too late, e.g. after a restart).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

import orjson
import redis
from redis.typing import KeyT, StreamIdT

from shardworker.db.models import provider_key
from shardworker.db.store import Store
from shardworker.engine.loop import Engine
from shardworker.engine.resync import ResyncRequest
from shardworker.logs import get_logger

log = get_logger(__name__)

STREAM_PREFIX = "sw:cmd:"
STATUS_PREFIX = "sw:cmdstatus:"
STATUS_TTL_S = 86_400
STREAM_MAXLEN = 1000
STALE_AFTER_S = 300.0
OPS = frozenset({"reconnect", "resync"})
TERMINAL = frozenset({"done", "failed", "rejected", "expired"})


def command_stream(member: str) -> str:
    return STREAM_PREFIX + member


def status_key(command_id: str) -> str:
    return STATUS_PREFIX + command_id


def wire_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return orjson.dumps(value).decode()


def write_status(client: redis.Redis, command_id: str, fields: Mapping[str, Any]) -> None:
    values = {k: wire_text(v) for k, v in fields.items()}
    values["updated_at"] = wire_text(time.time())
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(status_key(command_id), mapping=values)  # type: ignore[arg-type]
        pipe.expire(status_key(command_id), STATUS_TTL_S)
        pipe.execute()


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode_fields(raw: Mapping[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name, text = _str(key), _str(value)
        if name in ("args", "folders"):
            out[name] = orjson.loads(text)
        elif text.lstrip("-").isdigit():
            out[name] = int(text)
        else:
            out[name] = text
    return out


class Owner(Protocol):
    """What the inbox needs from the pool agent."""

    def holds(self, provider: str) -> bool: ...

    def invalidate_configs(self) -> None: ...


class CommandInbox:
    def __init__(
        self, client: redis.Redis, store: Store, engine: Engine, member: str, *, owner: Owner,
        clock: Callable[[], float] = time.time, reader: redis.Redis | None = None,
    ) -> None:  # fmt: skip
        self.client = client
        # The blocking read's own client: its socket timeout must exceed the longest block.
        self.reader = client if reader is None else reader
        self.store = store
        self.engine = engine
        self.member = member
        self.owner = owner
        self.clock = clock
        self.stream = command_stream(member)
        # From the start: commands queued while this member restarted are still served.
        self._last_id = "0-0"
        self._notes_last = "0-0"

    def serve(self, block_s: float) -> int:
        """Wait up to ``block_s`` for commands and apply them; returns how many arrived."""
        return self._read(block_s, None)[0]

    def wait(self, block_s: float, notes: str) -> bool:
        """Wait up to ``block_s`` for a command (applied) or an entry on the ``notes``
        stream, in one blocking read; returns whether a note arrived."""
        return self._read(block_s, notes)[1]

    def _read(self, block_s: float, notes: str | None) -> tuple[int, bool]:
        streams: dict[KeyT, StreamIdT] = {self.stream: self._last_id}
        if notes is not None:
            streams[notes] = self._notes_last
        got: list[tuple[Any, list[tuple[Any, Any]]]] = self.reader.xread(  # type: ignore[assignment]
            streams, count=50, block=max(1, int(block_s * 1000))
        )
        count, noted = 0, False
        for stream, entries in got or ():
            if _str(stream) == notes:
                self._notes_last, noted = _str(entries[-1][0]), True
                continue
            for entry_id, fields in entries:
                self._last_id = _str(entry_id)
                self.handle(decode_fields(fields))
                self.client.xdel(self.stream, self._last_id)
                count += 1
        return count, noted

    def handle(self, command: dict[str, Any]) -> None:
        cid, pid = str(command["command_id"]), str(command["provider_id"])
        tenant = str(command.get("tenant", ""))
        fields = {"command_id": cid, "tenant": tenant, "provider_id": pid, "owner": self.member}
        if self.clock() - float(command["created_at"]) > STALE_AFTER_S:
            write_status(self.client, cid, {**fields, "state": "expired"})
            return
        if not tenant or not self.owner.holds(provider_key(tenant, pid)):
            write_status(self.client, cid, {**fields, "state": "rejected",
                                            "detail": "not_owner"})  # fmt: skip
            return
        log.info("command_received", command_id=cid, op=command["op"], provider_id=pid,
                 tenant=tenant)  # fmt: skip
        write_status(self.client, cid, {**fields, "state": "running"})
        try:
            self._apply(cid, tenant, pid, str(command["op"]), command["args"])
        except Exception as exc:
            log.warning("command_failed", command_id=cid, provider_id=pid,
                        error_type=type(exc).__name__, error=str(exc))  # fmt: skip
            write_status(self.client, cid, {"state": "failed", "detail": str(exc)})

    def _apply(self, cid: str, tenant: str, pid: str, op: str, args: dict[str, Any]) -> None:
        if op == "reconnect":
            # Re-read the row now: a password or host change must be used at once, and
            # the agent's cached copy must not restart the provider with the old one.
            self.owner.invalidate_configs()
            config = self.store.load_provider(tenant, pid)
            key = provider_key(tenant, pid)
            self.engine.reconnect_provider(key, config, lambda ok: self._reconnected(cid, ok))
        elif op == "resync":
            since = args.get("since")
            request = ResyncRequest(
                folder=args.get("folder"),
                since=datetime.fromisoformat(since) if since else None,
                report=lambda state, fields: self._progress(cid, state, fields),
            )
            self.engine.resync_provider(provider_key(tenant, pid), request)
        else:
            raise ValueError(f"unknown command {op!r}")

    def _reconnected(self, cid: str, ok: bool) -> None:
        state = "done" if ok else "failed"
        detail = "connections closed and reopening" if ok else "provider not served here"
        write_status(self.client, cid, {"state": state, "detail": detail})

    def _progress(self, cid: str, state: str, fields: Mapping[str, Any]) -> None:
        detail = str(fields.get("error", ""))
        write_status(self.client, cid, {**fields, "state": state, "detail": detail})
