"""The whole GPU validation in one command: a table, JSON, and exit code 1 on any wrong result.

    python bench/gpu_check.py --json bench/out/gpu_check.json    # on one H100/H200, <= 8 min
    python bench/gpu_check.py --cpu                              # every part that runs without a GPU

Parts (`--only` picks some):
    pytest   `pytest -m gpu` (the suite's GPU-only tests)
    plan     launch-grid arithmetic of the Triton kernel up to 10^9 rows
    match    `triton` and `torch-cuda` against the planted answer and against `cpu-fp32` (same
             pair set, bit-identical distances) at 1M x 1280 and 6.5M x 256 (past the old grid
             limit), in one step and streamed under a small device budget, self and import mode
    decode   DALI 'mixed' on a folder mixing JPEG (baseline, progressive, CMYK, grey, truncated),
             PNG (RGB, RGBA), WebP and GIF: every file encoded or failed with a reason, all
             vectors finite
    graph    the CUDA-graph encoder against the same model run eagerly (cosine >= 0.9999), random
             weights ViT-B-32 (never a real model's numbers)
    rates    model-only vs pipeline (DALI decode + encode) images/s, random-weight ViT-B-32 and
             ViT-L-14: informational, target pipeline >= 90% of model-only for ViT-L-14

With `--cpu` the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported), torch-cuda's step logic runs on CPU with the float32 recipe, DALI runs its 'cpu'
decoder, the graph path runs with an eager stand-in for capture, all at small sizes; `pytest` is
skipped. `--fail-on-purpose` perturbs one expected distance by one ulp: the run must then exit 1
(tests/test_gpu_check.py checks both).
"""

from __future__ import annotations

import os
import sys

CPU = "--cpu" in sys.argv
if CPU:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton (torch imports it)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Check:
    part: str
    case: str
    ok: bool | None  # None: skipped or informational
    seconds: float
    detail: str = ""


