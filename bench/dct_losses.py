"""Where builtin:dct loses recall and precision on a set of bench/corpus.py: every true pair is either
confirmed, missed by the screen (distance above the threshold) or rejected by the check (score below
the minimum); missed pairs are counted per pair of duplicate kinds, per package and per source size,
and false pairs per pair of sources (a family of distinct look-alikes counts once per file pair).

    python bench/dct_losses.py [tune|holdout|all]     # default: holdout, at the shipped defaults
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dct_quality as q  # noqa: E402
import corpus  # noqa: E402

SIZES = (160, 256, 400)  # shorter side of the source: buckets below each, and the rest


def true_pairs(sub: q.Subset) -> np.ndarray:
    """(P, 2) rows of sub.files that are duplicates of one source (neither a hard negative)."""
    by_src: dict[int, list[int]] = {}
    for k in np.nonzero(~sub.neg)[0].tolist():
        by_src.setdefault(int(sub.src[k]), []).append(k)
    out = [(a, b) for ks in by_src.values() for i, a in enumerate(ks) for b in ks[i + 1 :]]
    return np.array(out, np.int64).reshape(-1, 2)


def losses(root: Path, m: dict, sub: q.Subset, rows: dict[str, np.ndarray]) -> str:
    from clipdedup.ingest.encode.dct import DEFAULT_THRESHOLD, MIN_SCORE, VERIFIER

    x = np.stack([rows[f] for f in sub.files])
    screen, check = VERIFIER.split(x)
    tp = true_pairs(sub)
    d = np.linalg.norm(screen[tp[:, 0]].astype(np.float64) - screen[tp[:, 1]], axis=1)
    sc = VERIFIER.scores(check, check, tp)
    missed, rejected = d > DEFAULT_THRESHOLD, (d <= DEFAULT_THRESHOLD) & (sc < MIN_SCORE)
    kind = [Path(f).stem for f in sub.files]
    src = m["sources"]
    side = {int(sub.src[k]): _side(root / f) for k, f in enumerate(sub.files) if kind[k] == "orig"}
    total: dict[str, Counter] = {"kinds": Counter(), "package": Counter(), "source side": Counter()}
    screen_lost: dict[str, Counter] = {k: Counter() for k in total}
    check_lost: dict[str, Counter] = {k: Counter() for k in total}
    for n, (a, b) in enumerate(tp.tolist()):
        s = int(sub.src[a])
        keys = {
            "kinds": "+".join(sorted((kind[a], kind[b]))),
            "package": src[s]["pkg"],
            "source side": next((f"< {z}" for z in SIZES if side[s] < z), f">= {SIZES[-1]}"),
        }
        for name, key in keys.items():
            total[name][key] += 1
            screen_lost[name][key] += int(missed[n])
            check_lost[name][key] += int(rejected[n])
    out = [
        f"{len(tp)} true pairs: {int(missed.sum())} missed by the screen (T={DEFAULT_THRESHOLD:g}), "
        f"{int(rejected.sum())} rejected by the check (S={MIN_SCORE:g})"
    ]
    for name, tot in total.items():
        lost = screen_lost[name] + check_lost[name]
        out.append(f"lost per {name} (screen, check, of):")
        out += [
            f"  {k:<24} {screen_lost[name][k]:>5} {check_lost[name][k]:>5} {tot[k]:>6}"
            for k in sorted(tot, key=lambda k: (-lost[k], k))[:12]
        ]
    v = q.dct_verified(rows, sub.files, DEFAULT_THRESHOLD)
    p = v.pairs[v.confirmed]
    bad = (sub.src[p[:, 0]] != sub.src[p[:, 1]]) | sub.neg[p[:, 0]] | sub.neg[p[:, 1]]
    fam = Counter(
        tuple(sorted({src[int(sub.src[a])]["rel"], src[int(sub.src[b])]["rel"]})) for a, b in p[bad].tolist()
    )
    out.append(f"{int(bad.sum())} false pairs of {len(p)}; per pair of sources:")
    out += [f"  {n:>3}  " + " | ".join(key) for key, n in fam.most_common(12)]
    return "\n".join(out)


def _side(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return min(im.size)


if __name__ == "__main__":
    half = sys.argv[1] if len(sys.argv) > 1 else "holdout"
    root, m = corpus.build()
    rows, _, _ = q.embed_corpus(root)
    print(losses(root, m, q.subset(m, q.by_size(m, half, None)), rows))
