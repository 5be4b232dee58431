"""The push path (issue 14): one IMAP round trip and one ledger query before the XADD.

A push used to leave IDLE (``DONE``), fetch the metadata of ``n:*``, ask the ledger for
known UIDs, fetch the bodies, parse, ask the ledger for known Message-IDs, then publish.
Now the ``UID FETCH`` of the lowest UIDs above the cursor, bodies included (cut at a
bound), leaves in the same segment as ``DONE``, and the ledger answers both questions in
one statement.  What must not change: a known UID is never published again, a Message-ID
the ledger holds is a duplicate even after the Lua dedupe keys were settled, a body the
size guard would refuse is never fetched whole, and nothing above the prefetched range is
skipped.
"""

from __future__ import annotations

import contextlib
import select
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from shardworker.config import Settings
from shardworker.db.store import FolderCursor, Pool, ProviderConfig, Store, open_pool
from shardworker.engine.sync import FolderSync, SyncContext, push_fetch_limits
from shardworker.imap.connect import Credentials, Security, open_client
from shardworker.imap.session import FolderSession, Prefetch
from shardworker.mime import Caps
from shardworker.sink.redis_streams import open_sink
from tests.hostile_imap import HostileImap
from tests.support import Rig, make_mail, message_ids, rig_settings, wait_until

pytestmark = pytest.mark.timeout(90)

BIG_ENOUGH = 256 * 1024


class CountingPool:
    """The store's pool, counting the connections it lends: one per round trip."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.lent = 0

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        self.lent += 1
        with self.pool.connection() as conn:
            yield conn


@dataclass
class Folder:
    """One provider's INBOX on the real Dovecot, driven without the engine's loop."""

    dovecot: Any
    user: str
    session: FolderSession
    sync: FolderSync
    pool: CountingPool
    redis: redis.Redis
    cursor: FolderCursor

    def wait_readable(self, timeout_s: float = 5.0) -> None:
        assert self.session.sock is not None
        readable, _, _ = select.select([self.session.sock], [], [], timeout_s)
        assert readable, f"no IDLE news within {timeout_s} s"

    def push(self, *raws: bytes, count: int = 16, max_bytes: int = BIG_ENOUGH) -> Prefetch:
        """Deliver while idling; leave IDLE the way a push cycle does."""
        assert self.session.enter_idle() is False
        for raw in raws:
            self.dovecot.append(self.user, "INBOX", raw)
        self.wait_readable()
        time.sleep(0.1)  # every EXISTS of the burst announced
        return self.session.leave_idle_fetching(self.cursor.last_uid, count, max_bytes)


def _session(dovecot: Any, user: str, password: str, security: Security) -> FolderSession:
    port = dovecot.tls_port if security == "tls" else dovecot.plain_port
    client = open_client(
        "127.0.0.1", port, security, Credentials("password", user, password), timeout_s=5,
        connect_timeout_s=5, ssl_context=dovecot.ssl_context(),
    )  # fmt: skip
    session = FolderSession("INBOX")
    session.attach(client, [c.decode() for c in client.capabilities()])
    return session


class RecordingSink:
    """The real sink, noting the order of the calls made to it."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.sink, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call


@contextlib.contextmanager
def open_folder(
    dovecot: Any, dsn: str, redis_url: str, security: Security, **overrides: str
) -> Iterator[Folder]:
    settings = rig_settings(dsn, redis_url, str(dovecot.cafile), **overrides)
    rig = Rig(settings, dovecot)
    user, password = dovecot.add_user()
    pid = rig.add_provider(user, password)
    pool = CountingPool(open_pool(settings.database_url, max_size=2))
    store = Store(pool)  # type: ignore[arg-type]  # the counting proxy lends the same connections
    provider = store.load_provider(rig.tenant, pid)
    assert provider is not None
    session = _session(dovecot, user, password, security)
    status = session.examine()
    sync = FolderSync(_context(settings, store, rig.redis, provider), session)
    cursor = FolderCursor(status.uid_validity, status.uid_next - 1)
    try:
        yield Folder(dovecot, user, session, sync, pool, rig.redis, cursor)
    finally:
        session.close(logout=True)
        pool.pool.close()
        rig.close()


@pytest.fixture(name="f", params=["plain", "tls"])
def folder_fixture(
    request: pytest.FixtureRequest, migrated_dsn: str, redis_url: str, dovecot: Any
) -> Iterator[Folder]:
    with open_folder(dovecot, migrated_dsn, redis_url, request.param) as f:
        yield f


