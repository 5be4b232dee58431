"""Issue 12 item 13: URLs and DSNs are redacted structurally, wherever they reach an error
or a log line: userinfo in a token URL, and a DSN whose password holds ``@``."""

from __future__ import annotations

import pytest

from shardworker.config import load_settings
from shardworker.db.store import open_pool
from shardworker.errors import ConfigError, StoreError
from shardworker.redact import describe_dsn, redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:S3cretPW@login.example.com/token", "https://***@login.example.com/token"),
        ("postgresql://sw:S3cret@Tail99@db:5432/alga", "postgresql://***@db:5432/alga"),
        ("postgresql://sw:a/b@c@db/alga", "postgresql://***@db/alga"),
        ("redis://:S3cretPW@cache:6379/0", "redis://***@cache:6379/0"),
        ("https://login.example.com/token", "https://login.example.com/token"),
        ("host=db password='S3cret pw' dbname=alga", "host=db password=*** dbname=alga"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_describe_dsn_never_shows_a_password_tail() -> None:
    assert describe_dsn("postgresql://sw:S3cret@Tail99@db:5432/alga") == "db:5432/alga"
    assert describe_dsn("host=db port=6432 password=x@y dbname=alga") == "db:6432/alga"


def test_redact_text_hides_the_url_its_password_and_the_tail_after_an_at() -> None:
    dsn = "postgresql://sw:S3cret@Tail99@db/alga"
    text = f"connecting to {dsn} failed: host 'Tail99@db' unknown; password S3cret@Tail99"
    out = redact_text(text, (dsn,))
    assert "S3cret" not in out and "Tail99" not in out


def test_a_pool_that_cannot_connect_names_the_host_not_the_password_tail() -> None:
    with pytest.raises(StoreError) as info:
        open_pool("postgresql://sw:S3cret@Tail99@127.0.0.1:1/alga", 1, timeout_s=0.5)
    assert "Tail99" not in str(info.value) and "S3cret" not in str(info.value)
    assert "127.0.0.1:1/alga" in str(info.value)


@pytest.mark.parametrize("name", ["SHARDWORKER_DATABASE_URL", "SHARDWORKER_REDIS_URL"])
def test_a_url_with_an_unencoded_at_in_its_password_is_refused(name: str) -> None:
    scheme = "postgresql" if "DATABASE" in name else "redis"
    with pytest.raises(ConfigError, match=f"{name}: the password contains '@'") as info:
        load_settings({name: f"{scheme}://sw:S3cret@Tail99@db:1/0"})
    assert "Tail99" not in str(info.value) and "S3cret" not in str(info.value)
