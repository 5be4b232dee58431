"""Mail-loop protection: classify a message, pick the provider's policy, mark the event.

Pure functions; the per-sender rate guard that needs Redis lives in
:mod:`shardworker.loopguard`.

A helpdesk that turns mail into tickets and answers automatically can loop with any
other automaton: an out-of-office, a bounce, a list, another helpdesk.  Each message is
classified from its headers and structure (:func:`classify`):

===========  ==========================================================================
class        signals
===========  ==========================================================================
complaint    ``multipart/report; report-type=feedback-report`` (ARF, RFC 5965)
bounce       ``multipart/report; report-type=delivery-status`` (RFC 3464), a
             ``MAILER-DAEMON`` / ``postmaster`` sender, or a null return path ``<>``
             with nothing more specific
auto_reply   RFC 3834 ``Auto-Submitted`` other than ``no``, ``X-Autoreply``,
             ``X-Autorespond``, ``Precedence: auto_reply``, a read receipt
             (``report-type=disposition-notification``), ``X-Loop`` naming this mailbox
bulk         ``Precedence: bulk|junk|list``, ``List-Id``, ``List-Unsubscribe``
normal       none of these
===========  ==========================================================================

``X-Auto-Response-Suppress`` (All, OOF, AutoReply) and any ``X-Loop`` do not change the
class (helpdesks put them on agents' human replies too), but they set ``no_auto_reply``:
the sender asked not to be answered by a machine.

The class reaches Alga in ``emailData.headers`` (``Record<string,string>``; both zod
shapes let it through), under keys no message can forge (:func:`drop_forged_headers`):

* ``x-shardworker-class``: ``normal|auto_reply|bulk|bounce|complaint``, on every message;
* ``x-shardworker-class-signals``: the signals that decided it, comma-separated;
* ``x-shardworker-no-auto-reply``: ``"true"`` when no automatic answer should be sent;
* ``x-shardworker-flag``: what the ``flag`` policy flagged (a class or
  ``sender_rate_limited``).

Policies (``SHARDWORKER_LOOP_POLICY``, per provider ``SHARDWORKER_LOOP_POLICY_OVERRIDES``)
map each non-normal class to ``publish`` (the default), ``flag`` (publish with
``x-shardworker-flag``) or ``skip`` (no event, no pointer job; the ledger records
``skipped`` with the reason).  Normal mail is always published.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any

from shardworker.errors import ConfigError

HEADER_PREFIX = "x-shardworker-"
HEADER_CLASS = "x-shardworker-class"
HEADER_SIGNALS = "x-shardworker-class-signals"
HEADER_NO_AUTO_REPLY = "x-shardworker-no-auto-reply"
HEADER_FLAG = "x-shardworker-flag"
_OWN_KEYS = (HEADER_CLASS, HEADER_SIGNALS, HEADER_NO_AUTO_REPLY, HEADER_FLAG)

RATE_LIMITED = "sender_rate_limited"

# The headers classification reads: the parser keeps them even past its headers budget,
# or a message stuffed with headers could hide its class (shardworker.mime.headers).
SIGNAL_HEADERS = frozenset({
    "content-type", "auto-submitted", "precedence", "list-id", "list-unsubscribe",
    "return-path", "x-autoreply", "x-autorespond", "x-auto-response-suppress", "x-loop",
})  # fmt: skip


class MailClass(enum.Enum):
    NORMAL = "normal"
    AUTO_REPLY = "auto_reply"
    BULK = "bulk"
    BOUNCE = "bounce"
    COMPLAINT = "complaint"


class Action(enum.Enum):
    PUBLISH = "publish"
    FLAG = "flag"
    SKIP = "skip"


@dataclass(frozen=True)
class Verdict:
    klass: MailClass
    signals: tuple[str, ...] = ()
    no_auto_reply: bool = False


_PARAM = re.compile(r';\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]+)')
_DAEMONS = frozenset({"mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon"})
_SUPPRESS = frozenset({"all", "oof", "autoreply"})
_AUTO_SUBMITTED = frozenset({"auto-generated", "auto-replied", "auto-notified"})


# ---------------------------------------------------------------- classification


def classify(
    headers: Mapping[str, str], sender: str = "", own_addresses: Iterable[str] = ()
) -> Verdict:
    """The class of a message from its headers map (lower-cased names, as in emailData).

    ``sender`` is the From address; ``own_addresses`` are this mailbox's addresses, so an
    ``X-Loop`` naming one of them is recognised as our own mail coming back.
    """
    h = {k.lower(): v for k, v in headers.items()}
    found: dict[MailClass, list[str]] = {}

    def mark(klass: MailClass, signal: str) -> None:
        found.setdefault(klass, []).append(signal)

    _report_signals(h.get("content-type", ""), mark)
    if _local_part(sender) in _DAEMONS:
        mark(MailClass.BOUNCE, "daemon-sender")
    _auto_signals(h, mark)
    _loop_signals(h, own_addresses, mark)
    _list_signals(h, mark)
    null_path = _null_return_path(h.get("return-path", ""))
    klass = _winner(found, null_path=null_path)
    signals = found.get(klass, [])
    if null_path and klass in {MailClass.BOUNCE, MailClass.AUTO_REPLY}:
        signals.append("null-return-path")
    return Verdict(klass, tuple(signals), klass is not MailClass.NORMAL or _asks_no_reply(h))


def classify_email_data(
    email_data: Mapping[str, Any], own_addresses: Iterable[str] = ()
) -> Verdict:
    """:func:`classify` on an ``emailData`` dict (its ``headers`` map and ``from``)."""
    sender = (email_data.get("from") or {}).get("email", "")
    return classify(email_data.get("headers") or {}, str(sender), own_addresses)


def _winner(found: Mapping[MailClass, list[str]], *, null_path: bool) -> MailClass:
    # A DSN from MAILER-DAEMON often also says Auto-Submitted: the structure decides first.
    # A null return path alone is weak: RFC 3834 asks auto-responders to use it too.
    for klass in (MailClass.COMPLAINT, MailClass.BOUNCE, MailClass.AUTO_REPLY):
        if klass in found:
            return klass
    if null_path:
        return MailClass.BOUNCE
    return MailClass.BULK if MailClass.BULK in found else MailClass.NORMAL


def _report_signals(content_type: str, mark: Any) -> None:
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/report":
        return
    params = {k.lower(): v.strip('"').lower() for k, v in _PARAM.findall(content_type)}
    report = params.get("report-type", "")
    if report == "feedback-report":
        mark(MailClass.COMPLAINT, "report-type=feedback-report")
    elif report == "delivery-status":
        mark(MailClass.BOUNCE, "report-type=delivery-status")
    elif report == "disposition-notification":
        mark(MailClass.AUTO_REPLY, "report-type=disposition-notification")


def _auto_signals(h: Mapping[str, str], mark: Any) -> None:
    submitted = h.get("auto-submitted", "").split(";", 1)[0].strip().lower()
    if submitted and submitted != "no":
        token = submitted if submitted in _AUTO_SUBMITTED else "other"
        mark(MailClass.AUTO_REPLY, f"auto-submitted={token}")
    for name in ("x-autoreply", "x-autorespond"):
        if name in h and h[name].strip().lower() not in {"no", "false", "0"}:
            mark(MailClass.AUTO_REPLY, name)
    precedence = {p.strip().lower() for p in h.get("precedence", "").split(",")}
    if "auto_reply" in precedence:
        mark(MailClass.AUTO_REPLY, "precedence=auto_reply")
    for value in ("bulk", "junk", "list"):
        if value in precedence:
            mark(MailClass.BULK, f"precedence={value}")


def _list_signals(h: Mapping[str, str], mark: Any) -> None:
    for name in ("list-id", "list-unsubscribe"):
        if h.get(name, "").strip():
            mark(MailClass.BULK, name)


def _loop_signals(h: Mapping[str, str], own: Iterable[str], mark: Any) -> None:
    loop = h.get("x-loop", "")
    mine = {a.strip().lower() for a in own if a.strip()}
    if loop and mine and mine & set(_addresses(loop)):
        mark(MailClass.AUTO_REPLY, "x-loop")


def _asks_no_reply(h: Mapping[str, str]) -> bool:
    suppress = {v.strip().lower() for v in h.get("x-auto-response-suppress", "").split(",")}
    return bool(suppress & _SUPPRESS) or bool(h.get("x-loop", "").strip())


def _null_return_path(value: str) -> bool:
    # Several Return-Path headers are joined with ", " in the map: the topmost counts.
    first = value.split(",", 1)[0].strip()
    return first in {"<>", "< >"}


def _addresses(value: str) -> list[str]:
    return [addr.lower() for _, addr in getaddresses([value]) if addr]


def _local_part(address: str) -> str:
    return address.rsplit("@", 1)[0].strip().lower() if address else ""


# ---------------------------------------------------------------- policies


@dataclass(frozen=True)
class LoopPolicy:
    """What to do with each non-normal class; normal mail is always published."""

    actions: Mapping[MailClass, Action] = field(default_factory=dict)
    default: Action = Action.PUBLISH

    def action_for(self, klass: MailClass) -> Action:
        if klass is MailClass.NORMAL:
            return Action.PUBLISH
        return self.actions.get(klass, self.default)


def parse_policy(text: str, *, name: str) -> LoopPolicy:
    """``publish`` / ``flag`` / ``skip``, or ``class=action`` pairs (``*`` for the rest):
    ``auto_reply=skip,bounce=skip,*=flag``.  A bad value raises ConfigError naming ``name``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        return LoopPolicy()
    if len(parts) == 1 and "=" not in parts[0]:
        return LoopPolicy(default=_action(parts[0], name))
    actions: dict[MailClass, Action] = {}
    default = Action.PUBLISH
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"{name}: expected class=action, got {part!r}")
        key = key.strip().lower()
        if key == "*":
            default = _action(value, name)
            continue
        klass = next((c for c in MailClass if c.value == key and c is not MailClass.NORMAL), None)
        if klass is None:
            classes = [c.value for c in MailClass if c is not MailClass.NORMAL]
            raise ConfigError(f"{name}: unknown class {key!r}; use one of {classes} or *")
        actions[klass] = _action(value, name)
    return LoopPolicy(actions, default)


