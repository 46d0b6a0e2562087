"""The README stays a page for users, and every link in it and in docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    h = re.sub(r"[^\w\- ]", "", heading.strip().replace("`", "").lower())
    return h.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """GitHub-style heading anchors of a markdown page (duplicates get -1, -2, ...)."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.*)", line)
        if m:
            s = _slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```|<!--.*?-->", "", page.read_text(), flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target}: no such anchor")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# Top\n[ok](#top) [gone](nothere.md) [anchor](#nope)\n")
    assert broken_links(page) == ["nothere.md: no such file", "#nope: no such anchor"]


def test_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text()) <= 12_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_history_prose(page: Path) -> None:
    hits = re.findall(r"this session|earlier numbers were|until this session", page.read_text(), re.I)
    assert not hits
