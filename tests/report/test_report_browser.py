"""The HTML contact sheet in a real headless browser (Debian's chromium): loads with no console
errors, no broken thumbnail, every group present; a screenshot goes to the test artifacts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from clipdedup.cli import dedup_cmd, run_cli

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # the checkout's (git-ignored)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=5000",  # let load handlers run before the DOM is dumped
]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CLIPDEDUP_REQUIRE_BROWSER"):
            pytest.fail("chromium not found, and CLIPDEDUP_REQUIRE_BROWSER is set (as in .ci/run)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return exe


def _browse(exe: str, page: Path, profile: Path, *extra: str) -> tuple[str, list[str]]:
    """(dumped DOM or screenshot run's stdout, console lines) for `page`, in a fresh profile."""
    cmd = [exe, *FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, errors="replace")
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, [line for line in r.stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture
def report_dir(pics: Path, tmp_path: Path, tiny_model: str) -> Path:
    shutil.copy(pics / "base_images/ukbench01380.jpg", pics / '<img src=x onerror=alert(1)> & "q".jpg')
    rep = tmp_path / "report"
    args = ["-i", str(pics), "-d", str(tmp_path / "db"), "-t", str(tmp_path / "trash"), "-m", tiny_model]
    code = run_cli(dedup_cmd, "test", args + ["-th", "0.05", "-n", "-q", "--report", str(rep)])
    assert code == 0
    return rep


def test_contact_sheet_in_chromium(report_dir: Path, tmp_path: Path) -> None:
    exe = _chromium()
    groups = json.loads((report_dir / "report.json").read_text())["groups"]
    assert len(groups) >= 3  # the exact copies of the test images at least
    dom, console = _browse(exe, report_dir / "index.html", tmp_path / "profile1", "--dump-dom")
    assert console == [], console
    assert re.search(r'<body[^>]*data-broken="0"', dom), dom[:500]
    for g in groups:
        assert f'id="g{g["id"]}"' in dom
    assert dom.count("<figure") == sum(len(g["members"]) for g in groups)
    assert "<img src=x" not in dom  # the hostile file name stayed text

    shot = tmp_path / "contact-sheet.png"
    _, console = _browse(
        exe,
        report_dir / "index.html",
        tmp_path / "profile2",
        f"--screenshot={shot}",
        "--window-size=1300,1800",
        "--hide-scrollbars",
    )
    assert console == [], console
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)


def test_broken_thumbnail_is_detected(report_dir: Path, tmp_path: Path) -> None:
    """The checks above can fail: remove one thumbnail and the page says so."""
    exe = _chromium()
    victim = next((report_dir / "thumbs").rglob("*.jpg"))
    victim.unlink()
    dom, console = _browse(exe, report_dir / "index.html", tmp_path / "profile", "--dump-dom")
    assert re.search(r'<body[^>]*data-broken="1"', dom)
    assert len(console) == 1 and victim.name in console[0]
