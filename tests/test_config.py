from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shardworker.config import Settings, env_name, load_settings, settings_table
from shardworker.errors import ConfigError


def test_defaults_load_with_no_environment() -> None:
    s = load_settings({})
    assert s.lease_ttl_s == 8.0
    assert s.stream_maxlen > 1000


def test_unknown_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="SHARDWORKER_LEASE_TTL"):
        load_settings({"SHARDWORKER_LEASE_TTL": "5"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SHARDWORKER_LEASE_TTL_S", "soon"),
        ("SHARDWORKER_WORKERS", "2.5"),
        ("SHARDWORKER_PUBLISH_EVENT_BUS", "maybe"),
        ("SHARDWORKER_WORKERS", "-1"),
    ],
)
def test_invalid_value_is_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


def test_invalid_secret_value_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"SHARDWORKER_SECRET_READ_CHAIN": "db,vault-token-abc"})
    assert "SECRET_READ_CHAIN" in str(info.value)


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="BACKPRESSURE_MAX_LAG"):
        load_settings(
            {"SHARDWORKER_STREAM_MAXLEN": "1000", "SHARDWORKER_BACKPRESSURE_MAX_LAG": "5000"}
        )
    with pytest.raises(ConfigError, match="LEASE_RENEW_S"):
        load_settings({"SHARDWORKER_LEASE_TTL_S": "4", "SHARDWORKER_LEASE_RENEW_S": "3"})
    with pytest.raises(ConfigError, match="IDLE_REFRESH_S"):
        load_settings({"SHARDWORKER_IDLE_REFRESH_S": "1800"})


def test_values_parse_to_their_types() -> None:
    s = load_settings(
        {
            "SHARDWORKER_WORKERS": "3",
            "SHARDWORKER_LEASE_TTL_S": "12.5",
            "SHARDWORKER_PUBLISH_EVENT_BUS": "yes",
            "SHARDWORKER_SECRET_READ_CHAIN": "env, db",
        }
    )
    assert (s.workers, s.lease_ttl_s, s.publish_event_bus) == (3, 12.5, True)
    assert s.secret_read_chain == ("env", "db")


def test_settings_are_frozen() -> None:
    s = load_settings({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.workers = 4  # type: ignore[misc]


def test_redacted_hides_every_secret_field() -> None:
    secrets = {f.name for f in dataclasses.fields(Settings) if f.metadata["secret"]}
    env = {env_name(n): "postgresql://u:hunter2-secret@h/db" for n in secrets if "url" in n}
    env[env_name("redis_url")] = "redis://u:hunter2-secret@h/0"
    env[env_name("admin_token")] = "tok-hunter2-secret"
    shown = load_settings(env).redacted()
    assert "hunter2" not in repr(shown)
    assert all(shown[n] in ("***", "") for n in secrets)


def test_readme_settings_table_matches_settings() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert settings_table() in readme, (
        "regenerate with: .venv/bin/python scripts/readme_settings.py"
    )


def test_a_setting_of_an_unknown_type_is_an_error_not_a_string() -> None:
    import dataclasses

    from shardworker import config

    @dataclasses.dataclass(frozen=True)
    class Odd:
        ratio: complex = config._setting(1j, "not a type settings know")

    [field] = dataclasses.fields(Odd)
    with pytest.raises(ConfigError, match="SHARDWORKER_RATIO: setting type complex has no parser"):
        config._parse_value(field, "2j")
    assert {f.type for f in dataclasses.fields(Settings)} <= set(config._PARSERS)
