"""Run inside a pod's namespace by tests/test_pg_link.py: PostgreSQL calls, timed.

``python -m tests.pg_link_probe DSN CONNECT_S SILENCE_S`` opens a pool with those link
bounds, checks one connection out, leaves a second one idle in the pool, and reports
``ready``; then, for each line on stdin (``query``, ``checkout`` or ``connect``), does
that once and prints one JSON line:
``{"step", "ok", "error", "took_s"}``.  The test cuts the link between the steps.
"""

from __future__ import annotations

import sys
import time

import orjson
import psycopg

from shardworker.db.link import LinkTimeouts, link_conninfo
from shardworker.db.store import open_pool


def main(dsn: str, connect_s: float, silence_s: float) -> None:
    link = LinkTimeouts(connect_s=connect_s, silence_s=silence_s)
    pool = open_pool(dsn, 2, timeout_s=connect_s, link=link)
    held = pool.getconn()
    held.execute("SELECT 1")
    with pool.connection() as idle:  # a second one, left idle in the pool
        idle.execute("SELECT 1")
    print("ready", flush=True)
    for line in sys.stdin:
        step = line.strip()
        started = time.monotonic()
        try:
            if step == "query":
                held.execute("SELECT 1")
            elif step == "checkout":
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
            elif step == "connect":
                psycopg.connect(link_conninfo(dsn, link)).close()
            result = {"step": step, "ok": True, "error": ""}
        except Exception as exc:  # reported to the test, which judges it
            result = {"step": step, "ok": False, "error": type(exc).__name__}
        result["took_s"] = round(time.monotonic() - started, 2)
        print(orjson.dumps(result).decode(), flush=True)
    pool.close(timeout=1)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
