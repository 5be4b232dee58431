"""A chaos run's figures as text (printed by the bench, attached to a failing test)."""

from __future__ import annotations

from bench.chaos_support.run import ChaosReport


def format_report(report: ChaosReport) -> str:
    a, plan, log = report.accounting, report.plan, report.faults
    lines = [
        f"chaos: {plan.messages} messages over {plan.mailboxes} mailboxes, {plan.pods} pods "
        f"x 2 workers, seed {plan.seed}",
        f"  pool ready         {report.ready_s:.1f} s",
        f"  delivery           {report.delivery_s:.1f} s at {plan.rate_per_s:g} msg/s, "
        f"{report.ambiguous_appends} APPEND(s) retried",
        f"  backlog settled    {report.settle_s:.1f} s after the last delivery",
        f"  faults             {log.worker_kills} worker SIGKILLs, {log.pod_kills} pod "
        f"SIGKILLs (+ restart), {len(log.stopped)} SIGSTOP/SIGCONT, "
        f"{log.self_exits} pod exit(s) on its own (restarted)",
        "",
        f"  delivered          {a.delivered} of {plan.per_mailbox * plan.mailboxes} planned",
        f"  published          {a.published} stream entries",
        f"  lost               {a.lost}",
        f"  duplicated         {a.duplicated}",
        f"  unexpected         {a.unexpected} (entries never recorded as delivered)",
        f"  dead-lettered      {a.dead_lettered}",
        f"  delay APPEND→XADD  p50 {a.delay_pct_ms(50)} ms, p99 {a.delay_pct_ms(99)} ms, "
        f"max {a.max_delay_ms} ms",
        "",
        "  fault timeline (s into delivery, kind, detail, time taken):",
    ]
    for ev in log.events:
        if ev.kind in ("worker_kill", "pod_kill", "pod_restart") and not ev.error:
            continue
        status = f"  ERROR {ev.error}" if ev.error else ""
        lines.append(f"    {ev.at_s:7.1f}  {ev.kind:<16} {ev.detail} ({ev.took_s} s){status}")
    kills = [f"{ev.at_s:.0f}:{ev.kind.split('_')[1]}" for ev in log.events
             if ev.kind in ("worker_kill", "pod_kill", "pod_restart")]  # fmt: skip
    lines.append(f"    kills and restarts at: {' '.join(kills)}")
    for st in report.stale_owners:
        lines.append(f"  stale owner {st.member} (pid {st.pid}) after SIGCONT: "
                     f"{st.leases_lost} leases lost, {st.fenced_errors} writes fenced, "
                     f"{st.stale_publishes} published past its fence")  # fmt: skip
    t0 = report.delivery_started_ms
    slow = ", ".join(f"{d} ms @ {(sent - t0) / 1000:.1f} s" for d, sent, _ in a.slowest[:10])
    lines.append(f"  slowest (delay @ APPEND time into delivery): {slow}")
    lines.append(f"  proxy: {report.proxy}")
    if a.lost_ids:
        lines.append(f"  lost ids (first 20): {list(a.lost_ids[:20])}")
    if a.duplicated_ids:
        lines.append(f"  duplicated ids (first 20): {list(a.duplicated_ids[:20])}")
    return "\n".join(lines)