def _context(settings: Settings, store: Store, client: redis.Redis, p: ProviderConfig) -> Any:
    sink = RecordingSink(open_sink(settings, client))
    return SyncContext(settings, store, sink, Caps.from_settings(settings), p, None)


def _drain(f: Folder, prefetch: Prefetch | None) -> Any:
    f.pool.lent = 0
    f.cursor, result = f.sync.drain(f.cursor, prefetch)
    return result


def test_a_push_arrives_with_its_body_and_costs_one_ledger_query_fewer(f: Folder) -> None:
    raw = make_mail(message_id="<push-1@example.com>", text="pushed\n")
    prefetch = f.push(raw)
    assert [m.uid for m in prefetch.infos] == [f.cursor.last_uid + 1]
    [(uid, body)] = prefetch.bodies.items()
    assert b"pushed" in body and b"<push-1@example.com>" in body
    assert prefetch.nbytes == len(body) == prefetch.infos[0].size

    result = _drain(f, prefetch)
    assert (result.published, result.duplicates) == (1, 0)
    assert message_ids(f.redis) == ["<push-1@example.com>"]
    # One ledger query (UIDs and Message-IDs together) and the commit.
    assert f.pool.lent == 2
    assert f.cursor.last_uid == uid

    # The same push without the bodies in hand: known_uids, known_message_ids, commit.
    f.dovecot.append(f.user, "INBOX", make_mail(message_id="<pull-2@example.com>"))
    f.session.poll()  # the session sees it (a NOOP, as in a poll cycle)
    result = _drain(f, None)
    assert result.published == 1 and f.pool.lent == 3


def test_a_known_uid_is_not_published_again_from_the_push(f: Folder) -> None:
    before = f.cursor
    prefetch = f.push(make_mail(message_id="<once@example.com>"))
    assert _drain(f, prefetch).published == 1
    # Alga's listener rewrites the cursor back: the ledger still knows the UID.
    f.cursor = before
    again = f.push(make_mail(message_id="<after@example.com>"))
    assert [m.uid for m in again.infos] == [before.last_uid + 1, before.last_uid + 2]
    assert set(again.bodies) == {m.uid for m in again.infos}
    result = _drain(f, again)
    assert (result.published, result.duplicates) == (1, 0)
    assert message_ids(f.redis) == ["<once@example.com>", "<after@example.com>"]


def test_a_message_id_the_ledger_holds_is_a_duplicate_after_its_keys_were_settled(
    f: Folder,
) -> None:
    """The Lua keys live only until the commit (settle UNLINKs them): the ledger is what
    still knows the Message-ID, so the push path must keep asking it."""
    assert _drain(f, f.push(make_mail(message_id="<copied@example.com>"))).published == 1
    assert not f.redis.keys("sw:mid:*"), "settled: the Lua dedupe keys are gone"
    result = _drain(f, f.push(make_mail(message_id="<copied@example.com>", subject="copy")))
    assert (result.published, result.duplicates) == (0, 1)
    assert message_ids(f.redis) == ["<copied@example.com>"]


def test_a_body_longer_than_the_bound_is_never_taken_from_the_prefetch(f: Folder) -> None:
    big = make_mail(message_id="<big@example.com>", text="x" * 40_000 + "\nend-marker\n")
    prefetch = f.push(big, max_bytes=4096)
    [info] = prefetch.infos
    assert info.size > 4096 and prefetch.bodies == {}
    assert prefetch.nbytes == 4096  # the server sent no more than the bound
    result = _drain(f, prefetch)
    assert result.published == 1
    [event] = f.redis.xrange("workflow:events:global")
    assert b"end-marker" in event[1][b"payload_json"]  # fetched whole, the usual way


def test_uids_above_the_prefetched_range_are_drained_in_order(f: Folder) -> None:
    mids = [f"<burst-{i}@example.com>" for i in range(5)]
    prefetch = f.push(*(make_mail(message_id=m) for m in mids), count=2)
    assert len(prefetch.infos) == 2
    result = _drain(f, prefetch)
    assert result.published == 5
    assert message_ids(f.redis) == mids


