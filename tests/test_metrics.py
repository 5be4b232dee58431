"""Unit tests of shardworker.metrics, the HTTP endpoint and the observer's health verdicts.

Multiprocess mode changes process-wide state (an environment variable and prometheus_client's
value class), so it is exercised in a fresh interpreter with real spawned children; everything
else runs in-process, where metrics live in memory.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from shardworker import metrics
from shardworker.config import load_settings
from shardworker.db.store import open_pool
from shardworker.engine.sync import SyncResult
from shardworker.errors import (
    ConfigError,
    FencedError,
    ImapAuthError,
    ImapTransientError,
    PublishError,
    SecretError,
    SecretNotFoundError,
)
from shardworker.http import HttpEndpoint, Routes, Verdict, parse_addr
from shardworker.metrics.pod import (
    LeaderSample,
    PodCollector,
    PodSample,
    ProcessSample,
    StreamSample,
    WorkerSample,
)
from shardworker.pool.leader import LeaderStats
from shardworker.pool.observer import PodObserver
from shardworker.pool.registry import Assignment, Registry
from shardworker.pool.supervisor import SlotStats, SupervisorStats

REPO = Path(__file__).resolve().parent.parent
PROMTOOL = "/usr/bin/promtool"
UNITS = ("_seconds", "_bytes", "_messages", "_ratio", "_fds", "_lag", "_length", "_info")


def value(name: str, **labels: str) -> float:
    got = metrics._m().registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def full_sample(is_leader: bool = True) -> PodSample:
    return PodSample(
        workers=[WorkerSample(0, 101, True, 2, 1), WorkerSample(1, None, False, 0, 0)],
        processes=[ProcessSample("coordinator", 1.5, 10_000, 12, 1024)],
        leader=LeaderSample(is_leader, 3, 2, 10, 1, 1.25, {"new": 10, "odd reason!": 1}),
        stream=StreamSample(100, 2, {"workflow-processors": 7}, 7, 5),
        paused={"auth_failure": 2, "manual": 1} if is_leader else None,
        dependencies={"redis": True, "postgres": False},
    )


def render_everything() -> str:
    """A single-process exposition with every hook used once, plus the pod collector."""
    metrics.set_leases_held(3)
    metrics.leases_acquired(3)
    metrics.lease_renewal(3, 1)
    metrics.leases_released(1)
    metrics.observe_rebalance(0.01)
    metrics.session_error(FencedError("stale"))
    metrics.record_sync(SyncResult(published=2, bytes=100, published_at=[1.6, 1.7]), 1.0)
    metrics.timed_imap("examine", lambda: None)
    with metrics.publish_round_trip():
        pass
    metrics.dead_lettered("parse_error: bad header")
    with metrics.DrainProgress(2, {"provider_id": "p", "folder": "INBOX"}) as progress:
        progress.advance(2)
    return metrics.render(PodCollector(full_sample)).decode()


# ---------------------------------------------------------------- names and labels


def test_names_types_and_units_follow_prometheus_conventions() -> None:
    families = list(text_string_to_metric_families(render_everything()))
    assert len(families) >= 45
    for family in families:
        name = family.name
        assert name.startswith("shardworker_"), name
        assert "milli" not in name and not name.endswith(("_ms", "_kb", "_mb")), name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), name
        else:
            assert not name.endswith("_total"), name
        if family.type == "histogram":
            assert name.endswith("_seconds"), name
        if {"duration", "latency", "age"} & set(name.split("_")):
            assert name.endswith("_seconds"), name
        for sample in family.samples:
            assert not {"provider_id", "mailbox", "address", "tenant", "folder", "host",
                        "user", "username", "email"} & set(sample.labels), sample  # fmt: skip


def test_promtool_finds_no_problem_in_the_exposition() -> None:
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=render_everything(),
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert not (lint.stdout + lint.stderr).strip()


def test_every_gauge_names_its_multiprocess_mode() -> None:
    families = metrics._Families()
    gauges = [v for v in vars(families).values() if type(v).__name__ == "Gauge"]
    assert len(gauges) == 10
    for gauge in gauges:
        assert gauge._multiprocess_mode in {"livesum", "livemax", "liveall"}, gauge._name


def test_error_reasons_are_bounded_and_never_a_message() -> None:
    assert metrics.error_reason(SecretNotFoundError("no imap_password_x")) == "secret_missing"
    assert metrics.error_reason(SecretError("key k2 missing")) == "secret_unreadable"
    assert metrics.error_reason(ImapAuthError("x", code="AUTHENTICATIONFAILED")) == (
        "authenticationfailed"
    )
    assert metrics.error_reason(ImapTransientError("x", reason="timeout")) == "timeout"
    assert metrics.error_reason(ImapTransientError("x", reason="a@b.example")) == "other"
    assert metrics.error_reason(ImapTransientError("x", reason="x" * 40)) == "other"
    assert metrics.error_reason(FencedError("lease sw:lease:t:p")) == "fenced"
    assert metrics.error_reason(PublishError("Redis down")) == "publish"
    assert metrics.error_reason(ValueError("anything")) == "other"


# ---------------------------------------------------------------- hooks


def test_session_errors_count_credential_failures_and_fencing() -> None:
    before = (
        value("shardworker_auth_failures_total", reason="secret_missing"),
        value("shardworker_fencing_rejections_total"),
        value("shardworker_session_errors_total", error_type="ImapAuthError", reason="expired"),
    )
    metrics.session_error(SecretNotFoundError("gone"))
    metrics.session_error(FencedError("stale"))
    metrics.session_error(ImapAuthError("no", code="EXPIRED"))
    metrics.session_error(RuntimeError("not ours"))
    after = (
        value("shardworker_auth_failures_total", reason="secret_missing"),
        value("shardworker_fencing_rejections_total"),
        value("shardworker_session_errors_total", error_type="ImapAuthError", reason="expired"),
    )
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
    assert value("shardworker_session_errors_total", error_type="other", reason="other") >= 1


def test_sync_results_feed_messages_bytes_and_push_latency() -> None:
    published = value("shardworker_messages_total", result="published")
    count = value("shardworker_push_latency_seconds_count")
    under_1s = value("shardworker_push_latency_seconds_bucket", le="1.0")
    result = SyncResult(published=2, duplicates=1, bytes=500, published_at=[10.6, 10.7])
    metrics.record_sync(result, exists_seen_at=10.0)
    metrics.record_sync(SyncResult(published=1, published_at=[20.0]), exists_seen_at=None)
    assert value("shardworker_messages_total", result="published") - published == 3
    assert value("shardworker_push_latency_seconds_count") - count == 2
    assert value("shardworker_push_latency_seconds_bucket", le="1.0") - under_1s == 2


def test_imap_and_publish_timing_record_failures_too() -> None:
    count = value("shardworker_imap_command_duration_seconds_count", command="connect")
    fenced = value("shardworker_publish_batches_total", result="fenced")
    errors = value("shardworker_publish_batches_total", result="error")

    def refuse() -> None:
        raise ImapTransientError("refused", reason="refused")

    with pytest.raises(ImapTransientError):
        metrics.timed_imap("connect", refuse)
    assert metrics.timed_imap("connect", lambda x: x + 1, 1) == 2
    for exc in (FencedError("stale"), PublishError("down")):
        with pytest.raises(type(exc)), metrics.publish_round_trip():
            raise exc
    assert value("shardworker_imap_command_duration_seconds_count", command="connect") - count == 2
    assert value("shardworker_publish_batches_total", result="fenced") - fenced == 1
    assert value("shardworker_publish_batches_total", result="error") - errors == 1


def test_drain_progress_moves_the_backlog_and_logs_long_drains(
    caplog: pytest.LogCaptureFixture,
) -> None:
    start = value("shardworker_sync_backlog_messages")
    fields = {"provider_id": "p1", "folder": "INBOX"}
    with caplog.at_level(logging.INFO, logger="shardworker.metrics"):
        with metrics.DrainProgress(2500, fields) as progress:
            assert value("shardworker_sync_backlog_messages") - start == 2500
            progress.advance(1000)
            progress.advance(500)
            assert value("shardworker_sync_backlog_messages") - start == 1000
        # Stopped early (backpressure): the rest leaves the gauge too.
        assert value("shardworker_sync_backlog_messages") == start
        with metrics.DrainProgress(3, fields) as short:
            short.advance(3)
    events = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    assert [e for e, _ in events] == ["drain_progress", "drain_finished"]
    assert events[0][1]["done"] == 1000 and events[0][1]["provider_id"] == "p1"
    assert events[1][1]["done"] == 1500 and events[1][1]["total"] == 2500


def test_dead_letter_reasons_drop_the_detail() -> None:
    before = value("shardworker_dead_letters_total", reason="parse_error")
    metrics.dead_lettered("parse_error: header of alice@example.com is broken")
    assert value("shardworker_dead_letters_total", reason="parse_error") - before == 1


# ---------------------------------------------------------------- the pod collector


def test_pod_collector_exports_supervisor_leader_stream_and_processes() -> None:
    text = metrics.render(PodCollector(full_sample)).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("shardworker_workers", (("state", "ready"),))] == 1
    assert samples[("shardworker_workers", (("state", "down"),))] == 1
    assert samples[("shardworker_worker_restarts_total", (("worker", "0"),))] == 2
    assert samples[("shardworker_is_leader", ())] == 1
    assert samples[("shardworker_assignment_moves_total", (("reason", "new"),))] == 10
    assert samples[("shardworker_assignment_moves_total", (("reason", "other"),))] == 1
    assert samples[("shardworker_providers_paused", (("reason", "auth_failure"),))] == 2
    assert samples[("shardworker_providers_paused", (("reason", "tenant_cancelled"),))] == 0
    assert samples[("shardworker_backpressure_active", ())] == 1
    assert samples[("shardworker_stream_consumer_lag", (("group", "workflow-processors"),))] == 7
    assert samples[("shardworker_dependency_up", (("dependency", "postgres"),))] == 0
    assert samples[("shardworker_process_cpu_seconds_total", (("process", "coordinator"),))] == 1.5
    follower = metrics.render(PodCollector(lambda: full_sample(is_leader=False))).decode()
    assert "shardworker_is_leader 0.0" in follower
    for leader_only in ("providers_servable", "providers_paused", "assignment_imbalance_ratio"):
        assert f"shardworker_{leader_only}" not in follower


# ---------------------------------------------------------------- multiprocess mode


def _child(held: int, lost: int, published: int) -> None:
    metrics.set_leases_held(held)
    metrics.lease_renewal(held, lost)
    metrics.record_sync(SyncResult(published=published), None)


def multiprocess_scenario(configured: str) -> None:
    """Runs in a fresh interpreter: a 'coordinator' with two spawned 'workers'."""
    Path(configured, "counter_999999.db").write_bytes(b"stale")
    Path(configured, "keep.txt").write_text("not ours")
    target = metrics.use_multiprocess_dir(configured)
    private = metrics.use_multiprocess_dir("")
    metrics.use_multiprocess_dir(configured)
    private.close()
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_child, args=a) for a in ((3, 2, 5), (5, 1, 7))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    held = metrics.leases_held_by_pid()
    before = metrics.render().decode()
    metrics.mark_process_dead(workers[1].pid or 0)
    after = metrics.render().decode()
    out = {
        "before": before, "after": after, "held": held,
        "pids": [w.pid for w in workers], "files": sorted(os.listdir(target.path)),
        "private_gone": not os.path.exists(private.path),
    }  # fmt: skip
    print(json.dumps(out))


def _values(text: str) -> dict[str, float]:
    return {
        s.name + json.dumps(s.labels, sort_keys=True): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_multiprocess_mode_merges_workers_and_forgets_dead_ones(tmp_path: Path) -> None:
    code = f"import tests.test_metrics as t; t.multiprocess_scenario({str(tmp_path)!r})"
    env = {k: v for k, v in os.environ.items() if k != metrics.ENV_DIR}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    before, after = _values(out["before"]), _values(out["after"])
    a, b = out["pids"]
    assert before["shardworker_providers_owned{}"] == 8  # livesum over both workers
    assert after["shardworker_providers_owned{}"] == 3  # the dead one is forgotten
    assert out["held"] == {str(a): 3, str(b): 5}
    assert f'shardworker_leases_held{{"pid": "{b}"}}' not in after
    # Counters of a dead worker keep counting: totals never go backwards.
    assert after["shardworker_leases_lost_total{}"] == 3
    assert after['shardworker_messages_total{"result": "published"}'] == 12
    assert "counter_999999.db" not in out["files"] and "keep.txt" in out["files"]
    assert out["private_gone"]
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=out["before"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout


# ---------------------------------------------------------------- the HTTP endpoint


def _fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_http_endpoint_routes_probes_and_stops() -> None:
    state = {"live": Verdict(True), "ready": Verdict(False, ("redis unreachable",))}

    def broken() -> bytes:
        raise RuntimeError("password=hunter2")

    endpoint = HttpEndpoint("127.0.0.1:0", Routes(
        metrics=lambda: b"shardworker_up 1\n", liveness=lambda: state["live"],
        readiness=lambda: state["ready"],
    ))  # fmt: skip
    endpoint.start()
    base = f"http://127.0.0.1:{endpoint.port}"
    try:
        assert _fetch(f"{base}/metrics")[:2] == (200, metrics.CONTENT_TYPE)
        assert _fetch(f"{base}/healthz")[0] == 200
        code, ctype, body = _fetch(f"{base}/readyz?verbose=1")
        assert (code, ctype) == (503, "application/json")
        assert json.loads(body) == {"status": "unavailable", "problems": ["redis unreachable"]}
        assert _fetch(f"{base}/other")[0] == 404
    finally:
        port = endpoint.port
        endpoint.stop()
    # The listening socket is closed: a restarted coordinator gets the same port back.
    failing = HttpEndpoint(f"127.0.0.1:{port}", Routes(broken, endpoint.routes.liveness, broken))
    failing.start()
    try:
        code, _, body = _fetch(f"http://127.0.0.1:{failing.port}/metrics")
        assert code == 500 and "hunter2" not in body
    finally:
        failing.stop()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            HttpEndpoint(f"127.0.0.1:{busy.getsockname()[1]}", endpoint.routes).start()
    finally:
        busy.close()


def test_metrics_addresses_parse_or_fail_clearly() -> None:
    assert parse_addr("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_addr(":9464") == ("0.0.0.0", 9464)
    assert parse_addr("[::]:9464") == ("::", 9464)
    for bad in ("9464", "host:port", "host:70000"):
        with pytest.raises(ConfigError, match="SHARDWORKER_METRICS_ADDR"):
            parse_addr(bad)


# ---------------------------------------------------------------- health verdicts


@dataclass
class FakeSupervisor:
    """The one method the observer calls; the supervisor itself is tested elsewhere."""

    slots: tuple[SlotStats, ...]
    draining: bool = False

    def stats(self) -> SupervisorStats:
        return SupervisorStats(self.slots, self.draining)


@dataclass
class FakeLeader:
    stats: LeaderStats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def observed(pg_dsn: str, redis_url: str) -> Iterator[tuple[PodObserver, FakeSupervisor, Clock]]:
    settings = load_settings({
        "SHARDWORKER_DATABASE_URL": pg_dsn, "SHARDWORKER_REDIS_URL": redis_url,
        "SHARDWORKER_POD_NAME": "pod-x", "SHARDWORKER_METRICS_ADDR": "127.0.0.1:0",
    })  # fmt: skip
    slots = (SlotStats(0, os.getpid(), True, 0, 0, None), SlotStats(1, None, False, 1, 0, -9))
    supervisor, clock = FakeSupervisor(slots), Clock()
    pool = open_pool(pg_dsn, max_size=1)
    observer = PodObserver(settings, supervisor, FakeLeader(LeaderStats()), pool, clock)  # type: ignore[arg-type]
    yield observer, supervisor, clock
    observer.stop()
    pool.close()


def test_liveness_is_the_loop_and_workers_readiness_adds_members_and_stores(
    observed: tuple[PodObserver, FakeSupervisor, Clock], redis_url: str
) -> None:
    observer, supervisor, clock = observed
    assert observer.liveness().problems == ("coordinator loop is not ticking",)
    assert observer.readiness().problems == ("starting",)
    observer.tick()
    assert observer.liveness().ok
    clock.now += 91  # worker 1 has been down too long; and the loop stopped ticking
    assert observer.liveness().problems == (
        "coordinator loop is not ticking",
        "worker 1 not ready for 91s",
    )
    observer.tick()
    observer.probe_once()
    ready = observer.readiness()
    assert not ready.ok
    assert "worker 1 not ready" in ready.problems
    assert "worker 0 is not heartbeating" in ready.problems
    supervisor.slots = (supervisor.slots[0],)
    registry = Registry(redis.Redis.from_url(redis_url))
    registry.heartbeat("pod-x/0")
    observer.tick()
    observer.probe_once()
    assert observer.readiness() == Verdict(True, ())
    clock.now += 6  # the probes are too old to trust
    assert observer.readiness().problems == ("dependency probes are stale",)
    supervisor.draining = True
    observer.tick()
    assert observer.readiness().problems == ("draining",)
    assert observer.liveness().ok
    sample = observer.sample()
    assert sample.dependencies == {"redis": True, "postgres": True}
    assert sample.stream is not None and sample.stream.length == 0
    assert [p.name for p in sample.processes] == ["coordinator", "worker-0"]


def test_readiness_wants_a_lease_when_providers_are_assigned(
    observed: tuple[PodObserver, FakeSupervisor, Clock], redis_url: str
) -> None:
    observer, supervisor, _ = observed
    supervisor.slots = (supervisor.slots[0],)
    client = redis.Redis.from_url(redis_url)
    registry = Registry(client)
    registry.heartbeat("pod-x/0")
    token = registry.elect("test-leader", 5.0, None)
    assert token is not None
    registry.publish(token, Assignment(1, 1, {"t:p1": "pod-x/0"}), ["pod-x/0"], [])
    observer.tick()
    observer.probe_once()
    assert observer.readiness().problems == ("worker 0 holds no lease of 1 assigned",)


def test_down_dependencies_make_the_pod_unready_but_alive(pg_dsn: str, tmp_path: Path) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    settings = load_settings({
        "SHARDWORKER_DATABASE_URL": pg_dsn,
        "SHARDWORKER_REDIS_URL": f"redis://127.0.0.1:{dead.getsockname()[1]}/0",
        "SHARDWORKER_METRICS_ADDR": "127.0.0.1:0",
    })  # fmt: skip
    supervisor = FakeSupervisor((SlotStats(0, os.getpid(), True, 0, 0, None),))
    pool = open_pool(pg_dsn, max_size=1)
    leader: Any = FakeLeader(LeaderStats())
    observer = PodObserver(settings, supervisor, leader, pool)  # type: ignore[arg-type]
    try:
        observer.tick()
        observer.probe_once()
        assert observer.readiness().problems == ("redis unreachable",)
        assert observer.liveness().ok
        assert observer.sample().dependencies == {"redis": False, "postgres": True}
    finally:
        observer.stop()
        pool.close()
        dead.close()
