"""The pool's shared state in Redis: members, the leader lease, the assignment.

Keys:

* ``sw:members``: ZSET member → last heartbeat (Redis server time, ms), so pods with
  skewed clocks agree on who is alive.
* ``sw:members:db``: ZSET member → when its PostgreSQL probe last succeeded (Redis server
  time, ms, written with the heartbeat): who could checkpoint a provider it took over.
* ``sw:leader``: the leader lease, token ``<coordinator>|<epoch>``; ``sw:leader:epoch``
  is incremented on every new leadership.
* the assignment, sharded so that no value grows with the whole pool and every change
  writes only what moved:

  - ``sw:owners:<0..255>``: HASHes ``tenant:provider_id`` → member (the shard is
    ``crc32(key) % 256``): who owns a provider is one ``HGET``;
  - ``sw:assign:<member>``: SET of the member's ``tenant:provider_id`` keys, its share;
  - ``sw:assignver``: HASH member → the version at which that member's share last
    changed: a worker polls this one field and reads its share only when it moved;
  - ``sw:assignment``: HASH ``version``, ``epoch`` (of the leadership that wrote it);
  - ``sw:assignnote:<member>``: STREAM (its last 8 entries) of notes "your share is now at
    version N", written with the version: a worker blocks on it instead of polling.

  The leader publishes *deltas* through ``registry_apply.lua``, which first checks the
  leader lease, in chunks of at most ``CHUNK_OPS`` operations; the owner-shard entry and
  the share entries of one provider always travel in the same chunk, and the versions
  (members' and the global one) and the notes in the last, so a worker that sees a new
  version or a note sees every change before it.  See docs/DESIGN.md, "The incremental
  control plane".
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import redis

from shardworker.errors import LeaseLostError
from shardworker.luasource import lua_source

MEMBERS = "sw:members"
MEMBERS_DB = "sw:members:db"
LEADER = "sw:leader"
LEADER_EPOCH = "sw:leader:epoch"
ASSIGNMENT = "sw:assignment"
ASSIGN_PREFIX = "sw:assign:"
VERSIONS = "sw:assignver"
OWNERS_PREFIX = "sw:owners:"
NOTES_PREFIX = "sw:assignnote:"
OWNER_SHARDS = 256
CHUNK_OPS = 4000
DB_FORGET_MS = 86_400_000  # a member silent that long leaves sw:members:db


def note_stream(member: str) -> str:
    """The stream on which the leader notes that ``member``'s share changed."""
    return NOTES_PREFIX + member


def owner_shard(key: str) -> str:
    """The owner HASH holding ``key`` (``tenant:provider_id``)."""
    return f"{OWNERS_PREFIX}{zlib.crc32(key.encode()) % OWNER_SHARDS}"


@dataclass(frozen=True)
class Assignment:
    version: int
    epoch: int
    owners: dict[str, str]


@dataclass(frozen=True)
class MemberAssignment:
    version: int
    providers: frozenset[str]


