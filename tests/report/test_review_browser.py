"""The review workflow in a real headless browser (Debian's chromium, through chromedriver): a dry
run writes the report, the page changes a kept file, skips a group and marks a file "do not move"
(clicks and keys), exports decisions.json through its button; `apply` then moves exactly the files
the page showed as moving, and `undo` puts them back byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdedup.cli import dedup_cmd, run_cli
from clipdedup.trash.undo import undo
from helpers import tree_hashes

# Byte-identical copies: group 1 = a1..a3, group 2 = b1, b2, group 3 = c1, c2, group 4 = d1 and a
# name that is not UTF-8 (kept: the first of each, "largest" ties fall to byte order); e is alone.
COPIES = {"a": 3, "b": 2, "c": 2, "d": 1, "e": 1}
ODD = os.fsdecode(b"d\xe9j\xe0.png")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run")
FLAGS += ("--window-size=1300,1600",)


def _driver(profile: Path, downloads: Path):  # -> selenium WebDriver
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    drv = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        exe = None
    if exe is None or drv is None:
        if os.environ.get("CLIPDEDUP_REQUIRE_BROWSER"):
            pytest.fail("chromium, chromedriver or selenium missing, and CLIPDEDUP_REQUIRE_BROWSER is set")
        pytest.skip("needs chromium, chromium-driver and selenium (pip install '.[test]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=drv), options=opts)
    # Downloads (the export button) go to `downloads`, with no prompt, also in headless mode.
    where = {"behavior": "allow", "downloadPath": str(downloads)}
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", where)
    return driver


def _tree(root: Path) -> None:
    rng = np.random.default_rng(5)
    root.mkdir()
    for name, n in COPIES.items():
        img = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
        img.save(root / f"{name}1.png")
        for k in range(2, n + 1):
            shutil.copy2(root / f"{name}1.png", root / f"{name}{k}.png")
    shutil.copy2(root / "d1.png", os.path.join(root, ODD))


def _states(driver) -> dict[str, str]:
    """Each shown file's state on the page. Read through JSON.stringify, which escapes a name that is
    not UTF-8 (a lone surrogate in JavaScript) where chromedriver cannot pass it on."""
    js = (
        'return JSON.stringify(Array.from(document.querySelectorAll("figure[data-path]"), '
        "function (f) { return [f.dataset.path, f.dataset.state]; }))"
    )
    return dict(json.loads(driver.execute_script(js)))


def _sections(driver) -> list[str]:
    return [s.get_attribute("data-group") for s in driver.find_elements("tag name", "section")]


def _wait(pred, what: str, timeout: float = 20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_review_in_browser_then_apply_and_undo(tmp_path: Path, tiny_model: str, capsys) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    pics, rep, trash, dl = tmp_path / "pics", tmp_path / "rep", tmp_path / "trash", tmp_path / "dl"
    _tree(pics)
    dl.mkdir()
    before = tree_hashes(pics)
    args = ["-i", str(pics), "-d", str(tmp_path / "db"), "-t", str(trash), "-m", tiny_model, "-th", "1e-4"]
    assert run_cli(dedup_cmd, "test", args + ["-n", "-q", "--report", str(rep)]) == 0
    groups = json.loads((rep / "report.json").read_text())["groups"]
    assert [[m["path"] for m in g["members"]] for g in groups] == [
        ["a1.png", "a2.png", "a3.png"],
        ["b1.png", "b2.png"],
        ["c1.png", "c2.png"],
        ["d1.png", ODD],
    ]

    driver = _driver(tmp_path / "profile", dl)
    try:
        driver.get((rep / "index.html").as_uri())
        _wait(lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "the page")
        assert _states(driver) == {
            "a1.png": "kept", "a2.png": "move", "a3.png": "move",
            "b1.png": "kept", "b2.png": "move", "c1.png": "kept", "c2.png": "move",
            "d1.png": "kept", ODD: "move",
        }  # fmt: skip
        driver.find_element(By.CSS_SELECTOR, '#g1 figure[data-path="a3.png"] img').click()  # keep a3
        driver.find_element(By.CSS_SELECTOR, "#g2 button.skip").click()
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys("j", "j", "l", "m")  # group 3, its second file: do not move
        body.send_keys("j", "2")  # group 4: keep its second file (the name that is not UTF-8)
        shown = _states(driver)
        assert shown == {
            "a1.png": "move", "a2.png": "move", "a3.png": "kept",
            "b1.png": "kept", "b2.png": "skip", "c1.png": "kept", "c2.png": "stay",
            "d1.png": "move", ODD: "kept",
        }  # fmt: skip
        driver.find_element(By.ID, "export").click()
        exported = _wait(lambda: list(dl.glob("decisions*.json")), "decisions.json in the download dir")
        assert [p.name for p in exported] == ["decisions.json"]

        driver.refresh()  # the decisions persist in localStorage
        _wait(lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "the reload")
        assert _states(driver) == shown
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys("u")  # the focused group (1) back to the tool's plan
        assert _states(driver)["a1.png"] == "kept"
        Select(driver.find_element(By.ID, "f-decided")).select_by_value("decided")
        assert _sections(driver) == ["2", "3", "4"]
        Select(driver.find_element(By.ID, "f-decided")).select_by_value("undecided")
        assert _sections(driver) == ["1"]
        Select(driver.find_element(By.ID, "f-decided")).select_by_value("all")
        driver.find_element(By.ID, "f-min").send_keys("0.5", Keys.ENTER)  # exact copies: distance 0
        assert _sections(driver) == []
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-broken") == "0"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()

    dec = json.loads((dl / "decisions.json").read_text())
    assert dec["groups"] == {
        "1": {"kept": "a3.png"}, "2": {"skip": True}, "3": {"stay": ["c2.png"]}, "4": {"kept": ODD},
    }  # fmt: skip
    _import_in_fresh_profile(tmp_path, rep, dl / "decisions.json", shown)
    capsys.readouterr()
    # -q: the per-file lines would name the non-UTF-8 file, which pytest's captured stdout cannot
    # encode (the console script prints its bytes, see cli._entry).
    apply = ["apply", str(rep), "-t", str(trash), "--decisions", str(dl / "decisions.json"), "-q"]
    code = run_cli(dedup_cmd, "test", apply)
    out, err = capsys.readouterr()
    assert code == 0, err
    moving = {p for p, s in shown.items() if s == "move"}
    assert set(tree_hashes(trash)) == moving == {"a1.png", "a2.png", "d1.png"}
    assert tree_hashes(trash) == {p: before[p] for p in moving}
    assert "moved 3 (1 from the report's plan, 2 from your decisions)" in err
    results = undo(str(trash))
    assert [r.status for r in results] == ["restored"] * 3
    assert tree_hashes(pics) == before


def _import_in_fresh_profile(tmp_path: Path, rep: Path, decisions: Path, shown: dict[str, str]) -> None:
    """A browser without the decisions in its storage imports decisions.json and shows the same
    plan; a file made for another report is refused with a message."""
    from selenium.webdriver.common.by import By

    other = tmp_path / "other.json"
    other.write_text(
        json.dumps({"format": "clipdedup-decisions", "report_id": "x", "groups": {"1": {"skip": True}}})
    )
    driver = _driver(tmp_path / "profile2", tmp_path)
    try:
        driver.get((rep / "index.html").as_uri())
        _wait(lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "the page")
        assert set(_states(driver).values()) == {"kept", "move"}  # nothing decided in this profile
        driver.find_element(By.ID, "import").send_keys(str(other))
        _wait(lambda: "decisions for report x" in driver.find_element(By.ID, "message").text, "the refusal")
        assert set(_states(driver).values()) == {"kept", "move"}
        driver.find_element(By.ID, "import").send_keys(str(decisions))
        _wait(lambda: "imported 4 group decisions" in driver.find_element(By.ID, "message").text, "import")
        assert _states(driver) == shown
    finally:
        driver.quit()


def _big_report(rep: Path, n_groups: int) -> None:
    """index.html of `n_groups` two-file groups (no image files: every thumbnail is one shared JPEG)."""
    from clipdedup.report import html as report_html
    from clipdedup.report.core import Member, ReviewGroup

    rep.mkdir()
    Image.new("RGB", (64, 48), (200, 90, 40)).save(rep / "t.jpg")
    groups = []
    for k in range(1, n_groups + 1):
        a, b = f"dir{k % 97}/img{k:06d}.jpg", f"dir{k % 89}/copy{k:06d}.jpg"
        members = [
            Member(a, f"/x/{a}", f"/x/{a}", 1000 + k, 1, True, "kept"),
            Member(b, f"/x/{b}", f"/x/{b}", 1000 + k, 1, False, "would move", f"/t/{b}", to_kept=k * 1e-6),
        ]
        groups.append(ReviewGroup(k, a, "largest", k % 3 == 0, members, [(a, b, k * 1e-6)]))
    head = {"report_id": "big", "roots": {"": "/x"}, "dry_run": True}
    real = report_html.ensure_thumbs
    try:
        report_html.ensure_thumbs = lambda items, out_dir, size: ["t.jpg"] * len(items)
        report_html.write_html(groups, head, str(rep))
    finally:
        report_html.ensure_thumbs = real


def test_page_at_50000_groups(tmp_path: Path) -> None:
    """50,000 groups: the page is ready within seconds, renders one page of groups, and its filters,
    pager and keys work across all of them."""
    from selenium.webdriver.common.by import By

    n = 50_000
    rep = tmp_path / "rep"
    _big_report(rep, n)
    driver = _driver(tmp_path / "profile", tmp_path)
    try:
        t = time.monotonic()
        driver.get((rep / "index.html").as_uri())
        _wait(lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "the page", 60)
        ready = time.monotonic() - t
        assert _sections(driver) == [str(k) for k in range(1, 51)]
        where = driver.find_element(By.ID, "where").text
        assert f"of {n:,}".replace(",", "") in where.replace(",", "") and "page 1 of 1000" in where
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys("n")
        assert _sections(driver)[0] == "51"
        for _ in range(50):
            body.send_keys("j")  # past the page's last group: the next page opens
        assert _sections(driver)[0] == "101"
        driver.find_element(By.ID, "f-exact").click()
        assert _sections(driver)[:3] == ["3", "6", "9"]
        assert "of 16666" in driver.find_element(By.ID, "where").text
        loaded = driver.execute_script(
            "return Array.from(document.images).filter(function (i) { return i.complete; }).length"
        )
        assert 0 < loaded <= 100
    finally:
        driver.quit()
    size = (rep / "index.html").stat().st_size / 1e6
    print(f"50,000 groups: index.html {size:.1f} MB, ready in {ready:.1f} s")
