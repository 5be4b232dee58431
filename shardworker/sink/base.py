"""The publish side's one interface: what the engine hands a sink and what it gets back.

A sink takes parsed messages and makes each one an event at most once per UID (and per
Message-ID across folders of a provider), under a :class:`Fence`: a write whose fence is
no longer held writes nothing and raises :class:`~shardworker.errors.FencedError`.  The
engine never learns how a sink stores events; it keeps the ledger and the checkpoint
(fenced by the same epoch in PostgreSQL) on its own side.  The exactly-once argument is
therefore made once per sink, in its module, and tested once against this interface
(``tests/test_sink.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True)
class Fence:
    """The lease a write must still hold.

    ``lease_key``/``token``: the Redis lease (``GET lease_key == token``), checked
    atomically by a sink that writes to that Redis.  ``epoch``: the provider's fencing
    epoch in PostgreSQL, which the checkpoint compares, and which a sink outside Redis can
    compare in its own transaction.  Both come from one acquisition, so they travel as one.
    """

    lease_key: str
    token: str
    epoch: int


@dataclass(frozen=True)
class RateCheck:
    """The per-sender rate check (:mod:`shardworker.loopguard`) a sink makes atomically with
    the write, so that it costs no round trip of its own.

    ``member`` (the message's identity) counts in the sorted set ``key`` unless ``limit``
    members already arrived within ``window_ms`` before ``now_ms``; then the message is
    *held*: nothing is written, and ``marker_key`` (set once per window) tells the first
    hold.  A member counted before gets the answer it got then.
    """

    key: str
    marker_key: str
    member: str
    now_ms: int
    window_ms: int
    limit: int


@dataclass(frozen=True)
class Outbound:
    """One parsed message ready to publish; ``payload`` is the full event payload."""

    tenant: str
    provider_id: str
    mailbox: str
    folder: str
    uid_validity: int
    uid: int
    message_id: str
    payload: dict[str, Any]
    event_time: datetime
    # The cross-folder identity the engine's ledger dedupes on: Gmail's ``gm:<X-GM-MSGID>``,
    # else the Message-ID (None: the Message-ID).  ``message_id`` stays the RFC one.
    dedupe_key: str | None = None
    # Publish only if the sender is under this rate (None: no check).
    rate: RateCheck | None = None

    @property
    def identity(self) -> str:
        return self.dedupe_key if self.dedupe_key is not None else self.message_id


@dataclass(frozen=True)
class PublishResult:
    """``stream_id`` is the event's id in the sink, the original one when ``duplicate``.

    ``dead_lettered`` (then also ``duplicate``) means the UID was dead-lettered earlier;
    ``stream_id`` is then that dead-letter entry's id.

    ``held``: the message's :class:`RateCheck` held it; nothing was written and
    ``stream_id`` is ''.  ``rank`` is its rank among the sender's counted messages (the
    limit when held), ``first_trip`` whether this was the window's first hold.
    """

    uid: int
    stream_id: str
    duplicate: bool
    dead_lettered: bool = False
    held: bool = False
    rank: int = 0
    first_trip: bool = False


@dataclass(frozen=True)
class DeadLetter:
    """A message that cannot become an event; recorded once per UID, which is then done."""

    tenant: str
    provider_id: str
    folder: str
    uid_validity: int
    uid: int
    message_id: str | None
    reason: str
    raw: bytes | None


@dataclass(frozen=True)
class Settled:
    """A message the ledger now records (published, duplicate or dead-lettered).

    ``message_id`` is '' when the sink keeps no Message-ID state for it (none, or a
    dead letter).
    """

    tenant: str
    provider_id: str
    folder: str
    uid_validity: int
    uid: int
    message_id: str


class Sink(Protocol):
    """Where events go.  One instance per process, safe to share between sync threads."""

    def prepare(self) -> None:
        """Create what the sink needs before the first publish (idempotent)."""

    def publish_batch(self, batch: Sequence[Outbound], fence: Fence | None) -> list[PublishResult]:
        """Publish each message at most once; results in batch order.

        Raises FencedError when ``fence`` is not held (those messages wrote nothing; any
        earlier ones that did are answered as duplicates on the retry), PublishError when
        the sink fails.  ``fence=None`` (tests, tools) publishes unfenced.

        A message with ``rate`` set is checked against it first, in batch order, before
        its dedupe keys (as if the engine had asked the guard just before the publish):
        held, it writes nothing and its result says ``held``.  Only a sink whose
        :meth:`checks_rates` is True is handed such messages.
        """
        ...

    def checks_rates(self) -> bool:
        """Whether :meth:`publish_batch` makes ``Outbound.rate`` checks: a sink on the
        Redis the rate guard counts in.  Otherwise the engine asks the guard itself."""
        ...

    def dead_letter(self, letter: DeadLetter, fence: Fence | None) -> str:
        """Record a poison message once per UID and mark the UID done; returns its id.

        A second call for the same UID returns the first id.  FencedError as above.
        """
        ...

    def settle(self, settled: Sequence[Settled]) -> None:
        """The ledger committed these: drop the dedupe state kept for them.

        Called after the ledger commit, never before; best effort (a failure leaves the
        state to expire on its own).  From then on the ledger answers for them.
        """
        ...

    def backpressured(self) -> bool:
        """True while the consumers lag too far behind: the engine stops fetching."""
        ...

    def last_backpressure(self) -> bool:
        """The last ``backpressured()`` answer however old, without asking (False before
        the first): a push's small batch goes by it and asks after its XADD."""
        ...
