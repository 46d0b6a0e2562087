"""bench/gpu_check.py --cpu: every part that runs without a GPU passes here, and a perturbed
expected distance makes it exit 1 (the check can fail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import clipdedup

pytest.importorskip("triton")  # the kernel runs under its interpreter
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(clipdedup.__file__).parents[1]), HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900, env=env
    )


def test_gpu_check_cpu_mode_passes(tmp_path: Path) -> None:
    out = tmp_path / "gc.json"
    r = run(["--cpu", "--json", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["cpu_mode"] is True
    checks = doc["checks"]
    assert not [c for c in checks if c["ok"] is False]
    parts = {c["part"] for c in checks if c["ok"] is True}
    assert parts == {"plan", "match", "decode", "graph"}
    assert {c["part"] for c in checks} == parts | {"pytest", "rates"}
    assert sum(c["part"] == "match" and c["ok"] is True for c in checks) >= 18


def test_gpu_check_fails_on_a_wrong_distance() -> None:
    r = run(["--cpu", "--only", "match", "--fail-on-purpose"])
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "WRONG" in r.stdout and "distances differ in their bits" in r.stdout
