"""Issue 12 items 3 and 12 (token at load), and the "Bad configuration" list: every case in
docs/configuration.md's table stops `shardworker run` with exit code 2 and a message
naming the setting, before anything starts, or is accepted on purpose.  Plus the bounds of
every numeric setting, one test per setting."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from shardworker.config import Settings, env_name, load_settings
from shardworker.errors import ConfigError
from shardworker.exitcodes import ExitCode

DOC = Path(__file__).parent.parent / "docs" / "configuration.md"

# (row id, environment, setting the message must name): exit code 2 for each.
REFUSED: list[tuple[str, dict[str, str], str]] = [
    ("redis-scheme", {"SHARDWORKER_REDIS_URL": "http://127.0.0.1:6379/0"}, "SHARDWORKER_REDIS_URL"),
    ("redis-port", {"SHARDWORKER_REDIS_URL": "redis://127.0.0.1:six/0"}, "SHARDWORKER_REDIS_URL"),
    ("pg-scheme", {"SHARDWORKER_DATABASE_URL": "mysql://db/alga"}, "SHARDWORKER_DATABASE_URL"),
    ("nan", {"SHARDWORKER_LEASE_TTL_S": "nan"}, "SHARDWORKER_LEASE_TTL_S"),
    ("inf", {"SHARDWORKER_NET_TIMEOUT_S": "inf"}, "SHARDWORKER_NET_TIMEOUT_S"),
    ("sync-threads-0", {"SHARDWORKER_SYNC_THREADS": "0"}, "SHARDWORKER_SYNC_THREADS"),
    ("net-timeout-0", {"SHARDWORKER_NET_TIMEOUT_S": "0"}, "SHARDWORKER_NET_TIMEOUT_S"),
    ("concurrency-0", {"SHARDWORKER_CONNECT_CONCURRENCY_PER_HOST": "0"},
     "SHARDWORKER_CONNECT_CONCURRENCY_PER_HOST"),
    ("per-account-0", {"SHARDWORKER_MAX_CONNECTIONS_PER_ACCOUNT": "0"},
     "SHARDWORKER_MAX_CONNECTIONS_PER_ACCOUNT"),
    ("dedupe-1e16", {"SHARDWORKER_DEDUPE_TTL_S": "1e16"}, "SHARDWORKER_DEDUPE_TTL_S"),
    ("dedupe-huge", {"SHARDWORKER_DEDUPE_TTL_S": "10000000000000000"}, "SHARDWORKER_DEDUPE_TTL_S"),
    ("maxlen-huge", {"SHARDWORKER_STREAM_MAXLEN": "100000000000000000000"},
     "SHARDWORKER_STREAM_MAXLEN"),
    ("admin-port", {"SHARDWORKER_ADMIN_ADDR": "127.0.0.1:99999",
                    "SHARDWORKER_ADMIN_TOKEN": "t"}, "SHARDWORKER_ADMIN_ADDR"),
    ("metrics-port", {"SHARDWORKER_METRICS_ADDR": "0.0.0.0:70000"}, "SHARDWORKER_METRICS_ADDR"),
    ("admin-no-token", {"SHARDWORKER_ADMIN_ADDR": "127.0.0.1:0"}, "SHARDWORKER_ADMIN_TOKEN"),
    ("admin-blank-token", {"SHARDWORKER_ADMIN_ADDR": "127.0.0.1:0",
                           "SHARDWORKER_ADMIN_TOKEN": " \n"}, "SHARDWORKER_ADMIN_TOKEN"),
    ("renew-vs-ttl", {"SHARDWORKER_LEASE_TTL_S": "6", "SHARDWORKER_LEASE_RENEW_S": "2.5"},
     "SHARDWORKER_LEASE_RENEW_S"),
    ("grace-vs-renew", {"SHARDWORKER_MEMBER_GRACE_S": "4"}, "SHARDWORKER_MEMBER_GRACE_S"),
    ("lag-vs-maxlen", {"SHARDWORKER_STREAM_MAXLEN": "1000",
                       "SHARDWORKER_BACKPRESSURE_MAX_LAG": "1000"},
     "SHARDWORKER_BACKPRESSURE_MAX_LAG"),
    ("idle-vs-dead", {"SHARDWORKER_IDLE_REFRESH_S": "300", "SHARDWORKER_DEAD_AFTER_S": "300"},
     "SHARDWORKER_IDLE_REFRESH_S"),
    ("backoff-order", {"SHARDWORKER_BACKOFF_BASE_S": "10", "SHARDWORKER_BACKOFF_MAX_S": "5"},
     "SHARDWORKER_BACKOFF_BASE_S"),
    ("cidr", {"SHARDWORKER_OUTBOUND_DENY_CIDRS": "169.254.0.0/16,metadata"},
     "SHARDWORKER_OUTBOUND_DENY_CIDRS"),
    ("unknown", {"SHARDWORKER_LEASE_TTL": "5"}, "SHARDWORKER_LEASE_TTL"),
]  # fmt: skip


def run(env: dict[str, str], *args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SHARDWORKER_")}
    return subprocess.run([sys.executable, "-m", "shardworker", *(args or ("run",))],
                          env={**base, **env}, capture_output=True, timeout=30,
                          check=False)  # fmt: skip


@pytest.mark.parametrize(("row", "env", "setting"), REFUSED, ids=[r[0] for r in REFUSED])
def test_bad_configuration_stops_run_with_exit_2_naming_the_setting(
    row: str, env: dict[str, str], setting: str
) -> None:
    done = run(env)
    stderr = done.stderr.decode()
    assert done.returncode == ExitCode.CONFIG, stderr
    assert setting in stderr, stderr
    assert "Traceback" not in stderr
    assert b"worker_started" not in done.stdout + done.stderr
    assert f"`{row}`" in DOC.read_text(), f"row {row} missing from docs/configuration.md"


def test_a_non_utf8_argument_is_refused_with_exit_2() -> None:
    done = run({}, "providers", "add", "--tenant", "6f1c3a4e-1111-4a2b-8c3d-123456789abc",
               "--mailbox", "a@example.com", "--host", "imap.example.com", "--port", "993",
               "--username", "u", "--name", b"n\xff")  # fmt: skip
    assert done.returncode == ExitCode.CONFIG
    assert b"argument 14 is not valid UTF-8" in done.stderr and b"Traceback" not in done.stderr
    assert "`non-utf8-argument`" in DOC.read_text()


def test_accepted_on_purpose_drain_deadline_above_the_lease_ttl() -> None:
    s = load_settings({"SHARDWORKER_DRAIN_DEADLINE_S": "60", "SHARDWORKER_LEASE_TTL_S": "8"})
    assert s.drain_deadline_s > s.lease_ttl_s
    assert "`drain-above-ttl`" in DOC.read_text()


def test_accepted_on_purpose_admin_token_with_a_trailing_newline_is_stripped() -> None:
    s = load_settings({"SHARDWORKER_ADMIN_TOKEN": "s3cret-token\n"})
    assert s.admin_token == "s3cret-token"
    assert "`admin-token-newline`" in DOC.read_text()


# -- bounds, per numeric setting ----------------------------------------------------------

NUMERIC = [f for f in dataclasses.fields(Settings) if f.type in ("int", "float")]


@pytest.mark.parametrize("f", NUMERIC, ids=[f.name for f in NUMERIC])
def test_every_numeric_setting_has_an_upper_bound_and_refuses_nan(
    f: dataclasses.Field[object],
) -> None:
    name, hi = env_name(f.name), f.metadata["hi"]
    assert hi is not None, f"{name} has no upper bound"
    over = str(int(hi) + 1) if f.type == "int" else str(float(hi) * 2 + 1)
    with pytest.raises(ConfigError, match=name):
        load_settings({name: over})
    if f.type == "float":
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match=name):
                load_settings({name: bad})
    lo = f.metadata["lo"]
    if lo is not None and lo > 0:
        below = str(int(lo) - 1) if f.type == "int" else str(float(lo) / 2)
        with pytest.raises(ConfigError, match=name):
            load_settings({name: below})
