"""The container image, built from the real Dockerfile and run the way the Helm chart runs it.

The base image is Debian bookworm with Debian's Python 3.11, made by docker/bookworm-base.sh
(debootstrap from the apt mirror this machine uses, imported into podman, cached by a tag
naming its recipe) and passed pinned by digest as PYTHON_IMAGE; the Dockerfile is otherwise
built as it is. The chart is rendered (helm-python-sdk) and its migration Job and
StatefulSet pod become `podman run` flags (tests/image_support.py): uid 10001, read-only
root filesystem, every capability dropped, no privilege escalation, the emptyDir volumes as
tmpfs, the chart's command and environment. The pod runs on the host network against the
session's real PostgreSQL, Redis and Dovecot.

Select these with `-m image`; `make test` runs them (podman from scripts/install-deps.sh).
The tests of the running pod share one container and run in file order; the last one stops
it with SIGTERM.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import psycopg
import pytest
import redis
import yaml

from shardworker.db.providers import create_provider
from shardworker.db.store import open_pool
from shardworker.secrets.store import SecretStore, secret_name
from tests.harness.dovecot import Dovecot
from tests.harness.net import free_port
from tests.harness.pg import PG_ADMIN_DSN, create_database, drop_database, dsn_for
from tests.image_support import (
    REPO,
    RLIMITS,
    PodmanError,
    PodRun,
    build_image,
    ensure_base_image,
    image_config,
    pod_run,
    podman,
    proc_status,
    process_tree,
)
from tests.support import STREAM, TEST_KEYS, events, make_mail, rig_settings, wait_until

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(1200)]

CHART = REPO / "helm" / "shardworker"
POD = "shardworker-0"
IMAGE_TAG = "localhost/shardworker:test"
IMAGE_SIZE_BUDGET = 400 * 1024 * 1024  # the debootstrap base is ~150 MB of it
READY_TIMEOUT_S = 60.0


def report(config: pytest.Config, line: str) -> None:
    """A figure on the terminal whatever the capture mode (docs/deployment.md quotes them)."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or terminal is None:
        return
    with capture.global_and_fixture_disabled():
        terminal.write_line(f"\nimage: {line}")


@dataclass
class Built:
    tag: str  # the image id: a concurrent build elsewhere may move IMAGE_TAG
    base: str
    config: dict[str, Any]


@pytest.fixture(scope="module")
def image(pytestconfig: pytest.Config) -> Iterator[Built]:
    base, base_s = ensure_base_image()
    image_id, build_s = build_image(IMAGE_TAG, base)
    built = Built(image_id, base, image_config(image_id))
    size = int(built.config["Size"])
    report(
        pytestconfig, f"base image {base_s:.1f}s, build {build_s:.1f}s, size {size / 1e6:.0f} MB"
    )
    yield built
    # Built without layers, the image is no cache for the next build: only the base stays.
    podman("rmi", "--force", image_id, check=False)


def test_image_is_built_from_the_pinned_base_and_keeps_its_contract(image: Built) -> None:
    config = image.config["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--"]
    assert config["Cmd"] == ["shardworker", "run"]
    healthcheck = image.config["Healthcheck"]  # podman lists it beside Config
    assert healthcheck["Test"] == ["CMD", "shardworker", "check-health"]
    assert "/var/lib/shardworker/metrics" in config["Volumes"]
    assert int(image.config["Size"]) < IMAGE_SIZE_BUDGET, image.config["Size"]
    # PYTHON_IMAGE pinned by digest: the image's first layers are exactly the base's.
    base_layers = image_config(image.base)["RootFS"]["Layers"]
    assert image.config["RootFS"]["Layers"][: len(base_layers)] == base_layers
    # Nothing of the build stage (wheels, sources, compilers' leftovers) in the image.
    listing = podman(
        "run", "--rm", *RLIMITS, "--network", "none", "--entrypoint", "sh", image.tag, "-c",
        "ls -d /wheels /src /root/.cache/pip 2>/dev/null; /opt/shardworker/bin/pip freeze",
    ).stdout  # fmt: skip
    assert "/wheels" not in listing and "/src" not in listing
    assert "shardworker==" in listing


def test_a_base_digest_that_does_not_match_fails_the_build(image: Built) -> None:
    """The digest in PYTHON_IMAGE is honoured, not ignored: a wrong one stops the build at FROM."""
    name = image.base.split("@")[0]
    with pytest.raises(PodmanError, match="exited"):
        build_image("localhost/shardworker:wrong-digest", f"{name}@sha256:{'0' * 64}")


