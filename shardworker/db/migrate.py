"""``shardworker migrate``: bring a database to the latest schema, safely and idempotently.

Everything happens in one transaction behind ``pg_advisory_xact_lock``, so two pods that
migrate at once serialize: the second finds the work done and changes nothing.  A
mismatch in Alga's tables rolls the whole transaction back, so nothing half-done remains.
"""

from __future__ import annotations

import psycopg

from shardworker.db.schema import (
    ALGA_TABLES,
    LATEST_VERSION,
    REQUIRED_COLUMNS,
    Step,
    describe_missing,
    missing_columns,
    plan,
)
from shardworker.errors import MigrationError, SchemaMismatchError
from shardworker.logs import get_logger

log = get_logger(__name__)

# Arbitrary but fixed: the advisory lock every shardworker migration takes ("shardwkr").
MIGRATION_LOCK_KEY = 0x7368617264776B72


def migrate(dsn: str) -> list[str]:
    """Apply what is missing; return a description of each change (empty when up to date)."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            return _migrate_locked(conn)
    except psycopg.Error as exc:
        raise MigrationError(f"migration failed: {type(exc).__name__}: {exc}") from exc


def _migrate_locked(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    citus = has_citus(conn)
    missing_alga = [t for t in ALGA_TABLES if not _table_exists(conn, t)]
    present_alga = [t for t in ALGA_TABLES if t not in missing_alga]
    if present_alga:
        missing = missing_columns({t: _columns(conn, t) for t in present_alga})
        # A table we are about to create has every column; only pre-existing ones can lack.
        missing = [m for m in missing if m.split(".", 1)[0] in present_alga]
        if missing:
            raise SchemaMismatchError(describe_missing(missing))
    steps = plan(missing_alga, applied_versions(conn), citus)
    for step in steps:
        _apply(conn, step)
    return [step.description for step in steps if step.reported]


def _apply(conn: psycopg.Connection[tuple[object, ...]], step: Step) -> None:
    # Bytes: the DDL is trusted module text holding several statements, no parameters.
    conn.execute(step.sql.encode())
    if step.version is not None:
        conn.execute(
            "INSERT INTO shardworker_schema_version (version, description) VALUES (%s, %s)",
            (step.version, step.description),
        )
    log.info("migration_applied", change=step.description)


def has_citus(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")
    result = row.fetchone()
    return bool(result and result[0])


def _table_exists(conn: psycopg.Connection[tuple[object, ...]], table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    return bool(row and row[0])


def _columns(conn: psycopg.Connection[tuple[object, ...]], table: str) -> set[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
        "AND attnum > 0 AND NOT attisdropped",
        (table,),
    ).fetchall()
    return {str(r[0]) for r in rows}


def applied_versions(conn: psycopg.Connection[tuple[object, ...]]) -> set[int]:
    if not _table_exists(conn, "shardworker_schema_version"):
        return set()
    rows = conn.execute("SELECT version FROM shardworker_schema_version").fetchall()
    return {int(str(r[0])) for r in rows}


def verify_schema(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Start-up check: the latest version is applied and Alga's tables have our columns."""
    absent = [t for t in REQUIRED_COLUMNS if not _table_exists(conn, t)]
    if absent:
        raise MigrationError(f"table(s) {', '.join(absent)} missing: run `shardworker migrate`")
    missing = missing_columns({t: _columns(conn, t) for t in REQUIRED_COLUMNS})
    if missing:
        raise SchemaMismatchError(describe_missing(missing))
    applied = applied_versions(conn)
    if LATEST_VERSION not in applied:
        have = max(applied, default=0)
        raise MigrationError(
            f"schema version {have} is older than {LATEST_VERSION}: run `shardworker migrate`"
        )
