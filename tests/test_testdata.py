"""The stored test images lay out to exactly the tree the ground truth describes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import TESTDATA

SHARED = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "imagededup"


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and p.name != "README.md"
    }


def test_every_listed_image_is_laid_out() -> None:
    gt = json.loads((TESTDATA / "ground_truth.json").read_text())
    have = _hashes(TESTDATA)
    assert sorted(gt["images"]) == sorted(k for k in have if k != "ground_truth.json")
    assert all(m in have for group in gt["duplicate_groups"] for m in group)


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/testdata beside this checkout to compare with")
def test_laid_out_tree_equals_the_shared_one() -> None:
    assert _hashes(TESTDATA) == _hashes(SHARED)