def test_image_holds_the_whole_package_and_redacts_secrets(image: Built) -> None:
    """Package data (SQL, Lua) made it into the wheel; print-config hides the DSN's password.
    (Replaces tests/test_wheel_install.py, which replayed the Dockerfile in a venv.)"""
    probe = (
        "import pathlib, shardworker; p = pathlib.Path(shardworker.__file__).parent; "
        "print('\\n'.join(str(f.relative_to(p)) for f in p.rglob('*') if f.is_file()))"
    )
    listed = podman("run", "--rm", *RLIMITS, "--network", "none", image.tag, "python", "-c", probe)
    installed = set(listed.stdout.split())
    source = REPO / "shardworker"
    data = {
        str(f.relative_to(source)) for f in source.rglob("*")
        if f.is_file() and f.suffix not in (".py", ".pyc") and "__pycache__" not in f.parts
    }  # fmt: skip
    assert data and data <= installed, f"missing from the image: {sorted(data - installed)}"
    printed = podman(
        "run", "--rm", *RLIMITS, "--network", "none", "--read-only",
        "-e", "SHARDWORKER_DATABASE_URL=postgresql://sw:hunter2@db:5432/alga",
        image.tag, "shardworker", "print-config",
    )  # fmt: skip
    assert json.loads(printed.stdout)["database_url"] == "***"
    assert "hunter2" not in printed.stdout + printed.stderr


# ---------------------------------------------------------------- the pod, as the chart runs it


@dataclass
class Deployment:
    name: str
    run: PodRun
    port: int
    redis: redis.Redis
    users: dict[str, str]  # provider id -> Dovecot user
    logs: Path
    migrate_output: str
    dsn: str
    image: str

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:  # not listening (yet)
            return 0, str(exc)

    def ready(self) -> bool:
        state = podman("inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()
        if state != "running":
            self.save_logs()
            raise AssertionError(f"the container is {state}; logs in {self.logs}")
        return self.get(self.run.readiness_path)[0] == 200

    def pid(self) -> int:
        return int(podman("inspect", "--format", "{{.State.Pid}}", self.name).stdout)

    def save_logs(self) -> None:
        proc = podman("logs", self.name, check=False)
        self.logs.write_text(proc.stdout + proc.stderr)


def render(port: int, dsn: str, redis_url: str) -> list[dict[str, Any]]:
    values = {
        "metrics": {"port": port},
        "secrets": {"databaseUrl": dsn, "redisUrl": redis_url, "secretKeys": TEST_KEYS},
    }
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name="sw", namespace="mail")
    manifests = [text for path, text in rendered.items() if path.endswith(".yaml")]
    return [d for text in manifests for d in yaml.safe_load_all(text) if d]


def container_dsn(database: str) -> str:
    """A URL naming its user: inside the image libpq's default user would be `shardworker`."""
    with psycopg.connect(dsn_for(PG_ADMIN_DSN, database)) as conn:
        info = conn.info
        return f"postgresql://{info.user}@{info.host}:{info.port}/{database}"


def podman_run(image: str, run: PodRun, env_file: Path, *extra: str) -> list[str]:
    return [
        "run", "--network", "host", *RLIMITS, *run.flags, "--env-file", str(env_file),
        *extra, image, *run.args,
    ]  # fmt: skip


def register_providers(dsn: str, redis_url: str, dovecot: Dovecot, n: int) -> dict[str, str]:
    settings = rig_settings(dsn, redis_url, str(dovecot.cafile))
    users = {}
    tenant = str(uuid.uuid4())
    with open_pool(dsn, max_size=2) as pool:
        secrets = SecretStore(settings, pool)
        for user, password in dovecot.add_users(n, prefix="image"):
            pid = create_provider(
                pool, tenant=tenant, mailbox=f"{user}@example.com", host="127.0.0.1",
                port=dovecot.plain_port, secure=False, allow_starttls=False,
                auth_type="password", username=user,
            )  # fmt: skip
            secrets.put(tenant, pid, secret_name("password", pid), password)
            users[pid] = user
    return users


@pytest.fixture(scope="module")
def deployment(
    image: Built, redis_server: str, dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Iterator[Deployment]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("image")
    database = create_database()
    redis_url = f"{redis_server}/0"
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    port = free_port()
    docs = render(port, container_dsn(database), redis_url)
    name = f"sw-image-{uuid.uuid4().hex[:8]}"
    try:
        job = pod_run(docs, "Job", "sw-migrate")
        migrate = podman(*podman_run(image.tag, job, job.write_env_file(tmp / "job.env"), "--rm"))
        host_dsn = dsn_for(PG_ADMIN_DSN, database)
        users = register_providers(host_dsn, redis_url, dovecot, 2)
        run = pod_run(docs, "StatefulSet", POD)
        started = time.monotonic()
        env_file = run.write_env_file(tmp / "pod.env")
        podman(*podman_run(image.tag, run, env_file, "--detach", "--name", name))
        dep = Deployment(
            name, run, port, client, users, tmp / "pod.log", migrate.stdout, host_dsn, image.tag
        )
        wait_until(dep.ready, READY_TIMEOUT_S, 0.05)
        report(pytestconfig, f"container start to ready {time.monotonic() - started:.2f}s")
        yield dep
        dep.save_logs()
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
        client.flushdb()
        client.close()
        drop_database(database)


def test_migrate_from_the_image_creates_the_schema(deployment: Deployment) -> None:
    assert "migrate:" in deployment.migrate_output
    with psycopg.connect(deployment.dsn) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables").fetchall()}
    assert {"email_providers", "imap_email_provider_config", "shardworker_ledger"} <= tables


def seeded(deployment: Deployment) -> bool:
    """Every provider's INBOX has its first cursor: mail delivered from now on is new to it
    (a provider's first sync starts from the present, not from its mailbox's history)."""
    with psycopg.connect(deployment.dsn) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM imap_email_provider_config "
            "WHERE email_provider_id = ANY(%s) AND folder_state ? 'INBOX'",
            (list(deployment.users),),
        ).fetchone()
    return rows is not None and rows[0] == len(deployment.users)


