"""The whole GPU validation in one command, under one deadline: a table, JSON, exit 1 on any wrong result.

    python bench/gpu_check.py --json bench/out/gpu_check.json    # one H100/H200, --deadline 480 s
    python bench/gpu_check.py --cpu                              # every part that runs without a GPU

Parts (`--only` picks some; bench/gpucheck/ holds them), every result judged against a CPU reference:
    plan     launch-grid arithmetic of the Triton kernel up to 10^9 rows
    kernel   the compiled kernel's overflow re-run (a too-small buffer, run again with the room it
             asked for) and `TooManyPairsError`, on shifts that make every pair a candidate
    match    `triton` and `torch-cuda` against a planted answer (1M x 1280) and against `cpu-fp32`
             (same pairs, bit-identical distances), self and import mode, in one step and streamed
             in several steps; ratio: triton against torch's blocked float16 `mm` + threshold
    store    GPU matching of a row store through `match_with_cache`, a full match and then an
             incremental rerun, against `find_pairs_store`; the pinned DB load against the files
    decode   DALI on a folder mixing JPEG (baseline, progressive, CMYK, grey, truncated), PNG,
             WebP and GIF; DALI vs Pillow by the cosine of prepared pixels and embeddings; EXIF
             orientation; a DALI failure falling back to Pillow; ratio: DALI's decode rate vs Pillow's
    graph    the CUDA-graph encoder vs eager; the fp16 -> fp32 re-run of non-finite rows; a capture
             failure running eagerly (random-weight models: never a real model's numbers)
    rates    ratio: the pipeline (decode + encode) vs the model-only forward, target 90% (ViT-L-14)
    ray      a local Ray cluster with the GPU: encode actors vs the local path, matching tasks vs
             `find_pairs_store`, rows read from the DB's snapshot
    pytest   `pytest -m gpu` (the suite's GPU-only tests)

Every part runs against the one `--deadline`: a check whose estimate no longer fits is skipped, and
the skipped ones are listed at the end. A ratio row compares two rates measured in this run; one
below its target is marked BELOW (listed at the end; exit 1 only with `--strict-rates`).

With `--cpu` the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported), torch-cuda's step logic runs on CPU with the float32 recipe, DALI runs its 'cpu' decoder
(where installed), the graph path runs with stand-ins for capture, Ray runs CPU actors, all at small
sizes; each check that needs CUDA is listed as skipped with the reason. `--fail-on-purpose` perturbs
one expected distance by one ulp: the run must then exit 1 (tests/test_gpu_check.py checks both).
"""

from __future__ import annotations

import os
import sys

CPU = "--cpu" in sys.argv
if CPU:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton (torch imports it)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/gpucheck

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

from gpucheck.core import Check, Ctx, err, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["plan", "kernel", "match", "store", "decode", "graph", "rates", "ray", "pytest"]
DEADLINE = {False: 480.0, True: 160.0}  # seconds: 8 minutes on a GPU, under 3 minutes with --cpu


def part_pytest(ctx: Ctx) -> None:
    def run() -> tuple[bool, str]:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests"),
        ]
        limit = max(30, min(300, int(ctx.left()) - 10))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
        return r.returncode == 0, (r.stdout.strip().splitlines() or ["no output"])[-1]

    ctx.run("pytest", "pytest -m gpu", run, est=(60, 0), needs_cuda=True)


def _part(name: str):
    if name == "pytest":
        return part_pytest
    module = {"plan": "match", "kernel": "match", "rates": "encode", "graph": "encode", "ray": "ray_part"}
    mod = __import__(f"gpucheck.{module.get(name, name)}", fromlist=["x"])
    return getattr(mod, f"part_{name}")


def _cuda_why() -> str | None:
    import torch

    if CPU:
        return "--cpu"
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the parts that run without a GPU, small sizes")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    ap.add_argument("--json", default=None, help="write the checks as JSON here")
    ap.add_argument(
        "--deadline", type=float, default=None, help="seconds for the whole run (480; 160 with --cpu)"
    )
    ap.add_argument("--strict-rates", action="store_true", help="a ratio below its target fails the run")
    ap.add_argument(
        "--fail-on-purpose", action="store_true", help="perturb one expected distance (must exit 1)"
    )
    args = ap.parse_args(argv)
    why = _cuda_why()
    if not CPU and why:
        print(f"gpu_check: {why}; run with --cpu here", file=sys.stderr)
        return 2
    budget = DEADLINE[CPU] if args.deadline is None else args.deadline
    t0 = time.perf_counter()

    def overrun(*_: object) -> None:
        raise TimeoutError(f"past the {budget:.0f} s deadline")

    signal.signal(signal.SIGALRM, overrun)  # a check that runs far past its estimate is cut off
    signal.alarm(int(budget) + 60)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Ctx(CPU, args, Path(tmp), t0 + budget, cuda_why=why)
        ctx.emit = lambda c: print(table([c]).split("\n", 2)[-1], flush=True)
        for part in args.only.split(","):
            (ctx.tmp / part).mkdir(parents=True, exist_ok=True)
            try:
                _part(part)(ctx)
            except Exception as e:  # a part crashing outside its checks is a failure of that part
                traceback.print_exc()
                ctx.add(Check(part, "crashed", False, 0.0, err(e)))
    signal.alarm(0)
    checks = ctx.checks
    from clipdedup.util.cpu import describe

    where = "CPU (--cpu)" if CPU else _device_name()
    print(
        f"\n{where}, cpu: {describe()}, {time.perf_counter() - t0:.0f} s of a {budget:.0f} s deadline\n"
        + table(checks)
    )
    below = [f"{c.part}: {c.case}" for c in checks if c.target_met is False]
    for label, rows in (("skipped for time", ctx.skipped_for_time), ("below target", below)):
        print(f"{label}: " + ("; ".join(rows) if rows else "none"))
    wrong = [c for c in checks if c.ok is False]
    right, other = sum(c.ok is True for c in checks), sum(c.ok is None for c in checks)
    print(f"{len(wrong)} wrong, {right} right, {other} other")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "device": where,
            "cpu_mode": CPU,
            "deadline_s": budget,
            "seconds": time.perf_counter() - t0,
            "cpu": describe(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "skipped_for_time": ctx.skipped_for_time,
            "below_target": below,
            "checks": [asdict(c) for c in checks],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 1 if wrong or (args.strict_rates and below) else 0


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


if __name__ == "__main__":
    sys.exit(main())
