"""Secrets: AES-GCM envelopes, the keyring, rotation, and the db/env/filesystem chain."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardworker.config import Settings
from shardworker.db.migrate import migrate
from shardworker.db.store import Pool, open_pool
from shardworker.errors import ConfigError, SecretError, SecretKeyError, SecretNotFoundError
from shardworker.secrets.crypto import Keyring, envelope_kid, generate_key_setting
from shardworker.secrets.store import SecretStore, secret_name

K1 = generate_key_setting("k1")
K2 = generate_key_setting("k2")
AAD = b"tenant|name"


def raw_key(setting: str) -> str:
    return setting.split(":", 1)[1]


# -- crypto ------------------------------------------------------------------------------


def test_round_trip_and_envelope_shape() -> None:
    ring = Keyring.from_setting(K1)
    first, second = ring.encrypt("pässword", AAD), ring.encrypt("pässword", AAD)
    assert re.fullmatch(r"sw1\.k1\.[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]+", first)
    assert first != second  # a fresh nonce every time
    assert ring.decrypt(first, AAD) == ring.decrypt(second, AAD) == "pässword"
    assert envelope_kid(first) == "k1"


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200))
def test_any_text_round_trips(plaintext: str) -> None:
    ring = Keyring.from_setting(K1)
    assert ring.decrypt(ring.encrypt(plaintext, AAD), AAD) == plaintext


def test_wrong_key_or_aad_names_the_kid_and_nothing_else() -> None:
    envelope = Keyring.from_setting(K1).encrypt("hunter2", AAD)
    other = Keyring.from_setting(f"k1:{raw_key(K2)}")
    for ring, aad in ((other, AAD), (Keyring.from_setting(K1), b"tenant|other")):
        with pytest.raises(SecretKeyError, match="cannot decrypt with key k1") as info:
            ring.decrypt(envelope, aad)
        message = str(info.value)
        assert "hunter2" not in message and raw_key(K1) not in message
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unknown_kid_is_named() -> None:
    envelope = Keyring.from_setting(K2).encrypt("x", AAD)
    with pytest.raises(SecretKeyError, match="'k2'"):
        Keyring.from_setting(K1).decrypt(envelope, AAD)


def test_malformed_envelopes_are_refused() -> None:
    ring = Keyring.from_setting(K1)
    good = ring.encrypt("x", AAD)
    for bad in ("plain", good.replace("sw1.", "sw2."), good[:-30], "sw1.k1.***.***"):
        with pytest.raises(SecretError):
            ring.decrypt(bad, AAD)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("k1:not-base64!!", "'k1'"),
        ("k1:" + base64.b64encode(b"short").decode(), "'k1'"),
        (K1 + "," + K1, "'k1' appears twice"),
        (raw_key(K1), "entry 1"),
        (K1 + ",bad kid:" + raw_key(K2), "entry 2"),
    ],
)
def test_bad_settings_name_the_variable_and_kid_never_the_key(setting: str, named: str) -> None:
    with pytest.raises(ConfigError, match="SHARDWORKER_SECRET_KEYS") as info:
        Keyring.from_setting(setting)
    message = str(info.value)
    assert named in message
    assert raw_key(K1) not in message and raw_key(K2) not in message


def test_keyring_order_repr_and_empty() -> None:
    ring = Keyring.from_setting(f" {K2} , {K1} ")
    assert ring.kids == ("k2", "k1") and ring.newest_kid == "k2"
    assert raw_key(K1) not in repr(ring) and "k1" in repr(ring)
    empty = Keyring.from_setting("")
    assert empty.kids == ()
    with pytest.raises(SecretKeyError, match="SHARDWORKER_SECRET_KEYS"):
        empty.encrypt("x", AAD)
    with pytest.raises(ConfigError):
        generate_key_setting("no.dots")


# -- the store ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secrets_dsn(pg_dsn: str) -> Iterator[str]:
    """A private database: rotation spans every tenant, so no other test's rows may mix in."""
    base = pg_dsn.rsplit("/", 1)[0]
    name = f"sw_test_sec_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    migrate(f"{base}/{name}")
    yield f"{base}/{name}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@pytest.fixture
def pool(secrets_dsn: str) -> Iterator[Pool]:
    with open_pool(secrets_dsn, max_size=2) as p:
        with p.connection() as conn:
            conn.execute("DELETE FROM shardworker_secrets")
        yield p


def make(
    pool: Pool | None,
    keys: str = K1,
    chain: tuple[str, ...] = ("db", "env", "filesystem"),
    base: Path | None = None,
    environ: dict[str, str] | None = None,
) -> SecretStore:
    s = Settings(
        secret_keys=keys,
        secret_read_chain=chain,
        secret_fs_base_path=str(base or "/nonexistent-secrets"),
    )
    return SecretStore(s, pool, environ=environ or {})


def ids() -> tuple[str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4())


def test_secret_names_follow_alga() -> None:
    assert secret_name("password", "p1") == "imap_password_p1"
    assert secret_name("oauth_client_secret", "p1") == "imap_oauth_client_secret_p1"
    assert secret_name("refresh_token", "p1") == "imap_refresh_token_p1"
    assert secret_name("access_token", "p1") == "imap_access_token_p1"
    with pytest.raises(SecretError, match="unknown secret kind"):
        secret_name("pin", "p1")


