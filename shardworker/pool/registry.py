"""The pool's shared state in Redis: members, the leader lease, the assignment.

Keys:

* ``sw:members``: ZSET member → last heartbeat (Redis server time, ms), so pods with
  skewed clocks agree on who is alive.
* ``sw:leader``: the leader lease, token ``<coordinator>|<epoch>``; ``sw:leader:epoch``
  is incremented on every new leadership.
* ``sw:assignment``: JSON ``{"version", "epoch", "owners": {provider_id: member}}``;
  ``sw:assign:<member>``: JSON ``{"version", "epoch", "providers": [...]}``, what each
  worker reads.  Both are written by one script that first checks the writer still holds
  the leader lease, so a deposed leader cannot publish a stale assignment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import orjson
import redis

from shardworker.errors import LeaseLostError
from shardworker.luasource import lua_source

MEMBERS = "sw:members"
LEADER = "sw:leader"
LEADER_EPOCH = "sw:leader:epoch"
ASSIGNMENT = "sw:assignment"
ASSIGN_PREFIX = "sw:assign:"


@dataclass(frozen=True)
class Assignment:
    version: int
    epoch: int
    owners: dict[str, str]


@dataclass(frozen=True)
class MemberAssignment:
    version: int
    providers: frozenset[str]


class Registry:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._heartbeat = client.register_script(lua_source("registry_heartbeat.lua"))
        self._live = client.register_script(lua_source("registry_live.lua"))
        self._elect = client.register_script(lua_source("registry_elect.lua"))
        self._publish = client.register_script(lua_source("registry_publish.lua"))
        self._resign = client.register_script(lua_source("registry_resign.lua"))

    # -- members -------------------------------------------------------------------------

    def heartbeat(self, member: str) -> None:
        self._heartbeat(keys=[MEMBERS], args=[member])

    def leave(self, member: str) -> None:
        """Announce a graceful departure: the leader moves our providers at once."""
        self.client.zrem(MEMBERS, member)

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

    # -- assignment ----------------------------------------------------------------------

    def read_assignment(self) -> Assignment | None:
        raw = self.client.get(ASSIGNMENT)
        if not raw:
            return None
        data = orjson.loads(raw)
        return Assignment(int(data["version"]), int(data["epoch"]), dict(data["owners"]))

    def publish(
        self,
        token: str,
        assignment: Assignment,
        members: Sequence[str],
        stale_members: Sequence[str],
    ) -> None:
        """Write the assignment and each member's share, if we are still the leader."""
        by_member: dict[str, list[str]] = {m: [] for m in members}
        for provider, member in sorted(assignment.owners.items()):
            by_member.setdefault(member, []).append(provider)
        blob = orjson.dumps({"version": assignment.version, "epoch": assignment.epoch,
                             "owners": assignment.owners})  # fmt: skip
        keys = [LEADER, ASSIGNMENT, *(ASSIGN_PREFIX + m for m in by_member)]
        shares = [
            orjson.dumps(
                {"version": assignment.version, "epoch": assignment.epoch, "providers": ps}
            )
            for ps in by_member.values()
        ]
        drop = [ASSIGN_PREFIX + m for m in stale_members if m not in by_member]
        try:
            self._publish(keys=keys, args=[token, blob, *shares, len(drop), *drop])
        except redis.ResponseError as exc:
            if "NOTLEADER" in str(exc):
                raise LeaseLostError(
                    "leadership lost before the assignment was published"
                ) from None
            raise

    def member_assignment(self, member: str) -> MemberAssignment | None:
        raw = self.client.get(ASSIGN_PREFIX + member)
        if not raw:
            return None
        data = orjson.loads(raw)
        return MemberAssignment(int(data["version"]), frozenset(data["providers"]))

    def assigned_members(self) -> list[str]:
        keys = self.client.scan_iter(match=ASSIGN_PREFIX + "*", count=500)
        return [k.decode()[len(ASSIGN_PREFIX) :] for k in keys]


def owners_of(assignment: Assignment | None) -> Mapping[str, str]:
    return {} if assignment is None else assignment.owners
