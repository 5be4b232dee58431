"""Rewrite the settings table in README.md from the Settings object (tests check it)."""

from __future__ import annotations

import re
from pathlib import Path

from shardworker.config import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"
TABLE = re.compile(r"\| variable \| default \| meaning \|\n(?:\|.*\|\n)+")


def main() -> int:
    text = README.read_text()
    new, count = TABLE.subn(lambda _: settings_table(), text)
    if count != 1:
        raise SystemExit("README.md: expected exactly one settings table")
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
