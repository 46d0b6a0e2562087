"""Ingest throughput on CPU: end-to-end DB update vs the model alone vs the original tool's design.

Images: the JPEGs of ../shared/testdata plus generated larger JPEGs (1-12 MP, made once from the
test photos under /tmp: upscaled, with light grain so they compress like camera photos). Model:
open_clip ViT-B-32 with RANDOM weights (open_clip.create_model('ViT-B-32'), no checkpoint, saved
to a local dir and loaded via local-dir:): the compute is a real ViT-B-32's, the embeddings mean
nothing. Rows, all in this run on this machine:

- model only: the visual tower's forward on ready float batches (channels-last on and off), fp32
  with oneDNN-packed linear layers (the default, `ingest.encode.cpu_forward`), fp32 as open_clip loads
  it ("fp32-eager") and bf16 (only where the CPU has fast bf16, avx512_bf16 or amx_bf16: elsewhere
  torch emulates it at a fraction of fp32's speed, and its rows are skipped with that reason);
- pipeline: `update_db` into a fresh DB (scan, PIL draft decode + prepare in threads, encode,
  async .npy writes), with the thread plan of `clipdedup.util.threads` (decoding and inference take
  turns, each on every core) and alternatives (side by side, with and without oversubscription);
- original design: a thread pool of batch_size workers doing a full PIL decode + open_clip's
  per-image preprocess, then the batch encode, then one np.save per image, batch after batch.

Every pipeline row's DB, the alternative thread plans' included, must match the original design's
embeddings (cosine >= 0.99 on every image; draft decoding moves pixels slightly) or the row is
marked wrong and gets no speedup.

    python bench/bench_encode.py [--quick] [--json out.json]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, main, skipped, testdata_dir  # noqa: E402

TESTDATA = testdata_dir()
GEN_DIR = Path("/tmp/clipdedup-bench-jpegs")
MODEL_DIR = Path("/tmp/clipdedup-bench-vit-b-32-random")
BATCH = 32
MIN_COS = 0.99


def _make_one(args: tuple[str, str, int, int, int]) -> str:
    src, dst, w, h, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    with Image.open(src) as im:
        im = im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    a = np.asarray(im, np.int16) + rng.normal(0, 3, (h, w, 1)).astype(np.int16)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(dst, quality=int(rng.integers(85, 96)))
    return dst


def make_images(n: int, quick: bool) -> Path:
    """`n` JPEGs of 1..12 MP (1..3 MP when quick) under GEN_DIR, plus the test data's JPEGs."""
    root = GEN_DIR.with_name(GEN_DIR.name + ("-quick" if quick else "")) / f"n{n}"
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "gen").mkdir(parents=True)
    (root / "testdata").mkdir()
    photos = sorted((TESTDATA / "base_images").glob("*.jpg"))
    for p in TESTDATA.rglob("*.jpg"):  # the real JPEGs as they are (the corrupt ones too)
        shutil.copy(p, root / "testdata" / ("_".join(p.relative_to(TESTDATA).parts)))
    rng = np.random.default_rng(0)
    jobs = []
    for k in range(n):
        mp = rng.uniform(1, 3 if quick else 12) * 1e6
        aspect = rng.choice([4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3])
        w = int(np.sqrt(mp * aspect))
        jobs.append((str(photos[k % len(photos)]), str(root / "gen" / f"img{k:04d}.jpg"), w, int(mp / w), k))
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_make_one, jobs))
    done.write_text("ok")
    return root


# Encoders measured: label -> (dtype, cpu forward; None = the default, oneDNN-packed in fp32).
VARIANTS = {"fp32": ("fp32", None), "fp32-eager": ("fp32", "eager"), "bf16": ("bf16", None)}


def bf16_why_not() -> str | None:
    """Why this CPU's bf16 rows are not worth timing (as the registry's cpu-bf16 decides), or None."""
    from clipdedup.util import cpu

    if cpu.has("avx512_bf16") or cpu.has("amx_bf16"):
        return None
    return "no fast bf16 on this CPU (avx512_bf16/amx_bf16 absent or masked): emulated, slower than fp32"


def _load(model_id: str, dtype: str, forward: str | None):
    from clipdedup.ingest.encode.base import load_encoder

    old = os.environ.get("CLIPDEDUP_CPU_FORWARD")
    if forward:
        os.environ["CLIPDEDUP_CPU_FORWARD"] = forward
    try:
        return load_encoder(model_id, device="cpu", dtype=dtype, batch_size=BATCH)
    finally:
        os.environ.pop("CLIPDEDUP_CPU_FORWARD", None)
        if old is not None:
            os.environ["CLIPDEDUP_CPU_FORWARD"] = old


