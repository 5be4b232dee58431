"""Compare the issue-13 manifest's ``mailparser`` blocks with what mailparser really sees.

    node bench/reference/corpus_dump.mjs tests/corpus/issue13 > mailparser.json
    .venv/bin/python bench/corpus_compare.py mailparser.json

The manifest states, per message, the Message-ID headers and attachments Alga's mapper
gets from mailparser; tests/test_mime_mapper.py applies the mapper's rules to them.  This
prints every message where mailparser (bench/reference pins its version) disagrees, so the
manifest's claims can be re-checked when Alga moves to another mailparser.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

MANIFEST = Path(__file__).resolve().parent.parent / "tests" / "corpus" / "issue13" / "manifest.json"
KEYS = ("contentType", "size", "md5", "filename", "contentId", "disposition")


def _attachments(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: a[k] for k in KEYS if a.get(k) is not None} for a in items]


def differences(dump: list[dict[str, Any]]) -> list[str]:
    seen = {row["file"]: row for row in dump}
    out: list[str] = []
    for entry in json.loads(MANIFEST.read_text()):
        row = seen.get(entry["file"])
        if row is None:
            out.append(f"{entry['file']}: not in the dump")
            continue
        ids = entry["mailparser"]["messageIds"]
        if (ids[-1] if ids else None) != row["messageId"]:
            out.append(f"{entry['file']}: messageId {ids} vs {row['messageId']}")
        ours = _attachments(entry["mailparser"]["attachments"])
        theirs = _attachments(row["attachments"])
        if ours != theirs:
            out.append(f"{entry['file']}: attachments\n  manifest   {ours}\n  mailparser {theirs}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dump", type=Path, help="output of bench/reference/corpus_dump.mjs")
    args = parser.parse_args()
    found = differences(json.loads(args.dump.read_text()))
    print("\n".join(found) if found else "no differences")
    print(f"{len(found)} message(s) differ")


if __name__ == "__main__":
    main()
