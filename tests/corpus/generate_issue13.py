"""Writes tests/corpus/issue13/: the issue-13 corpus and its manifest.

    .venv/bin/python -m tests.corpus.generate_issue13

The messages are built by the case families in ``cases_fidelity`` (one or more per item
of issue 13) and ``cases_classes`` (plain, alternative, related, attachments, charsets,
encodings, malformed, Alga's mapper rules, list-rewrite recovery); see ``mailbuild`` for
what the manifest states.  tests/test_mime_corpus.py checks that the files on disk are
what this script writes, and every manifest entry against ``parse_message``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.corpus import cases_classes, cases_fidelity
from tests.corpus.mailbuild import Case

OUT = Path(__file__).resolve().parent / "issue13"
MANIFEST = OUT / "manifest.json"


def cases() -> list[Case]:
    found = [case for family in cases_fidelity.FAMILIES for case in family()]
    found += [case for family in cases_classes.FAMILIES for case in family()]
    slugs = [c.slug for c in found]
    duplicated = {s for s in slugs if slugs.count(s) > 1}
    if duplicated:
        raise ValueError(f"duplicate case slugs: {sorted(duplicated)}")
    return found


def render() -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """File name → bytes, and the manifest entries, in a stable order."""
    files: dict[str, bytes] = {}
    manifest: list[dict[str, Any]] = []
    for n, case in enumerate(cases(), 1):
        name = f"{n:03d}-{case.slug}.eml"
        files[name] = case.raw.replace(b"{slug}", case.slug.encode())
        manifest.append(case.manifest(name))
    return files, manifest


def manifest_bytes(manifest: list[dict[str, Any]]) -> bytes:
    return (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode()


def main() -> None:
    files, manifest = render()
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.eml"):
        if old.name not in files:
            old.unlink()
    for name, data in files.items():
        (OUT / name).write_bytes(data)
    MANIFEST.write_bytes(manifest_bytes(manifest))
    print(f"wrote {len(files)} messages and {MANIFEST.name}")


if __name__ == "__main__":
    main()
