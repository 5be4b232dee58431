"""The partition run's table (bench/README.md) and its JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from bench.partition_support.run import PhaseResult, RunReport

HEADER = (
    "| fault | pod | delivered | published (stream / pointer) | lost (stream / pointer) "
    "| duplicated (stream / pointer) | consumer read twice (new event_id) | takeover "
    "| full service after heal | stale publishes |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def row(p: PhaseResult) -> str:
    stale = p.stale.published_after_loss + p.stale.published_while_cut
    return (
        f"| {p.title} | {p.pod} | {p.delivered} | {p.stream.published} / {p.pointer.published} "
        f"| {p.stream.lost} / {p.pointer.lost} | {p.stream.duplicated} / {p.pointer.duplicated} "
        f"| {p.consumer_duplicates} ({p.consumer_new_event_ids}) | {_s(p.takeover_s)} "
        f"| {_s(p.recovered_s)} | {stale} "
        f"({p.stale.leases_lost} leases lost) |"
    )


def format_table(report: RunReport) -> str:
    lines = [HEADER, *(row(p) for p in report.phases), row(report.total)]
    plan = report.plan
    lines.append(
        f"\n{plan.mailboxes} mailboxes, {plan.pods} pods x 2 workers, ready in "
        f"{report.ready_s:.1f} s; load average at the end: {report.loadavg}"
    )
    for p in report.phases:
        if p.stream.lost_ids or p.stream.duplicated_ids:
            lines.append(
                f"{p.fault}: lost {p.stream.lost_ids} duplicated {p.stream.duplicated_ids}"
            )
        if p.failover:
            lines.append(f"{p.fault}: {p.failover}")
    return "\n".join(lines)


def as_json(report: RunReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "ready_s": round(report.ready_s, 1),
        "loadavg": report.loadavg,
        "plan": {
            "mailboxes": report.plan.mailboxes,
            "pods": report.plan.pods,
            "per_mailbox": report.plan.per_mailbox,
            "faults": [f.name for f in report.plan.faults],
        },
        "phases": [dataclasses.asdict(p) for p in [*report.phases, report.total]],
    }
