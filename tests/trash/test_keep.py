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


@pytest.mark.parametrize("strategy", ["newest", "largest", "highest-quality", "pic-dir"])
def test_a_full_tie_keeps_the_first_path_in_byte_order(strategy: str) -> None:
    """Every key equal: the winner is pinned, in every listing order (byte order, not str order)."""
    header = (100, "JPEG")
    names = ["b.jpg", "a/z.jpg", "a.jpg", "B.jpg", "\udcf0.jpg", "\ue000.jpg"]
    for order in (names, names[::-1], sorted(names), sorted(names, reverse=True)):
        g = [cand(n, 50, 7, header) for n in order]
        assert g[choose_keep(g, strategy)].rel == "B.jpg"  # b"B" < b"a" < b"b"
    # Code-point order puts "\udcf0" (byte 0xf0 as a surrogate escape) first; byte order does not.
    odd = [cand(n, 50, 7, header) for n in ("\udcf0.jpg", "\ue000.jpg")]
    assert odd[choose_keep(odd, strategy)].rel == "\ue000.jpg"
    assert odd[::-1][choose_keep(odd[::-1], strategy)].rel == "\ue000.jpg"


@pytest.mark.parametrize(
    "strategy, loser, winner",
    [
        # the second key decides; the path would pick the other one
        ("largest", cand("a.jpg", 30, 1), cand("b.jpg", 30, 2)),
        ("newest", cand("a.jpg", 10, 5), cand("b.jpg", 11, 5)),
        ("highest-quality", cand("a.jpg", header=(9, "JPEG"), mtime=3), cand("b.jpg", header=(9, "PNG"))),
        (
            "highest-quality",
            cand("a.png", header=(9, "PNG"), mtime=1),
            cand("b.png", header=(9, "PNG"), mtime=2),
        ),
        ("pic-dir", cand("a/x.jpg", header=(9, "JPEG")), cand("b/12_p0.jpg", header=(1, "JPEG"))),
    ],
)
def test_a_partial_tie_falls_to_the_next_key_not_the_path(strategy, loser, winner) -> None:
    for g in ([loser, winner], [winner, loser]):
        assert g[choose_keep(g, strategy)] is winner
