"""The Redis Streams sink (``SHARDWORKER_SINK=redis-streams``): Alga's stream layout,
exactly-once Lua, dead letters, backpressure.

Every message is one EVALSHA of ``lua/publish.lua``; a batch is one pipelined round trip.
The script checks the lease token (fencing), then, for a message that carries a
:class:`~shardworker.sink.base.RateCheck`, the sender's rate window (the loop guard's
check, made here so that the push path pays no round trip for it: a held message writes
nothing), then two dedupe keys: the UID key answers
"this UID was published" and the Message-ID key answers "this message was published from
another folder".  Either hit returns the original stream id and writes nothing, so a
batch retried after a crash (or a redis-py connection retry) never publishes twice.
All JSON is built here with orjson, whose compact output equals JS ``JSON.stringify``.

The Lua scripts touch keys in different hash slots: shardworker targets a single Redis
(or a primary with replicas), like Alga itself, not Redis Cluster.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from shardworker import metrics
from shardworker.config import Settings
from shardworker.errors import ConfigError, FencedError, PublishError
from shardworker.logs import get_logger
from shardworker.luasource import lua_source
from shardworker.redisconn import STALE_REQUEST_S, watch_failures
from shardworker.sink.base import (
    DeadLetter,
    Fence,
    Outbound,
    PublishResult,
    RateCheck,
    Settled,
)
from shardworker.sink.replication import ReplicaWait

log = get_logger(__name__)

WORKFLOW_STREAM = "workflow:events:global"
WORKFLOW_GROUP = "workflow-processors"
EVENT_BUS_GROUP = "event-processors"
EVENT_BUS_CHANNEL = "global"
POINTER_QUEUE = "email:inbound:unified:pointer:ready"
EVENT_TYPE = "INBOUND_EMAIL_RECEIVED"
POINTER_MAX_ATTEMPTS = 5

# The UUIDv5 namespace of event ids (docs/DESIGN.md, "Stream layout"; the contract notes).
# Fixed for good: changing it would give every message already published a new identity.
EVENT_ID_NAMESPACE = uuid.UUID("def6c723-9e54-4f8e-b707-e8205deb568b")

_STATUS_WRITTEN, _STATUS_DUPLICATE, _STATUS_DEAD_LETTERED, _STATUS_HELD = 0, 1, 2, 3
_URL_CREDENTIALS = re.compile(r"(//)[^/@\s]*@")


def uid_key(tenant: str, provider_id: str, folder: str, uid_validity: int, uid: int) -> str:
    """The per-UID dedupe key.  It carries the tenant: provider ids are unique per tenant
    only, and two tenants' providers must never answer for each other."""
    return f"sw:pub:{{{tenant}:{provider_id}}}:{folder}:{uid_validity}:{uid}"


def event_id_for(tenant: str, provider_id: str, folder: str, uid_validity: int, uid: int) -> str:
    """The message's ``event_id``: UUIDv5 (RFC 9562) of ``tenant:provider_id:folder:
    uid_validity:uid`` in :data:`EVENT_ID_NAMESPACE`.

    Deterministic, so a message published again (a Redis failover lost the entry and its
    dedupe keys after a consumer had read it) carries the same id, and a consumer that
    dedupes on ``event_id`` (Alga's workflow runtime does) drops the second copy.  The name
    is unambiguous: tenant and provider are uuids, the last two fields integers, so a ``:``
    in the folder cannot make two messages collide.  Encoded as UTF-8 with
    ``surrogatepass`` (a folder name decoded from a server's bytes may hold a lone
    surrogate); otherwise exactly ``uuid.uuid5``.
    """
    name = f"{tenant}:{provider_id}:{folder}:{uid_validity}:{uid}"
    digest = hashlib.sha1(EVENT_ID_NAMESPACE.bytes + name.encode("utf-8", "surrogatepass"))
    return str(uuid.UUID(bytes=digest.digest()[:16], version=5))


