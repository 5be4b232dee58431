"""A real Prometheus scraping a real pool (`shardworker run`, 2 workers) during an integration run.

Every dashboard panel query and every alert expression runs through Prometheus' HTTP API and
must return data; alerts are shown firing by causing their faults for real (an auth-failing
provider, a consumer that stops reading, leases deleted, a hidden password plus a crash-looping
worker, a stolen leadership, the coordinator killed); `promtool check metrics` finds nothing in
the live scrape; and no password, key or token appears in any log of the run.

The tests of this module share one scenario and run in file order (the last ones stop the pool).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shardworker.db.migrate import migrate
from shardworker.db.store import Store
from shardworker.exitcodes import ExitCode
from shardworker.secrets.store import secret_name
from tests.harness.net import free_port, wait_for_port
from tests.harness.pg import PG_ADMIN_DSN, create_database, drop_database, dsn_for
from tests.support import (
    STREAM,
    TEST_KEYS,
    Rig,
    WorkerProcess,
    make_mail,
    rig_settings,
    wait_until,
    worker_env,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
RULES = REPO / "grafana" / "alerts" / "shardworker.rules.yaml"
RULE_TESTS = sorted((REPO / "grafana" / "alerts" / "tests").glob("*.yaml"))
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
GROUP = "sw-obs-consumer"
MAX_LAG = 6
# What Grafana's $__rate_interval becomes here: the whole run fits in it.
RATE_WINDOW = "5m"
ALLOWED_LABELS = {"state", "result", "command", "error_type", "reason", "process", "worker",
                  "group", "dependency", "version", "python", "pid", "le",
                  "class", "action", "kind"}  # fmt: skip


# ---------------------------------------------------------------- helpers


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


class Prometheus:
    """Debian's prometheus on a free port, scraping one target every second."""

    def __init__(self, workdir: Path, target: str, rules: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": "shardworker", "static_configs": [{"targets": [target]}]}
            ],
        }  # fmt: skip
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(lambda: not self._alive() or self._ready(), 30)
        assert self._alive(), self.log_path.read_text()

    def _alive(self) -> bool:
        return self.proc.poll() is None

    def _ready(self) -> bool:
        try:
            return _get(f"{self.url}/-/ready")[0] == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        code, body = _get(f"{self.url}/api/v1/{path}?{query}")
        reply = json.loads(body)
        assert code == 200 and reply["status"] == "success", (path, params, reply)
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else float("nan")

    def firing(self) -> set[str]:
        alerts = self.api("alerts")["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

    def wait_firing(self, alert: str, timeout_s: float = 45.0) -> float:
        started = time.monotonic()
        try:
            wait_until(lambda: alert in self.firing(), timeout_s, every_s=0.5)
        except AssertionError:
            rule = next(r for r in rules_of(RULES) if r["alert"] == alert)
            names = metric_names(rule["expr"])
            history = {n: self.api("query", query=f"{n}[3m]")["result"] for n in names}
            raise AssertionError(f"{alert} never fired: {rule['expr']}\n{history}") from None
        return time.monotonic() - started

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


class Consumer:
    """A consumer group that reads everything (until stopped): lag stays 0."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.client.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            self.client.xreadgroup(GROUP, "obs-test", {STREAM: ">"}, count=100, block=100)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


@dataclass
class Scenario:
    rig: Rig
    pool: WorkerProcess
    prom: Prometheus
    consumer: Consumer
    metrics_url: str
    log_path: Path
    providers: dict[str, str]
    users: dict[str, str]
    wrong_password: str
    secrets: list[str] = field(default_factory=list)
    scrapes: list[str] = field(default_factory=list)

    def scrape(self) -> str:
        code, body = _get(f"{self.metrics_url}/metrics")
        assert code == 200
        self.scrapes.append(body.decode())
        return self.scrapes[-1]

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines of the run (anything else, e.g. a traceback, is kept as ``raw``)."""
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "raw", "raw": line})
        return out

    def worker_pid(self, slot: int) -> int:
        starts = [
            line["pid"]
            for line in self.log_lines()
            if line.get("role") == "coordinator"
            and line["event"] in ("worker_started", "worker_restarted")
            and line.get("slot") == slot
        ]
        return int(starts[-1])

    def worker_pids(self) -> set[int]:
        return {self.worker_pid(i) for i in (0, 1)}

    def health(self, path: str) -> int:
        return _get(f"{self.metrics_url}{path}")[0]