def make_model() -> str:
    """A random-init ViT-B-32 saved as an open_clip local dir; returns its model id."""
    if not (MODEL_DIR / "open_clip_pytorch_model.bin").exists():
        import open_clip
        import torch

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32")
        MODEL_DIR.mkdir(parents=True, exist_ok=True)
        cfg = {
            "model_cfg": open_clip.get_model_config("ViT-B-32"),
            "preprocess_cfg": dict(model.visual.preprocess_cfg),
        }
        (MODEL_DIR / "open_clip_config.json").write_text(json.dumps(cfg))
        torch.save(model.state_dict(), MODEL_DIR / "open_clip_pytorch_model.bin")
    return f"local-dir:{MODEL_DIR}"


def model_only(enc, channels_last: bool, n_batches: int) -> float:
    """Images per second of the visual tower alone on ready batches (median of `n_batches`)."""
    import torch

    visual = enc.runner.forward
    x = torch.randn(BATCH, 3, *enc.spec.size).to(next(visual.parameters()).dtype)
    visual = visual.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        visual(x[:2])
        for _ in range(n_batches):
            t = time.perf_counter()
            visual(x)
            times.append(time.perf_counter() - t)
    return BATCH / float(np.median(times))


def original_design(visual, preprocess, root: Path, paths: list[Path], db: Path) -> dict[str, np.ndarray]:
    """The original tool's loop: full decode + per-image preprocess in a batch_size thread pool,
    then the batch forward, then one np.save per image. `visual` and `preprocess`: open_clip's model
    (as open_clip loads it, no oneDNN packing) and eval transform, loaded before the clock starts."""
    import torch
    from PIL import Image

    out = {}

    def load(p: Path):
        try:
            with Image.open(p) as im:
                return preprocess(im.convert("RGB"))
        except Exception:
            return None

    with ThreadPoolExecutor(BATCH) as pool:
        for s in range(0, len(paths), BATCH):
            chunk = paths[s : s + BATCH]
            got = [(p, x) for p, x in zip(chunk, pool.map(load, chunk)) if x is not None]
            with torch.inference_mode():
                f = visual(torch.stack([x for _, x in got]))
                f = torch.nn.functional.normalize(f, dim=-1).numpy()
            for (p, _), v in zip(got, f):
                rel = p.relative_to(root).as_posix()
                dst = db / (rel + ".npy")
                dst.parent.mkdir(parents=True, exist_ok=True)
                np.save(dst, v)
                out[rel] = v
    return out


def pipeline(enc, root: Path, db: Path, plan=None) -> tuple[float, object]:
    """(seconds, summary) of `update_db` into a fresh DB, with a forced `ThreadPlan` if given."""
    from clipdedup.ingest import update

    real = update.thread_plan
    if plan is not None:
        update.thread_plan = lambda device, cores=None, torch_model=True: plan  # type: ignore[assignment]
    try:
        t = time.perf_counter()
        s = update.update_db(root, db, encoder=enc, batch_size=BATCH, log=lambda line: None)
        return time.perf_counter() - t, s
    finally:
        update.thread_plan = real


def _plan_name(p) -> str:
    how = "turns" if p.prefetch == 0 else "side by side"
    return f"{p.torch_threads}t+{p.decoders}d {how}"


def _chunks(root: Path, paths: list[Path], k: int, tmp: Path) -> list[tuple[Path, list[Path]]]:
    """`k` interleaved subsets of `paths` as trees of hard links (same relative paths)."""
    out = []
    for c in range(k):
        croot = tmp / f"chunk{c}"
        mine = []
        for p in paths[c::k]:
            dst = croot / p.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, dst)
            mine.append(dst)
        out.append((croot, mine))
    return out