def test_delivered_mail_becomes_an_event(deployment: Deployment, dovecot: Dovecot) -> None:
    wait_until(lambda: seeded(deployment), 60.0, 0.1)
    sent = {}
    for pid, user in deployment.users.items():
        message_id = f"<image-{uuid.uuid4().hex}@example.com>"
        dovecot.append(
            user, "INBOX", make_mail(subject=f"via the image {user}", message_id=message_id)
        )
        sent[message_id] = pid

    def published() -> dict[str, str]:
        return {
            e["payload"]["emailData"]["id"]: e["payload"]["providerId"]
            for e in events(deployment.redis, STREAM)
        }

    try:
        wait_until(lambda: published() == sent, 60.0, 0.2)
    except AssertionError:
        deployment.save_logs()
        raise AssertionError(
            f"events {published()} != sent {sent}; logs in {deployment.logs}"
        ) from None


def test_health_endpoints_and_metrics_answer(deployment: Deployment) -> None:
    for path in (deployment.run.liveness_path, deployment.run.readiness_path):
        status, body = deployment.get(path)
        assert status == 200, (path, body)
        assert json.loads(body)["status"] == "ok"
    status, metrics = deployment.get("/metrics")
    assert status == 200
    owned = [
        line for line in metrics.splitlines() if line.startswith("shardworker_providers_owned")
    ]
    assert owned and float(owned[0].split()[-1]) == len(deployment.users), owned


def test_the_image_healthcheck_passes(deployment: Deployment) -> None:
    """`podman healthcheck run` runs the image's own HEALTHCHECK command in the container."""
    proc = podman("healthcheck", "run", deployment.name, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checked = podman("exec", deployment.name, "shardworker", "check-health", "--ready")
    assert json.loads(checked.stdout)["status"] == "ok"


def test_runs_as_10001_without_capabilities_and_writes_nothing(deployment: Deployment) -> None:
    pids = process_tree(deployment.pid())
    assert len(pids) >= 4, pids  # tini, the coordinator, 2 workers (and the resource tracker)
    for pid in pids:
        status = proc_status(pid)
        assert status["Uid"].split() == ["10001"] * 4, (pid, status["Uid"])
        assert status["Gid"].split() == ["10001"] * 4, (pid, status["Gid"])
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, pid
        assert status["NoNewPrivs"].strip() == "1", pid
    denied = podman("exec", deployment.name, "touch", "/opt/shardworker/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    # podman's own mount points (/etc/hosts, /etc/hostname, /etc/resolv.conf) make /etc
    # "changed" in any container: the baseline is one that ran only /bin/true, with the same
    # flags. A file the service wrote outside its volumes would be listed beyond it.
    baseline = f"{deployment.name}-baseline"
    podman(
        "run", "--name", baseline, "--network", "host", *RLIMITS, *deployment.run.flags,
        "--entrypoint", "/bin/true", deployment.image,
    )  # fmt: skip
    try:
        expected = podman("diff", baseline).stdout.split()
    finally:
        podman("rm", "--force", baseline, check=False)
    assert podman("diff", deployment.name).stdout.split() == expected


def test_sigterm_drains_and_exits_0_within_the_grace_period(
    deployment: Deployment, pytestconfig: pytest.Config
) -> None:
    assert list(deployment.redis.scan_iter(match="sw:lease:*"))
    started = time.monotonic()
    podman("kill", "--signal", "TERM", deployment.name)
    code = podman("wait", deployment.name, timeout_s=deployment.run.grace_s).stdout.strip()
    elapsed = time.monotonic() - started
    deployment.save_logs()
    report(pytestconfig, f"SIGTERM to exit {elapsed:.2f}s (grace {deployment.run.grace_s:.0f}s)")
    assert code == "0", f"exit code {code}; logs in {deployment.logs}"
    assert elapsed < deployment.run.grace_s
    lines = [json.loads(x) for x in deployment.logs.read_text().splitlines() if x.startswith("{")]
    names = [line["event"] for line in lines]
    assert "drain_started" in names and "coordinator_stopped" in names, names[-20:]
    crashed = [x for x in lines if x["event"] == "worker_exited" and x.get("code") not in (0, None)]
    assert crashed == [], crashed
    assert list(deployment.redis.scan_iter(match="sw:lease:*")) == []
