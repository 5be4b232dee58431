"""The dead-letter stream for the console: list, one entry's raw message, and replay.

**Replay** sends one dead-lettered message through the normal exactly-once path, e.g.
after a parser fix:

1. The ledger row of the UID is locked (``FOR UPDATE``) for the whole replay, so two
   replays of one entry queue up; a row no longer ``dead_lettered`` means it was replayed
   already (409).
2. The stored raw message is parsed again.  If it still fails, nothing changes.
3. A Message-ID the provider already published (ledger, any folder) makes it a duplicate.
4. The UID's dedupe key is cleared only while it still holds this entry's mark
   (``dlq:<id>``), and the event goes through ``publish.lua`` unchanged: the per-UID and
   per-Message-ID keys decide atomically, so a concurrent publish of the same UID by
   the owner ends as one event and one duplicate, never two events.
5. The ledger row becomes ``published`` (or ``duplicate``) with the stream id.

Entries without a stored raw message (too large, or nothing fetched) cannot be replayed
here: a backfill (``resync`` with ``since``) fetches them from the server again.  The entry
stays in the stream as the record of what happened.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from shardworker.config import Settings
from shardworker.db.store import Pool, Store
from shardworker.errors import ConflictError, NotFoundError, ParseError
from shardworker.logs import get_logger
from shardworker.mime import Caps, build_payload, parse_message
from shardworker.sink.base import Outbound, Settled
from shardworker.sink.redis_streams import RedisStreamsSink, uid_key

log = get_logger(__name__)

_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
# KEYS[1] the UID's dedupe key; ARGV[1] the mark it must still hold.  Returns 1 if deleted.
_CLEAR_MARK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
_LOCK_ROW = """
SELECT status FROM shardworker_ledger
WHERE tenant = %(tenant)s::uuid AND provider_id = %(pid)s::uuid AND folder = %(folder)s
  AND uid_validity = %(uv)s AND uid = %(uid)s
FOR UPDATE
"""
_SET_ROW = """
UPDATE shardworker_ledger SET status = %(status)s, stream_id = %(stream_id)s,
       message_id = %(message_id)s, reason = %(reason)s
WHERE tenant = %(tenant)s::uuid AND provider_id = %(pid)s::uuid AND folder = %(folder)s
  AND uid_validity = %(uv)s AND uid = %(uid)s