def run(quick: bool) -> list[Row]:
    """Every measurement is made on each chunk of the images in turn, the methods' order rotating
    from chunk to chunk, so a busy neighbour on a shared machine slows all of them alike."""
    import open_clip
    import torch

    from clipdedup.util.threads import ThreadPlan, thread_plan, torch_threads

    n_gen = 24 if quick else 500
    root = make_images(n_gen, quick)
    paths = sorted(p for p in root.rglob("*.jpg"))
    model_id = make_model()
    cores = os.cpu_count() or 1
    split = thread_plan("cpu", cores)
    # Alternatives: side by side, oversubscribed or with a fixed share of the cores each.
    share = max(1, cores // 4)
    alts = {ThreadPlan(cores, cores, 2), ThreadPlan(max(1, cores - share), share, 2)}
    variants = [] if quick else sorted(alts - {split}, key=str)
    why_bf16 = bf16_why_not()
    lacking = {label: why_bf16 for label, how in VARIANTS.items() if how[0] == "bf16" and why_bf16}
    encs = {label: _load(model_id, *how) for label, how in VARIANTS.items() if label not in lacking}
    # Loaded once, outside the timing, like our encoders.
    orig_model, orig_prep = open_clip.create_model_from_pretrained(model_id, return_transform=True)
    orig_visual = orig_model.visual.eval()
    secs: dict[str, float] = {}
    model_times: dict[tuple[str, int, bool], list[float]] = {}
    ref: dict[str, np.ndarray] = {}
    oks: dict[str, list[float]] = {}  # pipeline key -> cosine of each image vs the original
    complete: dict[str, bool] = {}
    tmp = Path(tempfile.mkdtemp(prefix="clipdedup-bench-encode-"))
    try:
        chunks = _chunks(root, paths, 2 if quick else 4, tmp)
        for c, (croot, cpaths) in enumerate(chunks):

            def original(croot=croot, cpaths=cpaths, c=c) -> None:
                t = time.perf_counter()
                got = original_design(orig_visual, orig_prep, croot, cpaths, tmp / f"orig{c}")
                secs["original"] = secs.get("original", 0.0) + time.perf_counter() - t
                ref.update({f"{c}/{k}": v for k, v in got.items()})

            def ours(label: str, croot=croot, c=c) -> None:
                enc = encs[label]
                # Quick mode: the model's usual configuration only (bench/run.py --quick < 2 min).
                configs = {(cores, False)} if quick else {(1, False), (cores, False), (cores, True)}
                for n_threads, cl in sorted(configs):
                    with torch_threads(n_threads):
                        batch_rate = model_only(enc, cl, 2 if quick else 3)
                    model_times.setdefault((label, n_threads, cl), []).append(BATCH / batch_rate)
                enc.runner.forward.to(memory_format=torch.contiguous_format)  # as the encoder runs
                for sp in [split] + ([] if label != "fp32" else variants):
                    key = f"{label} {_plan_name(sp)}"
                    dt, _ = pipeline(enc, croot, tmp / f"db-{key}-{c}".replace(" ", "_"), sp)
                    secs[key] = secs.get(key, 0.0) + dt

            jobs = [original] + [lambda label=label: ours(label) for label in encs]
            for j in range(len(jobs)):
                jobs[(j + c) % len(jobs)]()
        # Correctness: every image the original encoded has (nearly) its vector in each of our DBs.
        for key in (k for k in secs if k != "original"):
            oks[key], complete[key] = [], True
            for c in range(len(chunks)):
                db = tmp / f"db-{key}-{c}".replace(" ", "_")
                for rk, v in ref.items():
                    cc, rel = rk.split("/", 1)
                    if int(cc) != c:
                        continue
                    f = db / (rel + ".npy")
                    if f.exists():
                        oks[key].append(float(np.load(f) @ v))
                    else:
                        complete[key] = False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(paths)
    base = "original design (full PIL, bs pool)"
    rows = [
        Row("encode", base, n, secs["original"], n / secs["original"], "img/s", extra={"encoded": len(ref)})
    ]
    summary = []
    for label in encs:
        rates = {}
        for (d, th, cl), ts in sorted(model_times.items()):
            if d == label:
                rates[th, cl] = BATCH / float(np.median(ts))
                rows.append(
                    Row(
                        "encode",
                        f"model only, {label}, {th} torch threads" + (", channels-last" if cl else ""),
                        BATCH,
                        BATCH / rates[th, cl],
                        rates[th, cl],
                        "img/s",
                    )
                )
        model_rate = max(rates.values())  # the model's best, whatever its thread count
        for key in sorted(k for k in secs if k.split(" ", 1)[0] == label):
            dt = secs[key]
            main_row = key == f"{label} {_plan_name(split)}"
            cmin = min(oks[key]) if oks[key] else 0.0
            ok = complete[key] and cmin >= MIN_COS
            extra = {"vs_model_only": (n / dt) / model_rate, "model_only_rate": model_rate}
            extra["min_cosine_vs_original"] = cmin
            if main_row:
                rate, pct, x = n / dt, 100 * (n / dt) / model_rate, secs["original"] / dt
                summary.append(
                    f"pipeline {label} ({key.split(' ', 1)[1]}): {rate:.2f} img/s = {pct:.0f}% of model-only "
                    f"{model_rate:.2f} img/s; x{x:.2f} vs the original design (fp32); "
                    f"min cosine vs original {cmin:.4f} ({'ok' if ok else 'WRONG'})"
                )
            row_label = f"pipeline {key}" + ("" if main_row else " (alt)")
            rows.append(
                Row(
                    "encode",
                    row_label,
                    n,
                    dt,
                    n / dt,
                    "img/s",
                    correct=ok,
                    baseline=base,
                    extra=extra,
                )
            )
    for label, why in lacking.items():
        rows.append(skipped("encode", f"model only, {label}", BATCH, why, "img/s"))
        rows.append(skipped("encode", f"pipeline {label}", n, why, "img/s"))
    print("\n" + "\n".join(summary))
    print(f"model: ViT-B-32 with RANDOM weights (not a trained model); {n} JPEGs; {cores} cores\n")
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
