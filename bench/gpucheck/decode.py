"""Decode checks: DALI on a mixed folder, DALI against Pillow (the CPU reference) by the cosine of
the prepared pixels and of the embeddings, EXIF orientation, a DALI failure falling back to Pillow,
and DALI's decode rate against Pillow's measured in the same run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gpucheck.core import Ctx, timed

PIXEL_COS = 0.99  # prepared uint8 pixels (centred), DALI vs Pillow: resize filters differ slightly
EMBED_COS = 0.99  # the same images' embeddings (random-weight model)


def random_model(path: Path, arch: str | None, seed: int = 0) -> str:
    """Writes an open_clip config with random weights (`arch` from open_clip, or a tiny ViT)."""
    import json

    import open_clip
    import torch
    from open_clip.model import CLIP

    tiny = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    }
    cfg = tiny if arch is None else open_clip.get_model_config(arch)
    pre = {
        "size": cfg["vision_cfg"]["image_size"],
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "open_clip_pytorch_model.bin").exists():
        torch.manual_seed(seed)
        model = CLIP(**cfg)
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
        torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return f"local-dir:{path}"


def _picture(k: int, h: int = 300, w: int = 400) -> np.ndarray:
    rng = np.random.default_rng(k)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx + 40 * k) % 256, (yy * 2) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    return np.clip(rgb + rng.integers(0, 30, rgb.shape), 0, 255).astype(np.uint8)


def mixed_folder(root: Path, copies: int = 2) -> list[str]:
    """JPEG baseline / progressive / CMYK / grey / truncated, PNG RGB / RGBA, WebP, GIF; returns names."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(copies):
        img = Image.fromarray(_picture(k))
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
        names += [f"{s}{k}.jpg" for s in ("base", "prog", "cmyk", "grey", "trunc")]
        names += [f"rgb{k}.png", f"rgba{k}.png", f"pic{k}.webp", f"pal{k}.gif"]
    return names


