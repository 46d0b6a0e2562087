"""Keep strategies: each against a plain restatement of its rule, and determinism."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from PIL import Image

from clipdedup.trash.keep import STRATEGIES, Candidate, choose_keep, source_rank


def cand(rel: str, size: int = 100, mtime: int = 0, header: tuple[int, str] = (0, "")) -> Candidate:
    c = Candidate(rel, "/nonexistent/" + rel, size, mtime)
    c._header = header
    return c


def test_registry_has_the_four_strategies() -> None:
    assert set(STRATEGIES.names()) == {"newest", "largest", "highest-quality", "pic-dir"}
    assert STRATEGIES.get().name == "largest"  # the default


def test_largest_ties_by_mtime() -> None:
    g = [cand("a.jpg", 10, 5), cand("b.jpg", 30, 1), cand("c.jpg", 30, 2)]
    assert g[choose_keep(g, "largest")].rel == "c.jpg"


def test_newest_ties_by_size() -> None:
    g = [cand("a.jpg", 10, 5), cand("b.jpg", 30, 5), cand("c.jpg", 99, 4)]
    assert g[choose_keep(g, "newest")].rel == "b.jpg"


def test_highest_quality_pixels_then_png_then_mtime() -> None:
    g = [
        cand("a.jpg", header=(100, "JPEG"), mtime=9),
        cand("b.png", header=(100, "PNG"), mtime=1),
        cand("c.webp", header=(50, "WEBP"), mtime=99),
    ]
    assert g[choose_keep(g, "highest-quality")].rel == "b.png"
    g.append(cand("d.jpg", header=(101, "JPEG")))
    assert g[choose_keep(g, "highest-quality")].rel == "d.jpg"
    g = [cand("a.png", header=(100, "PNG"), mtime=1), cand("b.png", header=(100, "PNG"), mtime=2)]
    assert g[choose_keep(g, "highest-quality")].rel == "b.png"


def test_highest_quality_reads_real_headers(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    Image.new("RGB", (80, 60)).save(tmp_path / "big.jpg")
    g = [Candidate(n, str(tmp_path / n), 1, 0) for n in ("small.png", "big.jpg")]
    assert g[choose_keep(g, "highest-quality")].rel == "big.jpg"
    assert g[1].header() == (4800, "JPEG")
    broken = Candidate("x.jpg", str(tmp_path / "missing.jpg"), 1, 0)
    assert broken.header() == (0, "")


@pytest.mark.parametrize(
    "name, rank",
    [
        ("12345_p0.jpg", 4),
        ("98765432_p12.png", 4),
        ("yande.re 123 tag1 tag2.jpg", 3),
        ("__hatsune_miku_vocaloid__0123456789abcdef0123456789abcdef.jpg", 2),
        ("Konachan.com - 4567 sample.png", 1),
        ("IMG_0001.jpg", 0),
        ("12345_p0_master1200.jpg", 0),
        ("__x__0123.jpg", 0),
    ],
)
def test_source_rank(name: str, rank: int) -> None:
    assert source_rank(name) == rank


def test_pic_dir_order() -> None:
    hq = (100, "JPEG")
    g = [
        cand("dl/12345_p0.jpg", header=(999, "PNG")),
        cand("Wallpaper/IMG.jpg", header=(1, "JPEG")),
        cand("dl/yande.re 5 a.jpg", header=hq),
    ]
    assert g[choose_keep(g, "pic-dir")].rel == "Wallpaper/IMG.jpg"
    g = g[:1] + g[2:] + [cand("x/VWallpaper/deep/IMG.jpg", header=(1, "JPEG"))]
    assert g[choose_keep(g, "pic-dir")].rel == "x/VWallpaper/deep/IMG.jpg"
    g = [cand("dl/yande.re 5 a.jpg", header=hq), cand("dl/12345_p0.jpg", header=(1, "JPEG"))]
    assert g[choose_keep(g, "pic-dir")].rel == "dl/12345_p0.jpg"
    # Same source rank: falls back to highest-quality.
    g = [cand("a/IMG1.jpg", header=(10, "JPEG")), cand("b/IMG2.jpg", header=(20, "JPEG"))]
    assert g[choose_keep(g, "pic-dir")].rel == "b/IMG2.jpg"
    # A file merely named Wallpaper is not in a Wallpaper dir.
    g = [cand("Wallpaper.jpg", header=(1, "JPEG")), cand("z.jpg", header=(2, "JPEG"))]
    assert g[choose_keep(g, "pic-dir")].rel == "z.jpg"


@pytest.mark.parametrize("strategy", ["newest", "largest", "highest-quality", "pic-dir"])
def test_choice_independent_of_order(strategy: str) -> None:
    rng = random.Random(7)
    for _ in range(20):
        g = [
            cand(
                f"d{rng.randint(0, 3)}/f{k}.jpg",
                rng.choice([1, 2]),
                rng.choice([1, 2]),
                (rng.choice([1, 2]), rng.choice(["PNG", "JPEG"])),
            )
            for k in range(5)
        ]
        chosen = {g_[choose_keep(list(g_), strategy)].rel for g_ in itertools.permutations(g)}
        assert len(chosen) == 1
