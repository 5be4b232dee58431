"""Loop and auto-reply classification, policies and event marking (issue 20, item 3).

Messages are real RFC 5322 bytes run through shardworker's MIME parser, so the headers map
the classifier reads is the one the engine will hand it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from shardworker.errors import ConfigError
from shardworker.loops import (
    HEADER_CLASS,
    HEADER_FLAG,
    HEADER_NO_AUTO_REPLY,
    HEADER_SIGNALS,
    Action,
    MailClass,
    annotate,
    classify,
    classify_email_data,
    decide,
    drop_forged_headers,
    parse_policy,
    policy_book,
)
from shardworker.mime import Caps, build_payload, parse_message
from tests.support import make_mail
from tests.zodcheck import validate_payloads

DSN = b"""From: Mail Delivery System <MAILER-DAEMON@mx.example.net>
To: helpdesk@example.com
Subject: Undelivered Mail Returned to Sender
Message-ID: <dsn-1@mx.example.net>
Date: Mon, 30 Nov 2026 10:00:00 +0000
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; boundary="b1"; report-type="delivery-status"

--b1
Content-Type: text/plain

The mail system could not deliver your message.
--b1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
Final-Recipient: rfc822; nobody@example.org
Action: failed
Status: 5.1.1
--b1--
"""

ARF = b"""From: feedback@isp.example
To: abuse@example.com
Subject: FW: complaint
Message-ID: <arf-1@isp.example>
Date: Mon, 30 Nov 2026 10:00:00 +0000
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="b2"

--b2
Content-Type: text/plain

