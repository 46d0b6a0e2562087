"""Encode checks: the CUDA-graph runner against the same model run eagerly, the float16 -> float32
re-run of non-finite rows, the capture-failure fallback, and the pipeline's rate (decode + encode)
against the model-only forward measured in the same run (target 90% for ViT-L-14 on a GPU)."""

from __future__ import annotations

import numpy as np

from gpucheck.core import Ctx, timed
from gpucheck.decode import random_model

PIPELINE_TARGET = 0.90


def _items(enc, n: int, seed: int) -> list[np.ndarray]:
    h, w = enc.spec.size
    return list(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1))) if len(a) else float("nan")


def part_graph(ctx: Ctx) -> None:
    from clipdedup.ingest.encode.base import load_encoder
    from clipdedup.ingest.encode.batch_runner import BatchRunner, capture_eager

    model = random_model(ctx.tmp / ("tiny-g" if ctx.cpu else "vitb32"), None if ctx.cpu else "ViT-B-32")
    device = "cpu" if ctx.cpu else "cuda"
    low = "bf16" if ctx.cpu else "fp16"

    def graph() -> tuple[bool, str]:
        enc = load_encoder(model, device=device, dtype=None if ctx.cpu else "fp16", batch_size=32)
        if ctx.cpu:  # no graph here: the fixed-shape path with an eager stand-in for capture
            runner = BatchRunner(
                enc.runner.forward, enc.spec, batch_size=32, fixed_shape=True, capture=capture_eager
            )
            runner.fit(32)
        else:
            runner = enc.runner
            runner.fit(32)
        eager = BatchRunner(
            runner.forward, enc.spec, batch_size=32, device=device, dtype=runner.dtype, fixed_shape=False
        )
        items = _items(enc, 70, 1)
        got, want = runner.encode(items), eager.encode(items)
        cos = _min_cos(got, want)
        ok = cos >= 0.9999 and np.isfinite(got).all() and (ctx.cpu or runner.mode == "graph")
        return ok, f"mode {runner.mode}, min cosine {cos:.6f} over 70 images (2 full + 1 padded batch)"

    name = (
        "tiny random ViT, fixed shape vs eager (cpu)" if ctx.cpu else "random ViT-B-32 fp16, graph vs eager"
    )
    ctx.run("graph", name, graph, est=(40, 15))

    def rerun() -> tuple[bool, str]:
        import torch

        enc = load_encoder(model, device=device, dtype=low, batch_size=8)
        ref = load_encoder(model, device=device, dtype="fp32", batch_size=8)
        inner = enc.runner

        def overflowing(x: torch.Tensor) -> torch.Tensor:  # rows whose first pixel is bright: inf
            out = inner.forward(x)
            bright = x[:, 0, 0, 0].float() > 1.0
            return torch.where(bright[:, None], torch.full_like(out, float("inf")), out)

        lines: list[str] = []
        runner = BatchRunner(
            overflowing,
            enc.spec,
            batch_size=8,
            device=device,
            dtype=inner.dtype,
            fp32=inner.fp32,
            log=lines.append,
        )
        items = _items(enc, 20, 2)
        for k, it in enumerate(items):
            it[0, 0] = 255 if k % 2 == 0 else 0
        got, want = runner.encode(items), ref.encode_batch(items)
        c_re, c_low = _min_cos(got[::2], want[::2]), _min_cos(got[1::2], want[1::2])
        ok = (
            runner.reruns == 10
            and len(lines) == 1
            and c_re >= 0.9999
            and c_low >= 0.99
            and np.isfinite(got).all()
        )
        return (
            ok,
            f"{runner.reruns} rows re-run, {len(lines)} line; vs fp32: re-run {c_re:.6f}, {low} {c_low:.5f}",
        )

    ctx.run("graph", f"{low} -> fp32 re-run of non-finite rows", rerun, est=(40, 20))

    def capture_failure() -> tuple[bool, str]:
        import torch

        enc = load_encoder(model, device=device, batch_size=8)
        inner = enc.runner

        def syncing(x: torch.Tensor) -> torch.Tensor:  # a host sync: not allowed while capturing
            _ = float(x.sum())
            return inner.forward(x)

        def failing(step, static):
            raise RuntimeError("operation not permitted when stream is capturing (stand-in)")

        lines: list[str] = []
        kw = dict(capture=failing) if ctx.cpu else {}
        runner = BatchRunner(
            syncing,
            enc.spec,
            batch_size=8,
            device=device,
            dtype=inner.dtype,
            fixed_shape=True,
            log=lines.append,
            **kw,
        )
        runner.fit(8)
        eager = BatchRunner(
            inner.forward, enc.spec, batch_size=8, device=device, dtype=inner.dtype, fixed_shape=False
        )
        items = _items(enc, 19, 3)
        cos = _min_cos(runner.encode(items), eager.encode(items))
        ok = (
            runner.mode == "fixed eager"
            and len(lines) == 1
            and "capture failed" in lines[0]
            and cos >= 0.9999
        )
        return ok, f"mode {runner.mode}, {len(lines)} line, min cosine vs eager {cos:.6f}"

    where = "stand-in capture that raises" if ctx.cpu else "a model that syncs the host"
    ctx.run("graph", f"capture failure -> eager ({where})", capture_failure, est=(30, 10))