"""


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str
    fields: dict[str, str]

    @property
    def has_raw(self) -> bool:
        return bool(self.fields.get("raw_base64"))

    def public(self) -> dict[str, Any]:
        """Everything but the raw message (downloaded separately)."""
        shown = {k: v for k, v in self.fields.items() if k != "raw_base64"}
        return {"entry_id": self.entry_id, **shown, "has_raw": self.has_raw}

    def raw(self) -> bytes:
        if not self.has_raw:
            raise ConflictError("this dead letter keeps no raw message (a pointer only)")
        return base64.b64decode(self.fields["raw_base64"])


def _decode(entry_id: Any, raw: Any) -> DeadLetter:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    fields = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    return DeadLetter(text, fields)


def _replay_reason(entry_id: str) -> str:
    return f"replayed from dead letter {entry_id}"


class DeadLetters:
    def __init__(self, settings: Settings, pool: Pool, client: redis.Redis) -> None:
        self.settings = settings
        self.pool = pool
        self.client = client
        self.store = Store(pool)
        self._clear = client.register_script(_CLEAR_MARK)

    def length(self) -> int:
        return int(self.client.xlen(self.settings.dlq_stream))

    def page(self, before: str | None = None, count: int = 50) -> list[DeadLetter]:
        """Newest first; ``before`` is the last entry id of the previous page."""
        high = f"({before}" if before and _ENTRY_ID.fullmatch(before) else "+"
        found: Any = self.client.xrevrange(self.settings.dlq_stream, high, "-", count=count)
        return [_decode(eid, fields) for eid, fields in found]

    def of_provider(self, provider_id: str, limit: int = 10, scan: int = 1000) -> list[DeadLetter]:
        found: Any = self.client.xrevrange(self.settings.dlq_stream, "+", "-", count=scan)
        letters = [_decode(eid, fields) for eid, fields in found]
        return [d for d in letters if d.fields.get("provider_id") == provider_id][:limit]

    def replayed(self, letters: list[DeadLetter]) -> set[str]:
        """The entries among ``letters`` that a replay has published (or found duplicate)."""
        marks = {_replay_reason(d.entry_id): d.entry_id for d in letters}
        if not marks:
            return set()
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT reason FROM shardworker_ledger WHERE reason = ANY(%s)", (list(marks),)
            ).fetchall()
        return {marks[r[0]] for r in rows}

    def get(self, entry_id: str) -> DeadLetter:
        if not _ENTRY_ID.fullmatch(entry_id):
            raise NotFoundError(f"dead letter {entry_id[:40]!r} not found")
        found: Any = self.client.xrange(self.settings.dlq_stream, entry_id, entry_id, count=1)
        if not found:
            raise NotFoundError(f"dead letter {entry_id} not found")
        return _decode(*found[0])

    def replay(self, entry_id: str) -> dict[str, Any]:
        letter = self.get(entry_id)
        f = letter.fields
        raw = letter.raw()
        tenant, pid, folder = f["tenant"], f["provider_id"], f["folder"]
        uv, uid = int(f["uid_validity"]), int(f["uid"])
        row = {"tenant": tenant, "pid": pid, "folder": folder, "uv": uv, "uid": uid}
        with self.pool.connection() as conn, conn.transaction():
            locked = conn.execute(_LOCK_ROW, row).fetchone()
            if locked is not None and locked[0] != "dead_lettered":
                raise ConflictError(f"dead letter {entry_id} was replayed already ({locked[0]})")
            outbound = self._outbound(letter, raw)
            status, stream_id = self._publish(outbound, entry_id)
            if locked is not None:
                change = {"status": status, "stream_id": stream_id,
                          "message_id": outbound.message_id,
                          "reason": _replay_reason(entry_id)}  # fmt: skip
                conn.execute(_SET_ROW, {**row, **change})
        if locked is not None:  # committed: the ledger answers for it now
            settled = Settled(tenant, pid, folder, uv, uid, outbound.message_id)
            RedisStreamsSink(self.client, self.settings).settle([settled])
        log.info("dead_letter_replayed", provider_id=pid, folder=folder, uid=uid,
                 entry_id=entry_id, status=status)  # fmt: skip
        return {"entry_id": entry_id, "status": status, "stream_id": stream_id,
                "message_id": outbound.message_id}  # fmt: skip

    def _outbound(self, letter: DeadLetter, raw: bytes) -> Outbound:
        f = letter.fields
        tenant, pid, folder = f["tenant"], f["provider_id"], f["folder"]
        uv, uid = int(f["uid_validity"]), int(f["uid"])
        provider = self.store.load_provider(tenant, pid)
        if provider is None:
            raise NotFoundError(f"provider {pid} not found (removed since?)")
        try:
            mail = parse_message(raw, uid=uid, mailbox=provider.mailbox, internal_date=None,
                                 caps=Caps.from_settings(self.settings))  # fmt: skip
        except ParseError as exc:
            raise ConflictError(f"the message still does not parse: {exc}") from None
        now = datetime.now(UTC)
        payload = build_payload(tenant=tenant, provider_id=pid, email_data=mail.email_data,
                                occurred_at=now)  # fmt: skip
        return Outbound(tenant=tenant, provider_id=pid, mailbox=provider.mailbox, folder=folder,
                        uid_validity=uv, uid=uid, message_id=mail.message_id, payload=payload,
                        event_time=now)  # fmt: skip

    def _publish(self, out: Outbound, entry_id: str) -> tuple[str, str | None]:
        known = self.store.known_message_ids(out.tenant, out.provider_id, [out.message_id])
        if out.message_id in known:
            return "duplicate", known[out.message_id]
        key = uid_key(out.tenant, out.provider_id, out.folder, out.uid_validity, out.uid)
        self._clear(keys=[key], args=["dlq:" + entry_id])
        [result] = RedisStreamsSink(self.client, self.settings).publish_batch([out], None)
        if result.dead_lettered:
            raise ConflictError("the UID is marked dead-lettered again by another entry")
        return ("duplicate" if result.duplicate else "published"), result.stream_id