def message_id_key(tenant: str, provider_id: str, message_id: str) -> str:
    digest = hashlib.sha1(message_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sw:mid:{{{tenant}:{provider_id}}}:{digest}"


def event_bus_stream(settings: Settings) -> str:
    return f"{settings.redis_prefix}{settings.event_stream_prefix}{EVENT_BUS_CHANNEL}:{EVENT_TYPE}"


# Set by the leader's housekeeping (sink/housekeeping.py) while the workflow stream is over
# SHARDWORKER_STREAM_MAX_BYTES; expires by itself.  Read by every backpressure check.
FULL_FLAG = "sw:footprint:full"


def dlq_bytes_key(dlq_stream: str) -> str:
    """The dead-letter stream's byte counter (``lua/dead_letter.lua``)."""
    return f"{dlq_stream}:bytes"


def iso_ms(moment: datetime) -> str:
    """Millisecond ISO-8601 in UTC ending in ``Z``, as JS ``Date.toISOString()``.

    A naive datetime is taken as UTC (never as local time).
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def imap_pointer(provider_id: str, folder: str, uid_validity: int, uid: int) -> str:
    """An RFC 5092-style locator for a message too large to keep in a DLQ entry."""
    quoted = urllib.parse.quote(folder, safe="/")
    return f"imap://{provider_id}/{quoted};UIDVALIDITY={uid_validity}/;UID={uid}"


def workflow_fields(
    out: Outbound, event_id: str, payload_json: bytes, *, event_bus: bool = False
) -> list[str | bytes]:
    """Flat field/value pairs of the workflow stream, in exactly Alga's order.

    ``execution_id`` is a fresh uuid4, as Alga's ``publisher.ts`` writes it; the event-bus
    variant of Alga's publisher (``event_bus``) also writes an empty
    ``workflow_correlation_key`` right after it.
    """
    correlation: list[str | bytes] = ["workflow_correlation_key", ""] if event_bus else []
    return [
        "event_id", event_id,
        "execution_id", str(uuid.uuid4()),
        *correlation,
        "event_name", EVENT_TYPE,
        "event_type", EVENT_TYPE,
        "tenant", out.tenant,
        "timestamp", iso_ms(out.event_time),
        "user_id", "",
        "from_state", "",
        "to_state", "",
        "payload_json", payload_json,
    ]  # fmt: skip


def event_bus_event(out: Outbound, event_id: str) -> bytes:
    """The event-bus ``event`` field: Alga's ``{...event, id, timestamp}`` key order."""
    event = {
        "eventType": EVENT_TYPE,
        "payload": out.payload,
        "id": event_id,
        "timestamp": iso_ms(out.event_time),
    }
    return orjson.dumps(event)


def pointer_job(out: Outbound, enqueued_at: datetime, job_id: str) -> bytes:
    """A unified pointer-queue job: the pointer only, never the message content.

    ``job_id`` is the message's ``event_id``: a job enqueued again after a lossy Redis
    failover carries the id of the first, so a consumer can tell the copy.

    ``pointer.mailbox`` is the IMAP folder: Alga's job processor SELECTs it, and falls
    back to the first folder filter when it looks like an address (wrong folder).
    ``uid`` and ``uidValidity`` are strings, as Alga's ``ImapInboundEmailPointer``.
    """
    pointer: dict[str, str] = {
        "mailbox": out.folder,
        "uid": str(out.uid),
        "uidValidity": str(out.uid_validity),
    }
    if out.message_id:
        pointer["messageId"] = out.message_id
    job = {
        "jobId": job_id,
        "schemaVersion": 1,
        "tenantId": out.tenant,
        "providerId": out.provider_id,
        "enqueuedAt": iso_ms(enqueued_at),
        "attempt": 0,
        "maxAttempts": POINTER_MAX_ATTEMPTS,
        "provider": "imap",
        "pointer": pointer,
    }
    return orjson.dumps(job)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _scrub(message: str) -> str:
    return _URL_CREDENTIALS.sub(r"\1***@", message)


@contextmanager
def _redis_errors(operation: str) -> Iterator[None]:
    """Turn redis-py failures into PublishError; messages never carry credentials."""
    try:
        yield
    except (FencedError, PublishError):
        raise
    except RedisError as exc:
        detail = _scrub(str(exc))
        raise PublishError(f"Redis {operation} failed ({type(exc).__name__}): {detail}") from exc


class _Script:
    """A Lua script from ``shardworker/lua``, called by SHA and loaded on NOSCRIPT."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.body = lua_source(name)
        self.sha = hashlib.sha1(self.body.encode()).hexdigest()

    def load(self, client: redis.Redis) -> None:
        loaded = _text(client.script_load(self.body))
        if loaded != self.sha:
            raise PublishError(f"Redis returned SHA {loaded} for {self.name}, expected {self.sha}")


_Call = tuple[list[str], list[str | bytes]]


class RedisStreamsSink:
    """Owns the stream layout; one instance per process, safe to share between threads."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.dedupe_ttl_s < 1:
            # PX 0 would fail inside the script after the XADD: published but not deduped.
            raise ConfigError("SHARDWORKER_DEDUPE_TTL_S: must be at least 1 second")
        self._client = client
        self._failures = watch_failures(client)
        self._replicas = ReplicaWait(client, settings, clock)
        self._settings = settings
        self._clock = clock
        self._publish = _Script("publish.lua")
        self._dead_letter = _Script("dead_letter.lua")
        self._event_bus_stream = event_bus_stream(settings)
        self._ttl_ms = str(settings.dedupe_ttl_s * 1000)
        self._backpressure: tuple[float, bool] | None = None

    @property
    def event_bus_stream(self) -> str:
        return self._event_bus_stream

    # Publishing

    def publish_batch(self, batch: Sequence[Outbound], fence: Fence | None) -> list[PublishResult]:
        """:meth:`Sink.publish_batch <shardworker.sink.base.Sink.publish_batch>` in one
        pipelined round trip."""
        if not batch:
            return []
        calls = [self._publish_call(out, fence) for out in batch]
        with metrics.publish_round_trip():
            replies = self._run(self._publish, calls, "publish")
            self._raise_fenced(replies, fence, len(batch))
            results = [self._publish_result(o, r) for o, r in zip(batch, replies, strict=True)]
            self._replicas.ensure("publish")
            return results

    def checks_rates(self) -> bool:
        """Yes: ``publish.lua`` makes the rate check, in the Redis the guard counts in."""
        return True

    def _publish_call(self, out: Outbound, fence: Fence | None) -> _Call:
        s = self._settings
        eid = event_id_for(out.tenant, out.provider_id, out.folder, out.uid_validity, out.uid)
        try:
            payload_json = orjson.dumps(out.payload)
            event = event_bus_event(out, eid) if s.publish_event_bus else b""
        except orjson.JSONEncodeError as exc:
            raise PublishError(f"payload of UID {out.uid} is not JSON-serialisable: {exc}") from exc
        job = pointer_job(out, datetime.now(UTC), eid) if s.publish_pointer_queue else b""
        own_key = uid_key(out.tenant, out.provider_id, out.folder, out.uid_validity, out.uid)
        # No Message-ID means no identity across folders: the UID key stands in for it.
        mid_key = (
            message_id_key(out.tenant, out.provider_id, out.identity) if out.identity else own_key
        )
        keys = [
            WORKFLOW_STREAM,
            own_key,
            mid_key,
            fence.lease_key if fence else "",
            self._event_bus_stream,
            POINTER_QUEUE,
            *_rate_keys(out.rate),
        ]
        args: list[str | bytes] = [
            fence.token if fence else "",
            str(s.stream_maxlen),
            self._ttl_ms,
            "1" if s.publish_event_bus else "0",
            "1" if s.publish_pointer_queue else "0",
            event,
            job,
            *_rate_args(out.rate),
            *workflow_fields(out, eid, payload_json, event_bus=s.publish_event_bus),
        ]
        return keys, args

    def _publish_result(self, out: Outbound, reply: Any) -> PublishResult:
        if isinstance(reply, Exception):
            raise PublishError(f"publish of UID {out.uid} failed: {_scrub(str(reply))}")
        stream_id, status, rank, first = _text(reply[0]), int(reply[1]), reply[2], reply[3]
        return PublishResult(
            uid=out.uid,
            stream_id=stream_id,
            duplicate=status in (_STATUS_DUPLICATE, _STATUS_DEAD_LETTERED),
            dead_lettered=status == _STATUS_DEAD_LETTERED,
            held=status == _STATUS_HELD,
            rank=int(rank),
            first_trip=bool(int(first)),
        )

    @staticmethod
    def _raise_fenced(replies: list[Any], fence: Fence | None, count: int) -> None:
        fenced = sum(1 for r in replies if isinstance(r, ResponseError) and _is_fenced(r))
        if fenced and fence is not None:
            raise FencedError(
                f"lease {fence.lease_key} is not held with this token: "
                f"{fenced} of {count} writes rejected"
            )

    def _run(self, script: _Script, calls: list[_Call], operation: str) -> list[Any]:
        """EVALSHA every call in one pipeline; reload the script and redo only NOSCRIPTs."""
        replies: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for _ in range(2):
            with _redis_errors(operation), self._client.pipeline(transaction=False) as pipe:
                for i in pending:
                    keys, args = calls[i]
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                answers = pipe.execute(raise_on_error=False)
            missing = []
            for i, answer in zip(pending, answers, strict=True):
                if isinstance(answer, NoScriptError):
                    missing.append(i)
                else:
                    replies[i] = answer
            if not missing:
                return replies
            log.info("lua_script_loaded", script=script.name, calls=len(missing))
            with _redis_errors(operation):
                script.load(self._client)
            pending = missing
        raise PublishError(f"Redis keeps losing the {script.name} script (SCRIPT FLUSH loop?)")

    def settle(self, settled: Sequence[Settled]) -> None:
        """Drop the per-UID and per-Message-ID keys of committed messages in one round trip.

        The keys exist only for the window between the XADD and the ledger commit; once the
        ledger holds a message, it answers for it (docs/DESIGN.md, "Lean dedupe state").

        Except after a failed call: its request (a publish whose retry then succeeded) may
        still be in flight, and would run the script after the keys are gone, with a lease
        token that is still valid, and publish a second time.  So within
        ``STALE_REQUEST_S`` of a failure the keys are kept that long instead of deleted.
        """
        keys = [uid_key(s.tenant, s.provider_id, s.folder, s.uid_validity, s.uid) for s in settled]
        keys += [
            message_id_key(s.tenant, s.provider_id, s.message_id) for s in settled if s.message_id
        ]
        if not keys:
            return
        try:
            if self._failures.within(STALE_REQUEST_S):
                with self._client.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.pexpire(key, STALE_REQUEST_S * 1000)
                    pipe.execute()
            else:
                self._client.unlink(*keys)
        except RedisError as exc:
            # Harmless: the keys expire after dedupe_ttl_s, and the ledger answers already.
            log.warning("dedupe_settle_failed", keys=len(keys), error=_scrub(str(exc)))

    # Dead letters

    def dead_letter(self, letter: DeadLetter, fence: Fence | None) -> str:
        """Record a poison message once per UID and mark the UID as done; returns the entry id.

        The raw message is kept (base64) up to ``dlq_max_raw_bytes``; a larger one keeps
        an ``imap://`` pointer instead.  A second call for the same UID returns the first id.
        """
        tenant, provider_id, folder = letter.tenant, letter.provider_id, letter.folder
        uid_validity, uid, raw = letter.uid_validity, letter.uid, letter.raw
        fields: list[str | bytes] = [
            "tenant", tenant,
            "provider_id", provider_id,
            "folder", folder,
            "uid_validity", str(uid_validity),
            "uid", str(uid),
            "message_id", letter.message_id or "",
            "reason", letter.reason,
            "time", iso_ms(datetime.now(UTC)),
            "size", "" if raw is None else str(len(raw)),
        ]  # fmt: skip
        if raw is not None and len(raw) <= self._settings.dlq_max_raw_bytes:
            fields += ["raw_base64", base64.b64encode(raw)]
        else:
            fields += ["pointer", imap_pointer(provider_id, folder, uid_validity, uid)]
        keys = [
            self._settings.dlq_stream,
            uid_key(tenant, provider_id, folder, uid_validity, uid),
            fence.lease_key if fence else "",
            dlq_bytes_key(self._settings.dlq_stream),
        ]
        args: list[str | bytes] = [
            fence.token if fence else "",
            self._ttl_ms,
            str(self._settings.dlq_max_entries),
            str(self._settings.dlq_max_bytes),
            *fields,
        ]
        replies = self._run(self._dead_letter, [(keys, args)], "dead-letter")
        self._raise_fenced(replies, fence, 1)
        if isinstance(replies[0], Exception):
            raise PublishError(f"dead-letter of UID {uid} failed: {_scrub(str(replies[0]))}")
        entry_id, trimmed = _text(replies[0][0]), int(replies[0][1])
        self._replicas.ensure("dead-letter")
        metrics.dead_lettered(letter.reason)
        if trimmed:
            metrics.dead_letters_trimmed(trimmed)
            log.warning("dead_letters_trimmed", count=trimmed, provider_id=provider_id,
                        folder=folder, max_entries=self._settings.dlq_max_entries,
                        max_bytes=self._settings.dlq_max_bytes)  # fmt: skip
        return entry_id

    # Consumer groups and backpressure

    def prepare(self) -> None:
        """Create Alga's publisher-side groups (``XGROUP CREATE … 0 MKSTREAM``) if absent."""
        self._create_group(WORKFLOW_STREAM, WORKFLOW_GROUP)
        if self._settings.publish_event_bus:
            self._create_group(self._event_bus_stream, EVENT_BUS_GROUP)

    def _create_group(self, stream: str, group: str) -> None:
        with _redis_errors("XGROUP CREATE"):
            try:
                self._client.xgroup_create(stream, group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def stream_length(self) -> int:
        with _redis_errors("XLEN"):
            return int(self._client.xlen(WORKFLOW_STREAM))

    def backlog(self) -> int:
        """Entries of the workflow stream that ``backpressure_group`` has not read yet.

        Normally the group's ``lag`` from XINFO GROUPS.  Redis reports no lag when
        deletions make it uncertain; then ``entries-added - entries-read`` (which counts
        deleted entries as unread, erring towards backpressure) capped at XLEN.  Note
        that ``XLEN - entries-read`` would be wrong: once MAXLEN has trimmed anything,
        XLEN is far below the number of entries ever added, and the lag would read 0.
        A missing group counts as the whole stream (DESIGN.md); a missing stream as 0.
        """
        with _redis_errors("XINFO GROUPS"):
            try:
                groups = self._client.xinfo_groups(WORKFLOW_STREAM)
            except ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return 0
                raise
            group = next(
                (g for g in groups if _text(g["name"]) == self._settings.backpressure_group),
                None,
            )
            if group is not None and group.get("lag") is not None:
                return int(group["lag"])
            return self._backlog_estimate(group)

    def _backlog_estimate(self, group: dict[str, Any] | None) -> int:
        info = self._client.xinfo_stream(WORKFLOW_STREAM)
        length = int(info["length"])
        read = None if group is None else group.get("entries-read")
        added = info.get("entries-added")
        if read is None or added is None:
            return length
        return max(0, min(length, int(added) - int(read)))

    def backpressured(self) -> bool:
        """``backlog() > backpressure_max_lag``, or the stream is over its byte cap (the
        housekeeping flag); cached for ``backpressure_check_s``: cheap per batch."""
        now = self._clock()
        cached = self._backpressure
        if cached is not None and now - cached[0] < self._settings.backpressure_check_s:
            return cached[1]
        verdict = self.backlog() > self._settings.backpressure_max_lag or self._stream_full()
        self._backpressure = (now, verdict)
        return verdict

    def last_backpressure(self) -> bool:
        cached = self._backpressure
        return cached is not None and cached[1]

    def _stream_full(self) -> bool:
        with _redis_errors("EXISTS"):
            return bool(self._client.exists(FULL_FLAG))


def _rate_keys(rate: RateCheck | None) -> list[str]:
    return ["", ""] if rate is None else [rate.key, rate.marker_key]


def _rate_args(rate: RateCheck | None) -> list[str | bytes]:
    if rate is None:
        return ["0", "", "", ""]
    return [str(rate.limit), str(rate.window_ms), str(rate.now_ms), rate.member]


def _is_fenced(error: ResponseError) -> bool:
    return str(error).startswith("FENCED")


def open_sink(settings: Settings, client: redis.Redis) -> RedisStreamsSink:
    return RedisStreamsSink(client, settings)
