"""compose.yaml and its demo Dovecot, checked without a Docker engine.

The compose file is parsed (services, dependencies, replicas, grace period, settings the
service accepts). The demo Dovecot configuration is not only parsed by `doveconf` but run:
the same file, with its container paths and port mapped to a scratch directory, must let
the demo users log in and offer IDLE.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imapclient
import pytest
import yaml

from shardworker.config import Settings, load_settings
from tests.harness.net import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
DOVECOT_DIR = REPO / "docker" / "dovecot"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match[1]) * (60 if match[2] == "m" else 1)


def demo_users() -> list[tuple[str, str]]:
    users = []
    for line in (DOVECOT_DIR / "users").read_text().splitlines():
        name, password, *rest = line.split(":")
        assert len(rest) == 6, f"{name}: a passwd-file line needs its trailing colons"
        users.append((name, password.removeprefix("{PLAIN}")))
    return users


def test_services_and_start_order() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "redis", "dovecot", "migrate", "shardworker"}
    for name in ("postgres", "redis", "dovecot"):
        assert "healthcheck" in services[name], name
    migrate, worker = services["migrate"], services["shardworker"]
    assert migrate["command"] == ["shardworker", "migrate"] and migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert worker["command"] == ["shardworker", "run"]
    assert worker["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "dovecot": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert worker["deploy"]["replicas"] == 2
    assert "container_name" not in worker  # a fixed name would forbid replicas
    for port in worker["ports"]:
        assert re.fullmatch(r"127\.0\.0\.1::\d+", port), f"{port}: replicas need no host port"
    assert (REPO / worker["build"]["context"] / "Dockerfile").is_file()
    assert (REPO / services["dovecot"]["build"]["context"] / "Dockerfile").is_file()


def test_shardworker_environment_is_accepted_by_the_service() -> None:
    worker = compose()["services"]["shardworker"]
    settings = load_settings({k: str(v) for k, v in worker["environment"].items()})
    assert settings.worker_count == 2 and settings.secret_keys.startswith("demo:")
    assert seconds(worker["stop_grace_period"]) > settings.drain_deadline_s
    assert worker["read_only"] is True
    assert Settings().metrics_dir == "" and "/var/lib/shardworker/metrics" in worker["tmpfs"]
    assert "postgres:5432" in settings.database_url and "redis:6379" in settings.redis_url


def test_demo_dovecot_config_parses() -> None:
    done = subprocess.run(
        ["doveconf", "-n", "-c", str(DOVECOT_DIR / "dovecot.conf")],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "disable_plaintext_auth = no" in done.stdout


@pytest.fixture
def demo_dovecot() -> Iterator[int]:
    """docker/dovecot/dovecot.conf itself, its container paths moved to a scratch directory."""
    # Not pytest's tmp_path: its parents are 0700, and Dovecot's auth process (user
    # dovecot) must reach the users file.
    tmp_path = Path(tempfile.mkdtemp(prefix="sw-demo-dovecot-"))
    tmp_path.chmod(0o755)
    port = free_port()
    mail_uid = pwd.getpwnam("vmail") if os.geteuid() == 0 else pwd.getpwuid(os.getuid())
    (tmp_path / "mail").mkdir()
    os.chown(tmp_path / "mail", mail_uid.pw_uid, mail_uid.pw_gid)
    shutil.copy(DOVECOT_DIR / "users", tmp_path / "users")
    conf = (DOVECOT_DIR / "dovecot.conf").read_text()
    for container, local in (
        ("/etc/dovecot/users", str(tmp_path / "users")),
        ("/srv/mail/", f"{tmp_path}/mail/"),
        ("uid=vmail gid=vmail", f"uid={mail_uid.pw_uid} gid={mail_uid.pw_gid}"),
        ("listen = *", "listen = 127.0.0.1"),
        ("port = 143", f"port = {port}"),
        ("log_path = /dev/stderr", f"log_path = {tmp_path}/dovecot.log"),
    ):
        assert container in conf, container
        conf = conf.replace(container, local)
    conf += f"base_dir = {tmp_path}/run\nstate_dir = {tmp_path}/state\n"
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.getuid()).pw_name
        conf += f"default_login_user = {me}\ndefault_internal_user = {me}\n"
    (tmp_path / "dovecot.conf").write_text(conf)
    config = str(tmp_path / "dovecot.conf")
    subprocess.run(["dovecot", "-c", config], check=True, timeout=30)
    try:
        wait_for_port(port)
        yield port
    finally:
        subprocess.run(["doveadm", "-c", config, "stop"], check=False, timeout=30)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_demo_users_log_in_and_idle(demo_dovecot: int) -> None:
    users = demo_users()
    assert len(users) >= 2
    for name, password in users:
        client = imapclient.IMAPClient("127.0.0.1", port=demo_dovecot, ssl=False, timeout=10)
        try:
            client.login(name, password)
            assert b"IDLE" in client.capabilities()
            assert client.select_folder("INBOX")[b"EXISTS"] == 0
            assert {"Sent", "Trash"} <= {f[2] for f in client.list_folders()}
        finally:
            client.logout()
