"""The real test images (tests/data/imagededup): the stored unique files plus the byte-identical
copies that `copies.json` lists, laid out as one tree. Used by the test suite's `testdata` fixture
and by the benchmarks; not a test module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

STORED = Path(__file__).resolve().parent / "data" / "imagededup"


def materialize(dest: Path) -> Path:
    """Lays the full test-image tree out under `dest` (created; must not exist) and returns it."""
    shutil.copytree(STORED, dest, ignore=shutil.ignore_patterns("copies.json"))
    copies = json.loads((STORED / "copies.json").read_text())
    for rel, same_as in copies.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dest / same_as, dest / rel)
    return dest
