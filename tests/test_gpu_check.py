"""bench/gpu_check.py --cpu: every part that runs without a GPU passes here, each check that needs
CUDA is listed as skipped with its reason, a perturbed expected distance makes it exit 1 (the check
can fail), and the deadline skips what no longer fits and says so."""

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
    r = run(["--cpu", "--json", str(out), "--deadline", "600"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["cpu_mode"] is True and doc["skipped_for_time"] == []
    checks = doc["checks"]
    assert not [c for c in checks if c["ok"] is False]
    parts = {c["part"] for c in checks if c["ok"] is True}
    assert {"plan", "kernel", "match", "store", "decode", "graph"} <= parts
    cuda = {c["case"] for c in checks if c["detail"].startswith("skipped: needs CUDA")}
    assert {"pytest -m gpu", "pinned DB load (snapshot and files) vs the .npy files"} <= cuda
    assert any(c["case"].startswith("anchor: torch fp16 mm") for c in checks if c["case"] in cuda)
    assert sum(c["part"] == "match" and c["ok"] is True for c in checks) >= 18
    names = " ".join(c["case"] for c in checks if c["ok"] is True)
    for what in ("overflow re-run", "TooManyPairsError", "full then incremental", "re-run of non-finite"):
        assert what in names
    assert "capture failure -> eager" in names


def test_gpu_check_fails_on_a_wrong_distance() -> None:
    r = run(["--cpu", "--only", "match", "--fail-on-purpose"])
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "WRONG" in r.stdout and "distances differ in their bits" in r.stdout


def test_gpu_check_deadline_skips_and_lists(tmp_path: Path) -> None:
    out = tmp_path / "gc.json"
    r = run(["--cpu", "--only", "plan,kernel,store", "--deadline", "6", "--json", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["skipped_for_time"] and all(": " in s for s in doc["skipped_for_time"])
    assert "skipped for time: " + doc["skipped_for_time"][0] in r.stdout
    assert [c["ok"] for c in doc["checks"] if c["part"] == "plan"] == [True, True]