This is an abuse report.
--b2
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: isp/1.0
Version: 1
--b2--
"""


def parsed(raw: bytes) -> dict[str, object]:
    mail = parse_message(
        raw, uid=1, mailbox="helpdesk@example.com", internal_date=None, caps=Caps()
    )
    return mail.email_data


def mail(headers: dict[str, str], sender: str = "Bob <bob@customer.example>") -> bytes:
    return make_mail(sender=sender, headers=headers)


@pytest.mark.parametrize(
    ("raw", "klass", "signal"),
    [
        (mail({}), MailClass.NORMAL, None),
        (mail({"Auto-Submitted": "no"}), MailClass.NORMAL, None),
        (mail({"Auto-Submitted": "auto-replied"}), MailClass.AUTO_REPLY,
         "auto-submitted=auto-replied"),
        (mail({"Auto-Submitted": "Auto-Generated; owner-email=x@y"}), MailClass.AUTO_REPLY,
         "auto-submitted=auto-generated"),
        (mail({"X-Autoreply": "yes"}), MailClass.AUTO_REPLY, "x-autoreply"),
        (mail({"X-Autorespond": "vacation"}), MailClass.AUTO_REPLY, "x-autorespond"),
        (mail({"Precedence": "auto_reply"}), MailClass.AUTO_REPLY, "precedence=auto_reply"),
        (mail({"Precedence": "bulk"}), MailClass.BULK, "precedence=bulk"),
        (mail({"Precedence": "junk"}), MailClass.BULK, "precedence=junk"),
        (mail({"Precedence": "list"}), MailClass.BULK, "precedence=list"),
        (mail({"List-Id": "Users <users.lists.example>"}), MailClass.BULK, "list-id"),
        (mail({"List-Unsubscribe": "<mailto:u@lists.example>"}), MailClass.BULK,
         "list-unsubscribe"),
        (mail({"Return-Path": "<>"}), MailClass.BOUNCE, "null-return-path"),
        (mail({}, sender="MAILER-DAEMON@mx.example.net"), MailClass.BOUNCE, "daemon-sender"),
        (mail({}, sender="postmaster@mx.example.net"), MailClass.BOUNCE, "daemon-sender"),
        (DSN, MailClass.BOUNCE, "report-type=delivery-status"),
        (ARF, MailClass.COMPLAINT, "report-type=feedback-report"),
        # An RFC 3834 auto-reply comes with a null return path: the reply, not a bounce.
        (mail({"Return-Path": "<>", "Auto-Submitted": "auto-replied"}), MailClass.AUTO_REPLY,
         "null-return-path"),
        # A list that also carries an auto-reply header: the auto-reply decides.
        (mail({"List-Id": "<l.example>", "X-Autoreply": "yes"}), MailClass.AUTO_REPLY,
         "x-autoreply"),
    ],
)  # fmt: skip
def test_classify(raw: bytes, klass: MailClass, signal: str | None) -> None:
    verdict = classify_email_data(parsed(raw))
    assert verdict.klass is klass
    if signal is not None:
        assert signal in verdict.signals
    assert verdict.no_auto_reply is (klass is not MailClass.NORMAL)


def test_suppress_and_x_loop_only_stop_auto_answers() -> None:
    # Helpdesks put these on their agents' human replies: the mail is still normal.
    for headers in (
        {"X-Auto-Response-Suppress": "All"},
        {"X-Auto-Response-Suppress": "DR, OOF, AutoReply"},
        {"X-Loop": "support@vendor.example"},
    ):
        verdict = classify_email_data(parsed(mail(headers)))
        assert verdict.klass is MailClass.NORMAL and verdict.no_auto_reply, headers
    assert not classify_email_data(parsed(mail({"X-Auto-Response-Suppress": "RN"}))).no_auto_reply
    own = classify_email_data(
        parsed(mail({"X-Loop": "Helpdesk <helpdesk@example.com>"})), ["helpdesk@example.com"]
    )
    assert own.klass is MailClass.AUTO_REPLY and own.signals == ("x-loop",)


def test_classify_headers_case_and_daemon_from_only() -> None:
    assert classify({"Precedence": "BULK"}).klass is MailClass.BULK
    assert classify({}, "Mailer-Daemon@x.example").klass is MailClass.BOUNCE
    assert classify({}, "daemon-fan@x.example").klass is MailClass.NORMAL


def test_policy_parsing() -> None:
    assert parse_policy("", name="V").action_for(MailClass.BOUNCE) is Action.PUBLISH
    assert parse_policy("skip", name="V").action_for(MailClass.BULK) is Action.SKIP
    mixed = parse_policy("auto_reply=skip, bounce=flag, *=publish", name="V")
    assert mixed.action_for(MailClass.AUTO_REPLY) is Action.SKIP
    assert mixed.action_for(MailClass.BOUNCE) is Action.FLAG
    assert mixed.action_for(MailClass.COMPLAINT) is Action.PUBLISH
    assert parse_policy("*=skip", name="V").action_for(MailClass.NORMAL) is Action.PUBLISH
    for bad, words in (("drop", "unknown action"), ("normal=skip", "unknown class"),
                       ("auto_reply", "unknown action"), ("x=skip", "unknown class")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"V: {words}"):
            parse_policy(bad, name="V")


def test_policy_book_overrides() -> None:
    pid = str(uuid.uuid4())
    book = policy_book("flag", f'{{"{pid.upper()}": "bounce=skip"}}', names=("A", "B"))
    assert book.for_provider(pid).action_for(MailClass.BOUNCE) is Action.SKIP
    assert book.for_provider(pid).action_for(MailClass.BULK) is Action.PUBLISH
    assert book.for_provider(str(uuid.uuid4())).action_for(MailClass.BULK) is Action.FLAG
    with pytest.raises(ConfigError, match="B: not valid JSON"):
        policy_book("publish", "{", names=("A", "B"))
    with pytest.raises(ConfigError, match="B"):
        policy_book("publish", '["skip"]', names=("A", "B"))
    with pytest.raises(ConfigError, match=rf"B\[{pid}\]: unknown action"):
        policy_book("publish", f'{{"{pid}": "nuke"}}', names=("A", "B"))


def test_decide_and_annotate() -> None:
    auto = classify({"auto-submitted": "auto-replied"})
    normal = classify({})
    flag_policy = parse_policy("flag", name="V")
    skip_policy = parse_policy("auto_reply=skip", name="V")
    published = decide(normal, skip_policy)
    assert published.publish and published.reason is None and published.flag is None
    skipped = decide(auto, skip_policy)
    assert not skipped.publish and skipped.reason == "loop_policy: auto_reply"
    flagged = decide(auto, flag_policy)
    assert flagged.publish and flagged.flag == "auto_reply"
    held = decide(normal, flag_policy, rate_held=Action.SKIP)
    assert not held.publish and held.reason == "sender_rate_limited"
    held_flag = decide(normal, parse_policy("publish", name="V"), rate_held=Action.FLAG)
    assert held_flag.publish and held_flag.flag == "sender_rate_limited"
    # The stricter one wins: a policy skip stays a skip when the guard only flags.
    assert decide(auto, skip_policy, rate_held=Action.FLAG).reason == "loop_policy: auto_reply"
    headers = annotate({"headers": {"subject": "s"}}, flagged)["headers"]
    assert headers[HEADER_CLASS] == "auto_reply"
    assert headers[HEADER_SIGNALS] == "auto-submitted=auto-replied"
    assert headers[HEADER_NO_AUTO_REPLY] == "true" and headers[HEADER_FLAG] == "auto_reply"
    plain = annotate({}, published)["headers"]
    assert plain == {HEADER_CLASS: "normal"}  # absent keys are left out, never null
    rate = annotate({}, held_flag)["headers"]
    assert rate[HEADER_NO_AUTO_REPLY] == "true" and rate[HEADER_FLAG] == "sender_rate_limited"


def test_forged_class_headers_are_dropped() -> None:
    data = parsed(mail({"X-Shardworker-Class": "normal", "X-Shardworker-Flag": "x",
                        "Auto-Submitted": "auto-replied"}))  # fmt: skip
    assert data["headers"]["x-shardworker-class"] == "normal"  # type: ignore[index]
    clean = drop_forged_headers(data)
    assert not [k for k in clean["headers"] if k.startswith("x-shardworker-")]
    verdict = classify_email_data(clean)
    out = annotate(clean, decide(verdict, parse_policy("publish", name="V")))
    assert out["headers"]["x-shardworker-class"] == "auto_reply"
    assert "x-shardworker-flag" not in out["headers"]


def test_annotated_events_pass_both_zod_shapes() -> None:
    tenant = str(uuid.uuid4())
    payloads = []
    for raw in (mail({}), mail({"Auto-Submitted": "auto-replied"}), DSN, ARF):
        data = drop_forged_headers(parsed(raw))
        decision = decide(classify_email_data(data), parse_policy("flag", name="V"))
        payloads.append(
            build_payload(tenant=tenant, provider_id=str(uuid.uuid4()),
                          email_data=annotate(data, decision), occurred_at=datetime.now(UTC))
        )  # fmt: skip
    results = validate_payloads(payloads)
    assert [(r["shapeA"], r["shapeB"]) for r in results] == [(True, True)] * 4, results
    assert all(isinstance(v, str) for p in payloads for v in p["emailData"]["headers"].values())


def test_signals_survive_the_parsers_headers_budget() -> None:
    """300 KiB of filler headers before the auto-reply markers: the parser's 256 KiB
    headers budget drops the rest of the headers, never the ones the class is read from."""
    filler = {f"X-Filler-{i}": "f" * 900 for i in range(340)}
    raw = make_mail(
        headers={**filler, "Auto-Submitted": "auto-replied", "List-Id": "<list.example>"}
    )
    data = parsed(raw)
    headers = data["headers"]
    assert isinstance(headers, dict)
    assert "x-filler-339" not in headers  # the budget did cut
    verdict = classify_email_data(data)
    assert verdict.klass is MailClass.AUTO_REPLY