def _action(value: str, name: str) -> Action:
    try:
        return Action(value.strip().lower())
    except ValueError:
        raise ConfigError(
            f"{name}: unknown action {value.strip()!r}; use publish, flag or skip"
        ) from None


@dataclass(frozen=True)
class PolicyBook:
    """The default policy and per-provider overrides (provider id → policy)."""

    default: LoopPolicy = field(default_factory=LoopPolicy)
    overrides: Mapping[str, LoopPolicy] = field(default_factory=dict)

    def for_provider(self, provider_id: str) -> LoopPolicy:
        return self.overrides.get(provider_id.lower(), self.default)


def policy_book(default_text: str, overrides_json: str, *, names: tuple[str, str]) -> PolicyBook:
    """Build the book from the two settings; ``names`` are their variable names."""
    default = parse_policy(default_text, name=names[0])
    if not overrides_json.strip():
        return PolicyBook(default)
    try:
        raw = json.loads(overrides_json)
    except ValueError as exc:
        raise ConfigError(f"{names[1]}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ConfigError(f'{names[1]}: expected {{"<provider id>": "<policy>", ...}}')
    overrides = {
        str(pid).lower(): parse_policy(text, name=f"{names[1]}[{pid}]") for pid, text in raw.items()
    }
    return PolicyBook(default, overrides)


# ---------------------------------------------------------------- decision and marking


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    action: Action
    flag: str | None = None  # what x-shardworker-flag says, under Action.FLAG
    reason: str | None = None  # the ledger reason, under Action.SKIP

    @property
    def publish(self) -> bool:
        return self.action is not Action.SKIP


def decide(verdict: Verdict, policy: LoopPolicy, *, rate_held: Action | None = None) -> Decision:
    """Combine the class's policy with the rate guard's answer (None: not held).

    The stricter action wins; a rate-guard hold names ``sender_rate_limited``.
    """
    action = policy.action_for(verdict.klass)
    label = verdict.klass.value
    order = (Action.PUBLISH, Action.FLAG, Action.SKIP)
    if rate_held is not None and order.index(rate_held) >= order.index(action):
        action, label = rate_held, RATE_LIMITED
    if action is Action.SKIP:
        reason = label if label == RATE_LIMITED else f"loop_policy: {label}"
        return Decision(verdict, action, reason=reason)
    if action is Action.FLAG:
        return Decision(verdict, action, flag=label)
    return Decision(verdict, action)


def drop_forged_headers(email_data: Mapping[str, Any]) -> dict[str, Any]:
    """``emailData`` without any ``x-shardworker-*`` header the message itself carried.

    Run once, right after parsing, before any of shardworker's own keys are written.
    """
    data = dict(email_data)
    headers = data.get("headers")
    if isinstance(headers, Mapping):
        data["headers"] = {k: v for k, v in headers.items() if not k.startswith(HEADER_PREFIX)}
    return data


def annotate(email_data: Mapping[str, Any], decision: Decision) -> dict[str, Any]:
    """``emailData`` with the class keys in ``headers`` (a new dict; the input is kept)."""
    data = dict(email_data)
    headers = {k: v for k, v in dict(data.get("headers") or {}).items() if k not in _OWN_KEYS}
    v = decision.verdict
    headers[HEADER_CLASS] = v.klass.value
    if v.signals:
        headers[HEADER_SIGNALS] = ",".join(v.signals)
    if v.no_auto_reply or decision.flag == RATE_LIMITED:
        headers[HEADER_NO_AUTO_REPLY] = "true"
    if decision.flag is not None:
        headers[HEADER_FLAG] = decision.flag
    data["headers"] = headers
    return data