def test_a_push_reads_backpressure_after_its_xadd_and_a_lagging_reading_holds_it(
    migrated_dsn: str, redis_url: str, dovecot: Any
) -> None:
    """The XINFO GROUPS reading (0.55 ms at 5,000 folders) left the push path: the last
    reading decides before a push's batch, a fresh one is taken after its XADD."""
    lag = {"backpressure_max_lag": "1", "backpressure_check_s": "0"}
    with open_folder(dovecot, migrated_dsn, redis_url, "plain", **lag) as f:
        group = f.sync.ctx.settings.backpressure_group
        f.redis.xgroup_create("workflow:events:global", group, id="$", mkstream=True)
        sink = f.sync.ctx.sink
        assert isinstance(sink, RecordingSink)
        asked = ("last_backpressure", "backpressured", "publish_batch")

        result = _drain(f, f.push(make_mail(message_id="<bp-1@example.com>")))
        assert [c for c in sink.calls if c in asked] == [
            "last_backpressure", "publish_batch", "backpressured",
        ]  # fmt: skip
        assert result.published == 1 and not result.backpressured  # a lag of 1: at the bound

        result = _drain(f, f.push(make_mail(message_id="<bp-2@example.com>")))
        assert result.published == 1 and result.backpressured  # over it, seen after the XADD

        held = f.cursor
        sink.calls.clear()
        result = _drain(f, f.push(make_mail(message_id="<bp-3@example.com>")))
        assert result.backpressured and result.published == 0 and f.cursor == held
        assert "publish_batch" not in sink.calls
        assert message_ids(f.redis) == ["<bp-1@example.com>", "<bp-2@example.com>"]

        for _, entries in f.redis.xreadgroup(group, "c1", {"workflow:events:global": ">"}):
            f.redis.xack("workflow:events:global", group, *[e[0] for e in entries])
        result = _drain(f, None)  # the next cycle: not a push, a fresh reading first
        assert result.published == 1
        assert message_ids(f.redis)[-1] == "<bp-3@example.com>"


def test_the_push_fetch_is_one_batch_within_the_size_guard() -> None:
    assert push_fetch_limits(None, 25 * 1024 * 1024) == (16, 256 * 1024)
    assert push_fetch_limits(3, 25 * 1024 * 1024) == (3, 256 * 1024)
    assert push_fetch_limits(50, 1000) == (16, 1000)


def test_an_answer_that_is_not_a_message_above_the_cursor_is_ignored() -> None:
    session = FolderSession("INBOX")
    data: dict[Any, dict[bytes, Any]] = {
        6: {b"SEQ": 6, b"FLAGS": (b"\\Seen",)},  # an unsolicited flag change, by sequence
        7: {b"SEQ": 5, b"RFC822.SIZE": 3, b"BODY[]<0>": b"abc"},
        3: {b"SEQ": 3, b"RFC822.SIZE": 3, b"BODY[]<0>": b"old"},  # at or below the cursor
        30: {b"SEQ": 9, b"RFC822.SIZE": 3, b"BODY[]<0>": b"far"},  # above the range asked
        8: {b"SEQ": 7, b"RFC822.SIZE": 9000, b"BODY[]<0>": b"y" * 100},  # cut at the bound
    }
    got = session._prefetched(5, 16, 100, data)
    assert [m.uid for m in got.infos] == [7, 8]
    assert dict(got.bodies) == {7: b"abc"} and got.nbytes == 103


# -- through the engine, against the scriptable server: the commands a push costs ---------


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileImap]:
    server = HostileImap().start()
    yield server
    server.close()


def test_a_push_is_one_uid_fetch_before_the_xadd(
    hostile: HostileImap, migrated_dsn: str, redis_url: str, dovecot: Any
) -> None:
    rig = Rig(rig_settings(migrated_dsn, redis_url, str(dovecot.cafile)), dovecot)
    try:
        user = f"good-{uuid.uuid4().hex[:8]}"
        rig.add_provider(user, "Push-Secret-1", port=hostile.port)
        rig.start()
        box = hostile.mailbox(user)
        wait_until(lambda: len(box.idlers) == 1, timeout_s=10)
        time.sleep(0.2)
        for n in range(1, 4):
            fetches = box.commands["UID"]
            mid = f"<engine-push-{n}@example.com>"
            hostile.deliver(user, make_mail(message_id=mid))
            wait_until(lambda: mid in message_ids(rig.redis), timeout_s=5)  # noqa: B023
            wait_until(lambda: len(box.idlers) == 1, timeout_s=5)
            # The fetch behind DONE, then the drain's check that nothing is left: two,
            # where the metadata fetch and the body fetch used to come before that check.
            assert box.commands["UID"] - fetches == 2
        assert message_ids(rig.redis) == [f"<engine-push-{n}@example.com>" for n in (1, 2, 3)]
    finally:
        rig.close()