def exif_folder(root: Path) -> list[str]:
    """Non-square JPEGs with EXIF orientations 1, 3, 6 and 8 (upright only after the rotation)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    names = []
    for k, o in enumerate((1, 3, 6, 8)):
        img = Image.fromarray(_picture(10 + k, 240, 420))
        exif = Image.Exif()
        exif[0x0112] = o
        img.save(root / f"exif{o}.jpg", quality=92, exif=exif.tobytes())
        names.append(f"exif{o}.jpg")
    return names


def decoded(paths: list[str], enc: Any, decoder: str, batch_size: int = 8, log=None) -> dict[str, Any]:
    """path -> prepared uint8 (H, W, 3) numpy item (or the failure reason) with `decoder`."""
    from clipdedup.ingest.decode import iter_batches

    out: dict[str, Any] = {}
    kw = dict(
        batch_size=batch_size, min_size=enc.input_size, decoder=decoder, spec=enc.spec, device=enc.device
    )
    for b in iter_batches(paths, enc.prepare, log=log, **kw):
        for i, item in zip(b.indices, b.items):
            out[paths[i]] = item.cpu().numpy() if hasattr(item, "cpu") else np.asarray(item)
        for i, why in b.failures:
            out[paths[i]] = why
    return out


def pixel_cos(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return -1.0
    u, v = a.astype(np.float64).ravel() - 127.5, b.astype(np.float64).ravel() - 127.5
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-12))


def _compare(enc: Any, paths: list[str], decoder: str) -> tuple[float, float, int, list[str]]:
    """(min pixel cosine, min embedding cosine, files compared, files where one side failed alone)."""
    a, b = decoded(paths, enc, decoder), decoded(paths, enc, "pil")
    both = [p for p in paths if not isinstance(a[p], str) and not isinstance(b[p], str)]
    odd = [os.path.basename(p) for p in paths if isinstance(a[p], str) != isinstance(b[p], str)]
    pc = min((pixel_cos(a[p], b[p]) for p in both), default=float("nan"))
    ea = enc.encode_batch([a[p] for p in both]) if both else np.zeros((0, 1))
    eb = enc.encode_batch([b[p] for p in both]) if both else np.zeros((0, 1))
    ec = float(np.min(np.sum(ea * eb, axis=1))) if both else float("nan")
    return pc, ec, len(both), odd


def part_decode(ctx: Ctx) -> None:
    from clipdedup.ingest.decode.dali import dali_why_not
    from clipdedup.ingest.encode.base import load_encoder
    from clipdedup.ingest.update import update_db

    device, decoder = ("cpu", "dali-cpu") if ctx.cpu else ("cuda", "dali")
    why = dali_why_not("cpu" if ctx.cpu else "mixed")
    if why and not ctx.cpu:  # DALI is part of the GPU check: its absence there is a wrong result
        ctx.run("decode", f"{decoder} available", lambda: (False, why), est=(0, 0))
    needs = f"DALI unavailable ({why})" if why else None
    enc = load_encoder(random_model(ctx.tmp / "tiny", None), device=device, batch_size=8)
    folder = ctx.tmp / "mixed"
    names = mixed_folder(folder)
    paths = [str(folder / n) for n in names]

    def whole_folder(dec: str) -> tuple[bool, str]:
        old = os.environ.get("CLIPDEDUP_DECODER")
        os.environ["CLIPDEDUP_DECODER"] = dec
        try:
            s = update_db(
                folder, ctx.tmp / "db", encoder=enc, batch_size=8, dry_run=True, log=lambda line: None
            )
        finally:
            os.environ.pop("CLIPDEDUP_DECODER") if old is None else os.environ.update(CLIPDEDUP_DECODER=old)
        done = set(s.in_memory) | {os.path.relpath(p, folder) for p, _ in s.failed}
        finite = all(np.isfinite(v).all() for v in s.in_memory.values())
        ok = done == set(names) and finite and s.encoded + s.copied + len(s.failed) == len(names)
        failed = ", ".join(sorted(os.path.basename(p) for p, _ in s.failed)) or "none"
        return ok, f"{len(names)} files: {len(s.in_memory)} encoded, failed: {failed}"

    for dec in (decoder, "pil"):
        ctx.run(
            "decode",
            f"{dec} on mixed folder ({device})",
            lambda dec=dec: whole_folder(dec),
            est=(20, 15),
            needs=needs if dec == decoder else None,
        )

    def against_pil(files: list[str], label: str) -> tuple[bool, str]:
        pc, ec, k, odd = _compare(enc, files, decoder)
        ok = pc >= PIXEL_COS and ec >= EMBED_COS and not odd and k > 0
        extra = f"; decoded by one side only: {', '.join(odd)}" if odd else ""
        return ok, (
            f"min cosine: pixels {pc:.4f} (>= {PIXEL_COS}), embeddings {ec:.4f} (>= {EMBED_COS}) "
            f"over {k} {label}{extra}"
        )

    ctx.run(
        "decode",
        f"{decoder} vs pil on mixed folder",
        lambda: against_pil(paths, "files"),
        est=(20, 15),
        needs=needs,
    )
    ex = exif_folder(ctx.tmp / "exif")
    ctx.run(
        "decode",
        f"{decoder} EXIF orientation 1/3/6/8 vs pil",
        lambda: against_pil([str(ctx.tmp / "exif" / n) for n in ex], "rotated JPEGs"),
        est=(15, 10),
        needs=needs,
    )
    ctx.run(
        "decode",
        f"{decoder} failure falls back to pil",
        lambda: _fallback(enc, paths, decoder),
        est=(15, 10),
        needs=needs,
    )
    ctx.run(
        "decode",
        f"{decoder} vs pil decode rate",
        lambda: _rates(ctx, enc, decoder),
        est=(60, 25),
        needs=needs,
    )


def _fallback(enc: Any, paths: list[str], decoder: str) -> tuple[bool, str]:
    """The first DALI batch raises inside the pipeline: that batch comes from Pillow, said in one
    line, and the pipeline is rebuilt for the next batches (which DALI decodes again)."""
    from clipdedup.ingest.decode import dali

    real, calls = dali.DaliRunner.run, []

    def failing_once(self, blobs, infos):
        calls.append(len(blobs))
        if len(calls) == 1:
            raise RuntimeError("injected: nvJPEG error")
        return real(self, blobs, infos)

    lines: list[str] = []
    dali.DaliRunner.run = failing_once
    try:
        got = decoded(paths, enc, decoder, batch_size=4, log=lines.append)
    finally:
        dali.DaliRunner.run = real
    want = decoded(paths, enc, "pil", batch_size=4)
    first = paths[:4]
    same_first = all(
        isinstance(got[p], str) == isinstance(want[p], str)
        and (isinstance(got[p], str) or np.array_equal(got[p], want[p]))
        for p in first
    )
    said = [line for line in lines if "DALI pipeline failed" in line]
    ok = same_first and len(said) == 1 and len(calls) >= 2 and set(got) == set(paths)
    return (
        ok,
        f"batch 1 equals pil's exactly: {same_first}; lines: {len(said)}; DALI runs after: {len(calls) - 1}",
    )


def _rates(ctx: Ctx, enc: Any, decoder: str) -> tuple[None, str]:
    from PIL import Image

    n = 48 if ctx.cpu else 2048
    folder = ctx.tmp / "rates"
    folder.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(2).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    paths = []
    for k in range(n):
        p = folder / f"img{k:05d}.jpg"
        Image.fromarray(np.roll(base, k * 7, axis=1)).save(p, quality=90)
        paths.append(str(p))
    bs = 16 if ctx.cpu else 128
    decoded(paths[: 2 * bs], enc, decoder, bs)  # warm: pipeline build, first CUDA work
    _, s_dali = timed(decoded, paths, enc, decoder, bs)
    _, s_pil = timed(decoded, paths, enc, "pil", bs)
    ctx.ratio(
        "decode",
        f"{decoder} decode rate vs pil ({n} 640x480 JPEGs)",
        s_pil / s_dali,
        f"pil's {n / s_pil:,.0f} img/s (this run)",
        None,
        s_dali + s_pil,
    )
    return None, f"{decoder} {n / s_dali:,.0f} img/s, pil {n / s_pil:,.0f} img/s"