def part_rates(ctx: Ctx) -> None:
    """Model-only forward (the fitted runner on device-resident batches, two in flight) against
    the pipeline (decode + encode from JPEG files) on the same model, in this run."""
    import torch
    from PIL import Image

    from clipdedup.ingest.decode.dali import dali_why_not
    from clipdedup.ingest.encode.base import load_encoder
    from clipdedup.ingest.update import update_db

    n = 48 if ctx.cpu else 2048
    folder = ctx.tmp / "rates"
    folder.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(2).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    for k in range(n):
        Image.fromarray(np.roll(base, k * 7, axis=1)).save(folder / f"img{k:05d}.jpg", quality=90)
    device, decoder = ("cpu", "dali-cpu") if ctx.cpu else ("cuda", "dali")
    if dali_why_not("cpu" if ctx.cpu else "mixed"):
        decoder = "pil"
    bs = 16 if ctx.cpu else 128
    for arch in [None] if ctx.cpu else ["ViT-B-32", "ViT-L-14"]:

        def rate(arch=arch) -> tuple[bool | None, str]:
            import os

            enc = load_encoder(random_model(ctx.tmp / f"rate-{arch}", arch), device=device, batch_size=bs)
            enc.runner.fit(bs)
            dev_items = list(torch.zeros((bs, *enc.spec.size, 3), dtype=torch.uint8, device=device))
            batches = max(2, n // bs)

            def model_only() -> None:
                pend = None
                for _ in range(batches):
                    nxt = enc.runner.submit(dev_items)
                    if pend is not None:
                        pend.result()
                    pend = nxt
                pend.result()

            model_only()  # warm
            _, s_model = timed(model_only)
            os.environ["CLIPDEDUP_DECODER"] = decoder
            try:
                s, s_pipe = timed(
                    update_db,
                    folder,
                    ctx.tmp / "db",
                    encoder=enc,
                    batch_size=bs,
                    dry_run=True,
                    log=lambda line: None,
                )
            finally:
                os.environ.pop("CLIPDEDUP_DECODER")
            r_model, r_pipe = batches * bs / s_model, s.encoded / s_pipe
            target = None if ctx.cpu else PIPELINE_TARGET
            ctx.ratio(
                "rates",
                f"pipeline vs model-only, random {arch or 'tiny ViT'} ({device}, {decoder})",
                r_pipe / r_model,
                f"model-only {r_model:,.0f} img/s",
                target,
                s_model + s_pipe,
            )
            ok = None if s.encoded == n else False
            return ok, f"pipeline {r_pipe:,.0f} img/s, {s.encoded}/{n} encoded"

        ctx.run(
            "rates",
            f"pipeline run, random {arch or 'tiny ViT'}",
            rate,
            est=(90 if arch == "ViT-L-14" else 45, 30),
        )