def rules_for_test(workdir: Path) -> Path:
    """The production rules with every `for:` at 0s: a fault fires at the next evaluation."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    path = workdir / "rules.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def rules_of(path: Path) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bshardworker_[a-z_]+\b", expr))


def panel_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", RATE_WINDOW)
                out.append((board["uid"], panel["title"], expr))
    return out


# ---------------------------------------------------------------- the scenario


@pytest.fixture(scope="module")
def scenario(
    redis_server: str, dovecot: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    workdir = tmp_path_factory.mktemp("observability")
    db = create_database(PG_ADMIN_DSN)
    dsn = dsn_for(PG_ADMIN_DSN, db)
    migrate(dsn)
    redis_url = f"{redis_server}/0"
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    admin_token = os.urandom(12).hex()
    settings = rig_settings(
        dsn, redis_url, str(dovecot.cafile), workers="2", metrics_addr=f"127.0.0.1:{port}",
        metrics_dir=str(workdir / "metrics"), leader_round_s="0.5", leader_ttl_s="3",
        lease_ttl_s="4", lease_renew_s="1", member_grace_s="4", assignment_poll_s="0.2",
        join_debounce_s="0.2", provider_refresh_s="1", auth_failure_pause_threshold="2",
        backpressure_group=GROUP, backpressure_max_lag=str(MAX_LAG), stream_maxlen="10000",
        backpressure_check_s="0.2", drain_deadline_s="5", admin_token=admin_token,
    )  # fmt: skip
    rig = Rig(settings, dovecot)
    users, providers = {}, {}
    # d's stored password is wrong: the server rejects it until the provider is paused.
    wrong = f"wrong-{os.urandom(6).hex()}"
    for name in ("a", "b", "c", "d", "e"):
        user, password = dovecot.add_user()
        users[name] = user
        if name != "d":  # d joins later, during the faults
            providers[name] = rig.add_provider(user, password)
    secrets = [dovecot.password(u) for u in users.values()]
    secrets += [wrong, admin_token, TEST_KEYS.split(":", 1)[1]]
    consumer = Consumer(redis_url)
    consumer.start()
    pool = WorkerProcess(settings, str(workdir / "pool.log"))
    pool.start()
    prom = Prometheus(workdir, f"127.0.0.1:{port}", rules_for_test(workdir))
    s = Scenario(rig, pool, prom, consumer, f"http://127.0.0.1:{port}", workdir / "pool.log",
                 providers, users, wrong, secrets)  # fmt: skip
    try:
        wait_for_port(port, timeout_s=60)
        wait_until(lambda: s.health("/readyz") == 200, 90, every_s=0.5)
        wait_until(lambda: prom.value('sum(shardworker_connections{state="idle"})') >= 4, 60)
        for name in ("a", "b", "c"):
            for _ in range(2):
                dovecot.append(users[name], "INBOX", make_mail())
        published = 'sum(shardworker_messages_total{result="published"})'
        wait_until(lambda: prom.value(published) >= 6, 30, every_s=0.5)
        wait_until(lambda: prom.value("sum(shardworker_push_latency_seconds_count)") >= 1, 10)
        # A dropped connection and its reconnect, while Prometheus watches.
        dovecot.kick(users["b"])
        reconnects = 'sum(increase(shardworker_imap_connects_total{result="ok"}[5m]))'
        wait_until(lambda: prom.value(reconnects) > 0, 30, every_s=0.5)
        errors = "sum(rate(shardworker_session_errors_total[5m]))"
        wait_until(lambda: prom.query(errors), 30, every_s=0.5)
        yield s
    finally:
        consumer.stop()
        try:
            pids = s.worker_pids()
        except (OSError, IndexError):
            pids = set()
        pool.stop()
        _reap(pids)
        prom.stop()
        rig.close()
        drop_database(db)


def _reap(pids: set[int]) -> None:
    """Workers orphaned by a killed coordinator drain on their own; SIGKILL the slow ones."""
    deadline = time.monotonic() + 15
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------- tests


def test_promtool_checks_and_unit_tests_the_alert_rules(tmp_path: Path) -> None:
    checked = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                             text=True, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 13 rules found" in checked.stdout
    assert RULE_TESTS, "grafana/alerts/tests/ holds no promtool unit tests"
    tested = subprocess.run([PROMTOOL, "test", "rules", *map(str, RULE_TESTS)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    covered = {
        t["alertname"]
        for path in RULE_TESTS
        for case in yaml.safe_load(path.read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert covered == alerts, f"alerts without a promtool unit test: {alerts - covered}"


def test_live_scrape_is_clean_bounded_and_health_probes_answer(scenario: Scenario) -> None:
    text = scenario.scrape()
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 48
    forbidden = set(scenario.providers.values()) | set(scenario.users.values())
    forbidden |= {scenario.rig.tenant} | {f"{u}@example.com" for u in scenario.users.values()}
    for family in families:
        assert family.name.startswith("shardworker_"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)
            assert not forbidden & set(sample.labels.values()), (sample.name, sample.labels)
    assert scenario.health("/healthz") == 200
    assert scenario.health("/readyz") == 200
    assert scenario.health("/nothing") == 404
    env = worker_env(scenario.rig.settings)
    for args in ((), ("--ready",)):
        probe = subprocess.run(
            [sys.executable, "-m", "shardworker", "check-health", *args],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        assert json.loads(probe.stdout)["status"] == "ok"


def test_every_dashboard_panel_query_returns_data(scenario: Scenario) -> None:
    queries = panel_queries()
    assert len(DASHBOARDS) == 5 and len(queries) >= 60
    empty, nan_only = [], []
    for uid, title, expr in queries:
        result = scenario.prom.query(expr)
        values = [float(r["value"][1]) for r in result]
        if not result:
            empty.append(f"{uid} / {title}: {expr}")
        elif not any(math.isfinite(v) for v in values):
            nan_only.append(f"{uid} / {title}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert not nan_only, "queries with only NaN:\n" + "\n".join(nan_only)
    uids = {json.loads(p.read_text())["uid"] for p in DASHBOARDS}
    assert uids == {"shardworker-overview", "shardworker-balance-leases", "shardworker-imap-red",
                    "shardworker-ingest", "shardworker-resources"}  # fmt: skip


def test_every_alert_expression_evaluates_on_live_metrics(scenario: Scenario) -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        scenario.prom.query(rule["expr"])  # asserts status success
        for name in metric_names(rule["expr"]):
            assert scenario.prom.query(f"count({name})"), f"{rule['alert']}: no series {name}"
    loaded = scenario.prom.api("rules")["groups"]
    states = {r["name"]: r["health"] for g in loaded for r in g["rules"]}
    assert set(states) == {r["alert"] for r in rules}
    assert set(states.values()) == {"ok"}, states


def test_alerts_fire_when_their_faults_are_caused(scenario: Scenario) -> None:
    s, prom, timings = scenario, scenario.prom, {}
    quiet = {
        "ShardworkerBackpressure",
        "ShardworkerConsumerLag",
        "ShardworkerLeaseLoss",
        "ShardworkerWorkerCrashLoop",
        "ShardworkerNoLeader",
        "ShardworkerProvidersFailing",
        "ShardworkerProvidersPausedForAuth",
        "ShardworkerCredentialFailures",
    }
    # Healthy first (the fixture's reconnects may still be settling): the faults make them fire.
    wait_until(lambda: not quiet & prom.firing(), 20, every_s=0.5)

    # 1. d is added with a wrong password: two rejected logins pause it (auth_failure).
    d = s.providers["d"] = s.rig.add_provider(s.users["d"], s.wrong_password)
    timings["auth pause"] = prom.wait_firing("ShardworkerProvidersPausedForAuth")
    prom.wait_firing("ShardworkerCredentialFailures")
    # The operator fixes the password and resumes it: the leader logs the resume.
    s.rig.secrets.put(
        s.rig.tenant, d, secret_name("password", d), s.rig.dovecot.password(s.users["d"])
    )
    Store(s.rig.pool).resume(s.rig.tenant, d)
    wait_until(lambda: any(x["event"] == "provider_resumed" for x in s.log_lines()), 20, 0.2)

    # 2. The consumer group stops reading: the backlog passes the bound.
    s.consumer.stop()
    for _ in range(MAX_LAG + 2):
        s.rig.dovecot.append(s.users["a"], "INBOX", make_mail())
    timings["backpressure"] = prom.wait_firing("ShardworkerBackpressure")
    prom.wait_firing("ShardworkerConsumerLag")
    s.consumer.start()

    # 3. Every provider lease vanishes from Redis: the workers lose them (and take them back).
    for key in s.rig.redis.scan_iter(match="sw:lease:*"):
        s.rig.redis.delete(key)
    timings["lease loss"] = prom.wait_firing("ShardworkerLeaseLoss")

    # 4. e's password is hidden, and the worker serving it crash-loops (4 SIGKILLs).
    s.rig.secrets.delete_provider_secrets(s.rig.tenant, s.providers["e"])
    owner = s.rig.redis.get(f"sw:lease:{s.rig.tenant}:{s.providers['e']}")
    slot = int(owner.decode().split("|")[0].rsplit("/", 1)[1]) if owner else 0
    started = time.monotonic()
    for _ in range(4):
        pid = s.worker_pid(slot)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: s.worker_pid(slot) != pid, 30, every_s=0.1)  # noqa: B023
    assert s.health("/readyz") == 503  # a restarted worker is not ready at once
    assert s.health("/healthz") == 200  # the coordinator and its loop are fine
    prom.wait_firing("ShardworkerWorkerCrashLoop")
    timings["crash loop"] = time.monotonic() - started
    timings["hidden password"] = prom.wait_firing("ShardworkerProvidersFailing", 60)
    assert prom.query('shardworker_auth_failures_total{reason="secret_missing"} > 0')

    # 5. Another (dead) pod holds the leadership: nobody here leads.
    s.rig.redis.set("sw:leader", "ghost-pod|999999", px=30_000)
    timings["no leader"] = prom.wait_firing("ShardworkerNoLeader")
    s.rig.redis.delete("sw:leader")
    wait_until(lambda: prom.value("max(shardworker_is_leader)") == 1, 30, every_s=0.5)
    print("alert fired after (s):", {k: round(v, 1) for k, v in timings.items()})


def test_killing_the_coordinator_fires_no_leader_and_fails_health(scenario: Scenario) -> None:
    s = scenario
    wait_until(lambda: "ShardworkerNoLeader" not in s.prom.firing(), 30, every_s=0.5)
    pids = s.worker_pids()
    s.pool.signal(signal.SIGKILL)
    s.pool.wait()
    s.prom.wait_firing("ShardworkerNoLeader")
    assert s.prom.query('up{job="shardworker"} == 0')
    env = worker_env(s.rig.settings)
    for args in ((), ("--ready",)):
        probe = subprocess.run(
            [sys.executable, "-m", "shardworker", "check-health", *args],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert probe.returncode == ExitCode.UNHEALTHY, probe.stdout
    _reap(pids)


def test_logs_carry_context_and_never_a_secret(scenario: Scenario) -> None:
    s = scenario
    s.pool.stop()
    lines = s.log_lines()
    events = {line["event"] for line in lines}
    expected = {
        "connected", "idle_started", "new_messages", "published", "disconnected",
        "session_error", "lease_acquired", "lease_lost", "leader_elected", "leader_lost",
        "provider_paused", "provider_resumed", "worker_restarted", "http_listening",
    }  # fmt: skip
    assert expected <= events, expected - events
    for line in lines:
        if line.get("role") != "coordinator":
            assert "worker" in line and "pid" in line, line
        if line["event"] in ("connected", "idle_started", "new_messages", "published"):
            assert line.get("provider_id") and line.get("folder"), line
    texts = {"pool log": s.log_path.read_text(), "prometheus log": s.prom.log_path.read_text(),
             "metrics": "\n".join(s.scrapes)}  # fmt: skip
    for name, text in texts.items():
        for secret in s.secrets:
            assert secret not in text, f"a secret appears in the {name}"
