"""The admin side of commands: delivered to the worker that owns a provider, wherever it runs.

* the owner is the member the leader assigned the provider to, looked up by the
  provider's identity ``(tenant, provider_id)`` (provider ids are unique only within a
  tenant: a command for tenant A never goes to the owner of B's provider with that id);
* the command is written in the inbox's wire format (:mod:`shardworker.pool.inbox`) to that
  member's stream, its status (state ``queued``) into the status hash;
* ``wait`` polls the status; a command that the addressee rejected because it did not hold
  the lease (the provider moved, or the lease has not followed the assignment yet) is sent
  again, same id, to whoever owns the provider then (at most ``RESEND_LIMIT`` deliveries).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Mapping
from typing import Any

import redis

from shardworker.db.models import provider_key
from shardworker.errors import ConflictError, NotFoundError
from shardworker.logs import get_logger
from shardworker.pool.inbox import (
    OPS,
    STREAM_MAXLEN,
    TERMINAL,
    command_stream,
    decode_fields,
    status_key,
    wire_text,
    write_status,
)
from shardworker.pool.registry import Registry

log = get_logger(__name__)

RESEND_LIMIT = 5
RESEND_DELAY_S = 0.5


class CommandBus:
    def __init__(self, client: redis.Redis, *, poll_s: float = 0.1) -> None:
        self.client = client
        self.registry = Registry(client)
        self.poll_s = poll_s

    def owner(self, tenant: str, provider_id: str) -> str | None:
        """The member the provider ``(tenant, provider_id)`` is assigned to, if any."""
        return self.registry.owner_of(provider_key(tenant, provider_id))

    def send(
        self, tenant: str, provider_id: str, op: str, args: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Queue ``op`` for the provider's owner; ConflictError when nobody serves it."""
        if op not in OPS:
            raise ValueError(f"unknown command {op!r}")
        command_id = uuid.uuid4().hex
        fields = {"command_id": command_id, "op": op, "tenant": tenant,
                  "provider_id": provider_id, "args": dict(args), "created_at": time.time(),
                  "attempts": 0}  # fmt: skip
        return self._deliver(fields)

    def _deliver(self, fields: dict[str, Any]) -> dict[str, Any]:
        owner = self.owner(str(fields["tenant"]), str(fields["provider_id"]))
        if owner is None:
            raise ConflictError(
                f"provider {fields['provider_id']} is not served by any worker "
                "(paused, inactive, or no pool running)"
            )
        fields = {**fields, "owner": owner, "state": "queued", "detail": "",
                  "attempts": int(fields["attempts"]) + 1}  # fmt: skip
        write_status(self.client, str(fields["command_id"]), fields)
        entry = {k: wire_text(fields[k]) for k in
                 ("command_id", "op", "tenant", "provider_id", "args", "created_at")}  # fmt: skip
        self.client.xadd(
            command_stream(owner),
            entry,  # type: ignore[arg-type]
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )
        log.info("command_sent", command_id=fields["command_id"], op=fields["op"],
                 tenant=fields["tenant"], provider_id=fields["provider_id"],
                 owner=owner)  # fmt: skip
        return fields

    def status(self, command_id: str) -> dict[str, Any]:
        raw = self.client.hgetall(status_key(command_id))
        if not raw:
            raise NotFoundError(f"command {command_id} not found (or older than a day)")
        return decode_fields(raw)

    def wait(self, command_id: str, timeout_s: float) -> dict[str, Any]:
        """The status once terminal, or as it stands at the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(command_id)
            in_time = time.monotonic() < deadline
            if status["state"] == "rejected" and in_time and self._may_resend(status):
                # The assignment can move before the lease follows it: try again shortly,
                # to whoever owns the provider by then.
                time.sleep(RESEND_DELAY_S)
                self._resend(status)
            elif status["state"] in TERMINAL or not in_time:
                return status
            else:
                time.sleep(self.poll_s)

    @staticmethod
    def _may_resend(status: Mapping[str, Any]) -> bool:
        return int(status.get("attempts", 0)) < RESEND_LIMIT

    def _resend(self, status: dict[str, Any]) -> None:
        # Nobody owns it right now: the status stays rejected.
        with contextlib.suppress(ConflictError):
            self._deliver(status)
