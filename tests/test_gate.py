"""MessageGate: the per-message call the sync path will make (issue 20), on real Redis and
real parsed messages; plus Gmail's All Mail label filter against the scripted Gmail."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from imapclient import IMAPClient

from shardworker.config import load_settings
from shardworker.gate import MessageGate
from shardworker.imap import dialects
from shardworker.imap.dialects import Dialect, GmailAttrs
from shardworker.imap.folders import match_folders
from shardworker.imap.session import FolderSession
from shardworker.mime import Caps, parse_message
from tests.dialect_imap import DialectImap
from tests.support import make_mail

pytestmark = pytest.mark.timeout(60)


def email_data(raw: bytes) -> dict[str, Any]:
    return parse_message(raw, uid=1, mailbox="desk@example.com", internal_date=None,
                         caps=Caps()).email_data  # fmt: skip


def gate(client: redis.Redis, **env: str) -> MessageGate:
    return MessageGate.from_settings(
        load_settings({f"SHARDWORKER_{k.upper()}": v for k, v in env.items()}), client
    )


def admit(g: MessageGate, tenant: str, pid: str, key: str, raw: bytes) -> Any:
    return g.admit(tenant=tenant, provider_id=pid, mailbox="desk@example.com", message_key=key,
                   email_data=email_data(raw))  # fmt: skip


def test_admit_classifies_guards_and_marks(redis_client: redis.Redis) -> None:
    tenant, pid = str(uuid.uuid4()), str(uuid.uuid4())
    g = gate(redis_client, loop_policy="auto_reply=skip,*=flag", loop_rate_limit="2")
    forged = make_mail(headers={"X-Shardworker-Class": "normal", "Auto-Submitted": "auto-replied"})
    skipped = admit(g, tenant, pid, "<a1@x>", forged)
    assert not skipped.publish and skipped.ledger_reason == "loop_policy: auto_reply"
    news = make_mail(sender="news@lists.example", headers={"List-Id": "<n.lists.example>"})
    bulk = admit(g, tenant, pid, "<b1@x>", news)
    assert bulk.publish and bulk.email_data["headers"]["x-shardworker-flag"] == "bulk"
    bot = make_mail(sender="bot@loop.example")
    answers = [admit(g, tenant, pid, f"<c{i}@x>", bot).ledger_reason for i in range(3)]
    assert answers == [None, None, "sender_rate_limited"]
    normal = admit(g, tenant, pid, "<d1@x>", make_mail(sender="alice@loop.example"))
    assert normal.publish and normal.email_data["headers"]["x-shardworker-class"] == "normal"
    assert "x-shardworker-flag" not in normal.email_data["headers"]


def test_admit_adds_the_gmail_identity(redis_client: redis.Redis) -> None:
    g = gate(redis_client)
    attrs = GmailAttrs(msgid=42, thrid=41, labels=("\\Inbox", "Kunden"))
    out = g.admit(tenant=str(uuid.uuid4()), provider_id=str(uuid.uuid4()),
                  mailbox="desk@example.com", message_key=attrs.dedupe_key,
                  email_data=email_data(make_mail()), gmail=attrs)  # fmt: skip
    assert out.publish and out.email_data["threadId"] == "41"
    headers = out.email_data["headers"]
    assert json.loads(headers["x-shardworker-gmail-labels"]) == ["\\Inbox", "Kunden"]
    assert headers["x-shardworker-class"] == "normal"


@pytest.fixture(scope="module")
def gmail() -> Iterator[tuple[DialectImap, int]]:
    srv = DialectImap().start()
    port = srv.listen("gmail")
    yield srv, port
    srv.close()


def test_all_mail_publishes_only_the_watched_labels(gmail: tuple[DialectImap, int]) -> None:
    srv, port = gmail
    name = "gmail-allmail"
    for i in range(4):
        srv.deliver(name, make_mail(subject=f"m{i}"))
    srv.quirks_of(name).labels = {
        0: ("\\Inbox",),
        1: ("\\Sent",),  # the helpdesk's own reply: never a ticket
        2: ("Kunden/&AMQ-nderungen",),  # archived, but under the watched user label
        3: ("\\Important",),
    }
    client = IMAPClient("127.0.0.1", port, ssl=False, timeout=5)
    try:
        client.login(name, "pw")
        listing = client.list_folders("", "*")
        resolved = match_folders(listing, ["INBOX", "Kunden/Änderungen"]).folders
        labels = dialects.labels_for_folders(listing, resolved)
        assert labels == {"\\Inbox", "Kunden/Änderungen"}
        assert dialects.labels_for_folders(listing, ["[Gmail]/Gesendet"]) == {"\\Sent"}
        session = FolderSession(dialects.all_mail_folder(listing) or "")
        session.attach(client, [c.decode() for c in client.capabilities()])
        session.examine()
        rows = session._fetch_range("1:*", dialects.meta_fetch_items(Dialect.GMAIL))
    finally:
        client.logout()
    wanted = []
    for uid, item in sorted(rows.items()):
        attrs = dialects.gmail_attrs(item)
        assert attrs is not None
        if dialects.wanted_in_all_mail(attrs, labels):
            wanted.append(uid)
    assert wanted == [1, 3]
    assert dialects.wanted_in_all_mail(GmailAttrs(1, None, ("INBOX",)), labels)
