"""Throwaway PostgreSQL databases on the shared server."""

from __future__ import annotations

import os
import uuid

import psycopg
from psycopg import sql

PG_ADMIN_DSN = os.environ.get("SHARDWORKER_TEST_PG_ADMIN", "postgresql://127.0.0.1:5432/postgres")


def dsn_for(admin_dsn: str, name: str) -> str:
    """`admin_dsn` with its database name replaced by `name`."""
    return f"{admin_dsn.rsplit('/', 1)[0]}/{name}"


def create_database(admin_dsn: str = PG_ADMIN_DSN, prefix: str = "sw_test_") -> str:
    """Create an empty database with a random name; returns its name."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(name: str, admin_dsn: str = PG_ADMIN_DSN) -> None:
    """Drop `name`, disconnecting whoever still uses it."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def database_exists(name: str, admin_dsn: str = PG_ADMIN_DSN) -> bool:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None
