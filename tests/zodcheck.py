"""Run payloads through tests/zod/validate.mjs (mirrors of Alga's zod schemas) in one node call."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import orjson

ZOD_DIR = Path(__file__).resolve().parent / "zod"
_install_lock = threading.Lock()


def _ensure_installed() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed: the zod schema checks need it")
    with _install_lock:
        if not (ZOD_DIR / "node_modules" / "zod" / "package.json").exists():
            npm = shutil.which("npm")
            if npm is None:
                raise RuntimeError("npm is not installed: cannot install tests/zod's zod")
            subprocess.run(
                [npm, "ci", "--prefix", str(ZOD_DIR), "--no-audit", "--no-fund"],
                check=True,
                capture_output=True,
                timeout=300,
            )
    return node


def validate_payloads(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per payload: ``{line, union, shapeA, shapeB, errors?}``."""
    if not payloads:
        return []
    node = _ensure_installed()
    stdin = b"".join(orjson.dumps(p) + b"\n" for p in payloads)
    done = subprocess.run(
        [node, str(ZOD_DIR / "validate.mjs")],
        input=stdin,
        capture_output=True,
        check=False,
        timeout=120,
        cwd=ZOD_DIR,
    )
    if done.returncode != 0:
        raise RuntimeError(f"validate.mjs failed: {done.stderr.decode(errors='replace')[:2000]}")
    results = [orjson.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if len(results) != len(payloads):
        raise RuntimeError(f"validate.mjs answered {len(results)} lines for {len(payloads)}")
    return results