def test_db_round_trip_is_encrypted_and_bound_to_tenant_and_name(pool: Pool) -> None:
    tenant, pid = ids()
    store = make(pool)
    name = secret_name("password", pid)
    store.put(tenant, pid, name, "hunter2")
    assert store.get(tenant, pid, name) == "hunter2"
    with pool.connection() as conn:
        row = conn.execute("SELECT key_id, envelope FROM shardworker_secrets").fetchone()
        assert row is not None and row[0] == "k1" and "hunter2" not in row[1]
        other = secret_name("refresh_token", pid)
        conn.execute(
            "INSERT INTO shardworker_secrets (tenant, provider_id, name, key_id, envelope) "
            "VALUES (%s, %s, %s, 'k1', %s)",
            (tenant, pid, other, row[1]),
        )
    with pytest.raises(SecretKeyError, match="cannot decrypt with key k1"):
        store.get(tenant, pid, other)
    store.put(tenant, pid, name, "changed")
    assert store.get(tenant.upper(), pid, name) == "changed"


def test_rotation(pool: Pool) -> None:
    (t1, p1), (t2, p2) = ids(), ids()
    old = make(pool, keys=K1)
    old.put(t1, p1, secret_name("password", p1), "one")
    old.put(t2, p2, secret_name("refresh_token", p2), "two")
    both = make(pool, keys=f"{K2},{K1}")
    # The old key still decrypts until rotation.
    assert both.get(t1, p1, secret_name("password", p1)) == "one"
    assert both.rotate_keys() == 2
    assert both.rotate_keys() == 0
    with pool.connection() as conn:
        rows = conn.execute("SELECT key_id, envelope FROM shardworker_secrets").fetchall()
    assert {r[0] for r in rows} == {"k2"} and all(r[1].startswith("sw1.k2.") for r in rows)
    only_new = make(pool, keys=K2)
    assert only_new.get(t2, p2, secret_name("refresh_token", p2)) == "two"
    with pytest.raises(SecretKeyError, match="'k2'"):
        make(pool, keys=K1).get(t1, p1, secret_name("password", p1))


def test_env_and_filesystem_sources(pool: Pool, tmp_dir: Path) -> None:
    tenant, pid = ids()
    name = secret_name("password", pid)
    env = {f"TENANT_{tenant}_{name}": "from-env"}
    folder = tmp_dir / "tenants" / tenant
    folder.mkdir(parents=True)
    (folder / name).write_text("  from-file\n")
    assert make(pool, base=tmp_dir, environ=env).get(tenant, pid, name) == "from-env"
    assert make(pool, base=tmp_dir).get(tenant, pid, name) == "from-file"
    assert (
        make(None, chain=("filesystem", "env"), base=tmp_dir, environ=env).get(tenant, pid, name)
        == "from-file"
    )
    db_first = make(pool, base=tmp_dir, environ=env)
    db_first.put(tenant, pid, name, "from-db")
    assert db_first.get(tenant, pid, name) == "from-db"
    assert db_first.delete_provider_secrets(tenant, pid) == 1
    assert db_first.get(tenant, pid, name) == "from-env"


def test_not_found_names_the_secret_and_sources(pool: Pool, tmp_dir: Path) -> None:
    tenant, pid = ids()
    name = secret_name("refresh_token", pid)
    (tmp_dir / "tenants" / tenant).mkdir(parents=True)
    (tmp_dir / "tenants" / tenant / name).write_text(" \n")  # empty counts as absent
    with pytest.raises(SecretNotFoundError, match=f"{name}.*tried db, env, filesystem"):
        make(pool, base=tmp_dir, environ={f"TENANT_{tenant}_{name}": ""}).get(tenant, pid, name)
    with pytest.raises(SecretError, match="invalid"):
        make(None, chain=("filesystem",), base=tmp_dir).get(tenant, pid, "../../etc/passwd")


def test_prefetch_serves_each_secret_once_then_the_chain_reads_again(pool: Pool) -> None:
    """A cold start reads thousands of passwords in a few queries (issue 14); a prefetched
    value answers one get() only, so a later read (after an auth failure) is fresh."""
    store = make(pool)
    pairs = [ids() for _ in range(5)]
    for i, (tenant, pid) in enumerate(pairs):
        store.put(tenant, pid, secret_name("password", pid), f"pw{i}")
    wanted = [(t, secret_name("password", p)) for t, p in pairs]
    missing = (str(uuid.uuid4()), "imap_password_none")
    assert store.prefetch([*wanted, missing]) == 5
    with pool.connection() as conn:
        conn.execute("DELETE FROM shardworker_secrets")  # only the prefetch can answer now
    tenant, pid = pairs[0]
    assert store.get(tenant.upper(), pid, secret_name("password", pid)) == "pw0"
    with pytest.raises(SecretNotFoundError):
        store.get(tenant, pid, secret_name("password", pid))  # used up: read afresh
    assert [store.get(t, p, secret_name("password", p)) for t, p in pairs[1:]] == [
        "pw1", "pw2", "pw3", "pw4"
    ]  # fmt: skip


def test_prefetch_keeps_the_chain_order_and_forgets_on_write(pool: Pool) -> None:
    tenant, pid = ids()
    name = secret_name("password", pid)
    env_first = make(pool, chain=("env", "db"), environ={f"TENANT_{tenant}_{name}": "from-env"})
    env_first.put(tenant, pid, name, "from-db")
    assert env_first.prefetch([(tenant, name)]) == 0  # the table is not the first source
    assert env_first.get(tenant, pid, name) == "from-env"
    store = make(pool)
    assert store.prefetch([(tenant, name)]) == 1
    store.put(tenant, pid, name, "rotated")
    assert store.get(tenant, pid, name) == "rotated"