def timed(fn: Callable, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


# ---------------------------------------------------------------------------------------- pytest
def part_pytest(args) -> list[Check]:
    if CPU:
        return [
            Check("pytest", "pytest -m gpu", None, 0.0, "skipped: --cpu (the CPU suite runs them as skips)")
        ]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    r, s = timed(subprocess.run, cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    last = (r.stdout.strip().splitlines() or ["no output"])[-1]
    return [Check("pytest", "pytest -m gpu", r.returncode == 0, s, last)]


# ------------------------------------------------------------------------------------------ plan
def part_plan(args) -> list[Check]:
    from clipdedup.kernels.pairwise import MAX_GRID, launch_plan, tile_count
    from clipdedup.match.backends.triton import plan_steps

    out = []
    for n in (6_500_000, 10**9):
        t = time.perf_counter()
        chunk, steps = plan_steps(n, n, 2 * 1280, int(0.6 * 80e9), True)
        pairs, biggest = 0, 0
        for st in steps:
            rows, cols = st.q1 - st.q0, st.k1 - st.k0
            diag = st.k0 == st.q0
            pairs += rows * (rows - 1) // 2 if diag else rows * cols
            plan = launch_plan(tile_count(-(-rows // 128), -(-cols // 128), diag))
            biggest = max([biggest, *(p for _, p in plan)])
        ok = pairs == n * (n - 1) // 2 and biggest <= MAX_GRID
        detail = f"{len(steps)} steps, largest launch {biggest} programs (limit {MAX_GRID})"
        out.append(Check("plan", f"N={n:,} x 1280, 80 GB", ok, time.perf_counter() - t, detail))
    return out


# ----------------------------------------------------------------------------------------- match
def planted_unit(n: int, d: int, groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows (like CLIP embeddings) with `groups` planted triples (a source and two perturbed
    copies). Random unit rows in these dimensions are never within 0.3 of each other (cosine > 0.95
    is > 15 standard deviations), so the pairs within a threshold of that order are exactly the
    planted ones that pass it. Returns x and the (groups, 3) row indices of the triples."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 1 << 18):
        e = min(n, s + (1 << 18))
        x[s:e] = rng.standard_normal((e - s, d), dtype=np.float32)
        x[s:e] /= np.linalg.norm(x[s:e], axis=1, keepdims=True)
    tri = rng.choice(n, 3 * groups, replace=False).reshape(groups, 3)
    for c in (1, 2):
        noise = rng.standard_normal((groups, d), dtype=np.float32)
        noise *= (rng.uniform(0.01, 0.2, groups) / np.linalg.norm(noise, axis=1))[:, None]
        v = x[tri[:, 0]] + noise
        x[tri[:, c]] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x, tri


def planted_answer(x: np.ndarray, tri: np.ndarray, t: float):
    """Sorted (pairs, float32 distances) within `t` among the planted triples, by the exact definition."""
    from clipdedup.match.core import exact_distances

    a = np.concatenate([tri[:, 0], tri[:, 0], tri[:, 1]])
    b = np.concatenate([tri[:, 1], tri[:, 2], tri[:, 2]])
    i, j = np.minimum(a, b), np.maximum(a, b)
    d = exact_distances(x[i], x[j])
    keep = d <= t
    i, j, d = i[keep], j[keep], d[keep]
    order = np.lexsort((j, i))
    return np.stack([i[order], j[order]], 1).astype(np.int64), d[order].astype(np.float32)


def same(got, want) -> tuple[bool, str]:
    (gp, gd), (wp, wd) = got, want
    if gp.shape != wp.shape or not np.array_equal(gp, wp):
        return False, f"{len(gp)} pairs vs {len(wp)} expected"
    if not np.array_equal(gd.view(np.uint32), wd.view(np.uint32)):
        return False, f"{int((gd != wd).sum())} distances differ in their bits"
    return True, f"{len(gp)} pairs, distances bit-identical"


def backends(cpu: bool) -> dict[str, Callable]:
    """Name -> (x, y, t) -> sorted (pairs, distances), for the two GPU backends (or their CPU runs)."""
    from clipdedup.match import find_pairs
    from clipdedup.match.backends.torch_cuda import device_bytes, pairs_torch_cuda
    from clipdedup.match.backends.triton import pairs_triton

    def sort(i, j, d):
        order = np.lexsort((j, i))
        return np.stack([i[order], j[order]], 1).astype(np.int64), d[order].astype(np.float32)

    if not cpu:
        return {
            "triton": lambda x, y, t: find_pairs(x, t, y=y, backend="triton"),
            "torch-cuda": lambda x, y, t: find_pairs(x, t, y=y, backend="torch-cuda"),
            "triton streamed 1 GB": lambda x, y, t: sort(*pairs_triton(x, y, t, budget=1 << 30)),
            "torch-cuda streamed 4 GB": lambda x, y, t: sort(*pairs_torch_cuda(x, y, t, budget=4 << 30)),
        }
    small = (16, 16, 32)

    def streamed_triton(x, y, t):
        width = -(-x.shape[1] // small[2]) * small[2]
        budget = 3 * 2 * width * 40  # chunks of 40 rows
        return sort(*pairs_triton(x, y, t, device="cpu", blocks=small, budget=budget, max_grid=5, cap=4))

    def steps_torch(x, y, t):
        row, fixed = device_bytes(x.shape[1], "float32")
        return sort(*pairs_torch_cuda(x, y, t, device="cpu", recipe="float32", budget=fixed + 3 * row * 50))

    return {
        "triton (interpreter)": lambda x, y, t: sort(*pairs_triton(x, y, t, device="cpu", blocks=small)),
        "triton streamed, 5-program launches (interpreter)": streamed_triton,
        "torch-cuda steps (cpu, float32 recipe)": steps_torch,
    }


def part_match(args) -> list[Check]:
    from clipdedup.match import find_pairs

    sizes = [(200, 64, 12), (130, 300, 8)] if CPU else [(1_000_000, 1280, 2000), (6_500_000, 256, 5000)]
    prefix = 60 if CPU else 60_000
    out = []
    for n, d, groups in sizes:
        (x, tri), s = timed(planted_unit, n, d, groups, seed=n + d)
        dist = planted_answer(x, tri, 1.0)[1]
        t = float(np.median(dist))  # a planted pair sits exactly on the threshold
        want = planted_answer(x, tri, t)
        if args.fail_on_purpose:
            want[1][0] = np.nextafter(want[1][0], np.float32(1))
        out.append(
            Check("match", f"planted data {n:,} x {d}", None, s, f"threshold {t:.6f}, {len(want[0])} pairs")
        )
        for name, fn in backends(CPU).items():
            if "streamed" in name and n > 2_000_000:
                continue  # streaming is checked at 1M x 1280; 6.5M x 256 checks the launch grid
            try:
                got, s = timed(fn, x, None, t)
                ok, detail = same(got, want)
            except Exception as e:  # a crash is a wrong result too
                ok, s, detail = False, 0.0, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            out.append(Check("match", f"{name} self {n:,} x {d}", ok, s, detail))
        # Against cpu-fp32 on a subset dense in planted rows: self, and import (the next rows as keys).
        rng = np.random.default_rng(d)
        rest = np.setdiff1d(rng.choice(n, min(n, 2 * prefix), replace=False), tri.ravel())
        rows = rng.permutation(np.concatenate([tri.ravel(), rest])[: 2 * prefix])
        xp, yp = x[rows[:prefix]], x[rows[prefix : 2 * prefix]]
        for mode, y in (("self", None), ("import", yp)):
            ref, s = timed(find_pairs, xp, t, y=y, backend="cpu-fp32")
            if args.fail_on_purpose and len(ref[1]):
                ref[1][0] = np.nextafter(ref[1][0], np.float32(1))
            out.append(
                Check(
                    "match",
                    f"cpu-fp32 {mode} {prefix:,} x {d} (planted rows)",
                    None,
                    s,
                    f"{len(ref[0])} pairs",
                )
            )
            for name, fn in backends(CPU).items():
                try:
                    got, s = timed(fn, xp, y, t)
                    ok, detail = same(got, ref)
                except Exception as e:
                    ok, s, detail = (
                        False,
                        0.0,
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    )
                out.append(Check("match", f"{name} {mode} {prefix:,} x {d} vs cpu-fp32", ok, s, detail))
    return out


# ------------------------------------------------------------------------------ decode / encode
def random_model(path: Path, arch: str | None, seed: int = 0) -> str:
    """Writes an open_clip config with random weights (`arch` from open_clip, or a tiny ViT)."""
    import open_clip
    import torch
    from open_clip.model import CLIP

    tiny = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    }
    cfg = tiny if arch is None else open_clip.get_model_config(arch)
    size = cfg["vision_cfg"]["image_size"]
    pre = {
        "size": size,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIP(**cfg)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return f"local-dir:{path}"


def mixed_folder(root: Path, copies: int = 2) -> list[str]:
    """JPEG baseline / progressive / CMYK / grey / truncated, PNG RGB / RGBA, WebP, GIF; returns names."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(copies):
        yy, xx = np.mgrid[0:300, 0:400]
        rgb = np.stack([(xx + 40 * k) % 256, (yy * 2) % 256, (xx + yy) % 256], -1).astype(np.uint8)
        rgb = np.clip(rgb + rng.integers(0, 30, rgb.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(rgb)
        img.save(root / f"base{k}.jpg", quality=90)
        img.save(root / f"prog{k}.jpg", quality=85, progressive=True)
        img.convert("CMYK").save(root / f"cmyk{k}.jpg", quality=90)
        img.convert("L").save(root / f"grey{k}.jpg", quality=90)
        data = (root / f"base{k}.jpg").read_bytes()
        (root / f"trunc{k}.jpg").write_bytes(data[: len(data) // 2])
        img.save(root / f"rgb{k}.png")
        img.convert("RGBA").save(root / f"rgba{k}.png")
        img.save(root / f"pic{k}.webp", quality=80)
        img.convert("P").save(root / f"pal{k}.gif")
        names += [
            f"{s}{k}.{e}" for s, e in [("base", "jpg"), ("prog", "jpg"), ("cmyk", "jpg"), ("grey", "jpg")]
        ]
        names += [f"trunc{k}.jpg", f"rgb{k}.png", f"rgba{k}.png", f"pic{k}.webp", f"pal{k}.gif"]
    return names


def dali_why(decoder: str) -> str | None:
    from clipdedup.ingest.decode.dali import dali_why_not

    return dali_why_not("cpu" if decoder == "dali-cpu" else "mixed")


def encode_folder(folder: Path, enc, decoder: str, batch_size: int = 8):
    from clipdedup.ingest.update import update_db

    old = os.environ.get("CLIPDEDUP_DECODER")
    os.environ["CLIPDEDUP_DECODER"] = decoder
    try:
        return update_db(folder, folder.parent / "db", encoder=enc, batch_size=batch_size, dry_run=True)
    finally:
        if old is None:
            os.environ.pop("CLIPDEDUP_DECODER")
        else:
            os.environ["CLIPDEDUP_DECODER"] = old


def part_decode(args, tmp: Path) -> list[Check]:
    from clipdedup.ingest.encode.base import load_encoder

    device, decoder = ("cpu", "dali-cpu") if CPU else ("cuda", "dali")
    why = dali_why(decoder)
    model = random_model(tmp / "tiny", None)
    folder = tmp / "mixed"
    names = mixed_folder(folder)
    enc = load_encoder(model, device=device, batch_size=8)
    out = []
    if why:  # a wrong result on a GPU machine (DALI is part of the check), a skip elsewhere
        out.append(Check("decode", f"{decoder} on mixed folder ({device})", None if CPU else False, 0.0, why))
    for dec in ("pil",) if why else (decoder, "pil"):
        s, sec = timed(encode_folder, folder, enc, dec)
        done = set(s.in_memory) | {os.path.relpath(p, folder) for p, _ in s.failed}
        finite = all(np.isfinite(v).all() for v in s.in_memory.values())
        ok = (
            done == set(names)
            and s.scanned == len(names)
            and finite
            and s.encoded + s.copied + len(s.failed) == len(names)
        )
        failed = ", ".join(sorted(os.path.basename(p) for p, _ in s.failed)) or "none"
        detail = f"{len(names)} files: {len(s.in_memory)} encoded, failed: {failed}"
        out.append(Check("decode", f"{dec} on mixed folder ({device})", ok, sec, detail))
        if dec == decoder:
            first = s.in_memory
    if why:
        return out
    common = sorted(set(first) & set(s.in_memory))
    cos = min(float(np.dot(first[k], s.in_memory[k])) for k in common) if common else float("nan")
    out.append(
        Check(
            "decode",
            f"{decoder} vs pil embeddings (min cosine)",
            None,
            0.0,
            f"{cos:.5f} over {len(common)} files",
        )
    )
    return out


def part_graph(args, tmp: Path) -> list[Check]:
    from clipdedup.ingest.encode.base import load_encoder
    from clipdedup.ingest.encode.batch_runner import BatchRunner, capture_eager

    arch = None if CPU else "ViT-B-32"
    model = random_model(tmp / ("tiny-g" if CPU else "vitb32"), arch)
    device = "cpu" if CPU else "cuda"
    enc = load_encoder(model, device=device, dtype=None if CPU else "fp16", batch_size=32)
    if CPU:  # no graph here: the fixed-shape path with an eager stand-in for capture
        runner = BatchRunner(
            enc.runner.forward, enc.spec, batch_size=32, fixed_shape=True, capture=capture_eager
        )
        runner.fit(32)
    else:
        runner = enc.runner
    eager = BatchRunner(
        runner.forward, enc.spec, batch_size=32, device=device, dtype=runner.dtype, fixed_shape=False
    )
    h, w = enc.spec.size
    items = list(np.random.default_rng(1).integers(0, 256, (70, h, w, 3), dtype=np.uint8))
    (got, want), s = timed(lambda: (runner.encode(items), eager.encode(items)))
    cos = float(np.min(np.sum(got * want, axis=1)))
    ok = cos >= 0.9999 and np.isfinite(got).all() and (CPU or runner.mode == "graph")
    name = "tiny random ViT, fixed shape vs eager (cpu)" if CPU else "random ViT-B-32 fp16, graph vs eager"
    out = [
        Check(
            "graph",
            name,
            ok,
            s,
            f"mode {runner.mode}, min cosine {cos:.6f} over 70 images (2 full + 1 padded batch)",
        )
    ]
    if not CPU:
        ref32 = load_encoder(model, device=device, dtype="fp32", batch_size=32).encode_batch(items)
        c32 = float(np.min(np.sum(got * ref32, axis=1)))
        out.append(
            Check("graph", "random ViT-B-32: fp16 graph vs fp32 eager", None, 0.0, f"min cosine {c32:.6f}")
        )
    return out


def part_rates(args, tmp: Path) -> list[Check]:
    import torch
    from PIL import Image

    from clipdedup.ingest.encode.base import load_encoder

    n = 64 if CPU else 2048
    folder = tmp / "rates"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    for k in range(n):
        Image.fromarray(np.roll(base, k * 7, axis=1)).save(folder / f"img{k:05d}.jpg", quality=90)
    out = []
    archs = [None] if CPU else ["ViT-B-32", "ViT-L-14"]
    device, decoder = ("cpu", "dali-cpu") if CPU else ("cuda", "dali")
    if dali_why(decoder):
        decoder = "pil"
    bs = 16 if CPU else 128
    for arch in archs:
        model = random_model(tmp / f"rate-{arch}", arch)
        enc = load_encoder(model, device=device, batch_size=bs)
        enc.runner.fit(bs)
        h, w = enc.spec.size
        dev_items = torch.zeros((bs, h, w, 3), dtype=torch.uint8, device=device)
        batches = max(2, n // bs)

        def model_only(dev_items=dev_items, enc=enc, batches=batches):
            pend = None
            for _ in range(batches):
                nxt = enc.runner.submit(list(dev_items))
                if pend is not None:
                    pend.result()
                pend = nxt
            pend.result()

        model_only()  # warm
        _, s_model = timed(model_only)
        summary, s_pipe = timed(encode_folder, folder, enc, decoder, bs)
        r_model, r_pipe = batches * bs / s_model, summary.encoded / s_pipe
        name = f"random {arch or 'tiny ViT'} ({device}, {decoder})"
        detail = (
            f"model-only {r_model:,.0f} img/s, pipeline {r_pipe:,.0f} img/s ({100 * r_pipe / r_model:.0f}%)"
        )
        ok = None if summary.encoded == n else False
        out.append(
            Check(
                "rates",
                name,
                ok,
                s_model + s_pipe,
                detail + ("" if ok is None else f"; {summary.encoded}/{n} encoded"),
            )
        )
    return out


PARTS = ["pytest", "plan", "match", "decode", "graph", "rates"]


def table(checks: list[Check]) -> str:
    head = f"{'part':<7} {'case':<66} {'result':<6} {'seconds':>8}  detail"
    lines = [head, "-" * 118]
    for c in checks:
        res = {True: "ok", False: "WRONG", None: "-"}[c.ok]
        lines.append(f"{c.part:<7} {c.case[:66]:<66} {res:<6} {c.seconds:>8.2f}  {c.detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the parts that run without a GPU, small sizes")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    ap.add_argument("--json", default=None, help="write the checks as JSON here")
    ap.add_argument(
        "--fail-on-purpose", action="store_true", help="perturb one expected distance (must exit 1)"
    )
    args = ap.parse_args(argv)
    import torch

    if not CPU and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; run with --cpu here", file=sys.stderr)
        return 2
    checks: list[Check] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for part in args.only.split(","):
            fn = globals()[f"part_{part}"]
            try:
                res = fn(args) if part in ("pytest", "plan", "match") else fn(args, Path(tmp) / part)
            except Exception as e:  # one part crashing is a failure of that part; the rest still run
                traceback.print_exc()
                res = [
                    Check(
                        part,
                        "crashed",
                        False,
                        0.0,
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    )
                ]
            checks += res
            print(table(res).split("\n", 2)[-1], flush=True)
    from clipdedup.util.cpu import describe

    where = "CPU (--cpu)" if CPU else torch.cuda.get_device_name()
    print(f"\n{where}, cpu: {describe()}, {time.perf_counter() - t0:.0f} s\n" + table(checks))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "device": where,
            "cpu_mode": CPU,
            "cpu": describe(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "checks": [asdict(c) for c in checks],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 1 if any(c.ok is False for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