@dataclass(frozen=True)
class Delta:
    """What changed since the published state: ``owners[key]`` is the new member, or None
    for a provider no longer assigned; ``previous[key]`` its member before (if any)."""

    version: int
    epoch: int
    owners: Mapping[str, str | None]
    previous: Mapping[str, str]
    # Members whose version is bumped even with no change (a new member, a repair).
    touch: Iterable[str] = ()
    # Departed members: their share and version are deleted.
    drop: Sequence[str] = field(default_factory=tuple)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Registry:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._heartbeat = client.register_script(lua_source("registry_heartbeat.lua"))
        self._live = client.register_script(lua_source("registry_live.lua"))
        self._elect = client.register_script(lua_source("registry_elect.lua"))
        self._apply = client.register_script(lua_source("registry_apply.lua"))
        self._resign = client.register_script(lua_source("registry_resign.lua"))

    # -- members -------------------------------------------------------------------------

    def heartbeat(self, member: str, database_ok_age_s: float | None = None) -> None:
        """``database_ok_age_s``: how long ago the member's PostgreSQL last answered."""
        age = "" if database_ok_age_s is None else str(max(0, int(database_ok_age_s * 1000)))
        self._heartbeat(keys=[MEMBERS, MEMBERS_DB], args=[member, age])

    def leave(self, member: str) -> None:
        """Announce a departure: the leader moves our providers at once."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(MEMBERS, member)
            pipe.zrem(MEMBERS_DB, member)
            pipe.execute()

    def members_with_database(self, within_s: float) -> list[str]:
        """The members whose PostgreSQL probe succeeded within ``within_s``."""
        within_ms = int(within_s * 1000)
        found = self._live(keys=[MEMBERS_DB], args=[within_ms, DB_FORGET_MS])
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in found)

    def live_members(self, grace_s: float) -> list[str]:
        grace_ms = int(grace_s * 1000)
        found = self._live(keys=[MEMBERS], args=[grace_ms, grace_ms * 20])
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in found)

    # -- leader --------------------------------------------------------------------------

    def elect(self, identity: str, ttl_s: float, token: str | None) -> str | None:
        got = self._elect(
            keys=[LEADER, LEADER_EPOCH], args=[identity, int(ttl_s * 1000), token or ""]
        )
        if not got:
            return None
        return got.decode() if isinstance(got, bytes) else str(got)

    def resign(self, token: str) -> None:
        self._resign(keys=[LEADER], args=[token])

    def current_leader(self) -> str | None:
        got = self.client.get(LEADER)
        return got.decode() if isinstance(got, bytes) else None

    # -- assignment: reading ------------------------------------------------------------

    def read_meta(self) -> tuple[int, int] | None:
        """``(version, epoch)`` of the published assignment, or None if none is."""
        version, epoch = self.client.hmget(ASSIGNMENT, ["version", "epoch"])
        if version is None or epoch is None:
            return None
        return int(version), int(epoch)

    def read_owners(self) -> dict[str, str]:
        """The whole owner map (every shard, one pipelined round trip): for the admin
        views and a leader taking over; a single provider's owner is :meth:`owner_of`."""
        with self.client.pipeline(transaction=False) as pipe:
            for shard in range(OWNER_SHARDS):
                pipe.hgetall(f"{OWNERS_PREFIX}{shard}")
            shards = pipe.execute()
        return {_text(k): _text(v) for part in shards for k, v in part.items()}

    def read_assignment(self) -> Assignment | None:
        meta = self.read_meta()
        if meta is None:
            return None
        return Assignment(meta[0], meta[1], self.read_owners())

    def owner_of(self, key: str) -> str | None:
        got = self.client.hget(owner_shard(key), key)
        return None if got is None else _text(got)

    def member_version(self, member: str) -> int | None:
        got = self.client.hget(VERSIONS, member)
        return None if got is None else int(got)

    def wake(self, member: str, reason: str) -> None:
        """Note on ``member``'s note stream, ending its blocking wait at once (its own
        drain, a lease it lost: anything that must not wait for the next check)."""
        self.client.xadd(note_stream(member), {"wake": reason}, maxlen=8)

    def member_assignment(self, member: str) -> MemberAssignment | None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hget(VERSIONS, member)
            pipe.smembers(ASSIGN_PREFIX + member)
            version, share = pipe.execute()
        if version is None:
            return None
        return MemberAssignment(int(version), frozenset(_text(k) for k in share))

    def owners_for(self, keys: Sequence[str]) -> dict[str, str]:
        """The owners of these ``tenant:provider_id`` keys (one pipelined round trip)."""
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(owner_shard(key), key)
            got = pipe.execute()
        return {k: _text(m) for k, m in zip(keys, got, strict=True) if m is not None}

    def share_sizes(self) -> dict[str, int]:
        """member → how many providers its share holds."""
        members = self.assigned_members()
        with self.client.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.scard(ASSIGN_PREFIX + member)
            sizes = pipe.execute()
        return dict(zip(members, (int(n) for n in sizes), strict=True))

    def assigned_members(self) -> list[str]:
        return sorted(_text(m) for m in self.client.hkeys(VERSIONS))

    # -- assignment: writing ------------------------------------------------------------

    def publish_delta(self, token: str, delta: Delta) -> int:
        """Apply ``delta`` if we are still the leader; returns the operations sent."""
        chunks = _chunks(delta)
        for chunk in chunks:
            try:
                self._apply(keys=[LEADER], args=[token, *chunk])
            except redis.ResponseError as exc:
                if "NOTLEADER" in str(exc):
                    raise LeaseLostError(
                        "leadership lost before the assignment was published"
                    ) from None
                raise
        return sum(len(c) for c in chunks)

    def publish(
        self,
        token: str,
        assignment: Assignment,
        members: Sequence[str],
        stale_members: Sequence[str],
    ) -> None:
        """Make the published state equal ``assignment`` whatever it is now (a repair):
        reads what Redis holds, writes the difference and bumps every member's version."""
        current = self.read_owners()
        owners: dict[str, str | None] = {k: None for k in current if k not in assignment.owners}
        owners.update({k: m for k, m in assignment.owners.items() if current.get(k) != m})
        touch = set(members) | set(assignment.owners.values())
        self.publish_delta(token, Delta(assignment.version, assignment.epoch, owners, current,
                                        touch=sorted(touch), drop=stale_members))  # fmt: skip


def _chunks(delta: Delta) -> list[list[str]]:
    """The delta as script arguments, per provider together, versions last."""
    chunks: list[list[str]] = [[]]
    changed: dict[str, int] = defaultdict(int)
    for key, member in delta.owners.items():
        before = delta.previous.get(key)
        ops: list[str] = []
        if before is not None and before != member:
            ops += ["srem", ASSIGN_PREFIX + before, key]
            changed[before] += 1
        if member is None:
            ops += ["hdel", owner_shard(key), key]
        else:
            ops += ["hset", owner_shard(key), key, member, "sadd", ASSIGN_PREFIX + member, key]
            changed[member] += 1
        if len(chunks[-1]) + len(ops) > CHUNK_OPS:
            chunks.append([])
        chunks[-1] += ops
    last: list[str] = []
    for member in sorted(delta.drop):
        last += ["del", ASSIGN_PREFIX + member, "hdel", VERSIONS, member,
                 "del", note_stream(member)]  # fmt: skip
        changed.pop(member, None)
    for member in sorted(set(changed) | set(delta.touch)):
        if member not in delta.drop:
            last += ["hset", VERSIONS, member, str(delta.version),
                     "note", note_stream(member), str(delta.version)]  # fmt: skip
    last += ["hset", ASSIGNMENT, "version", str(delta.version),
             "hset", ASSIGNMENT, "epoch", str(delta.epoch)]  # fmt: skip
    chunks.append(last)
    return [c for c in chunks if c]


def owners_of(assignment: Assignment | None) -> Mapping[str, str]:
    return {} if assignment is None else assignment.owners
