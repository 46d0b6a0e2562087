"""The CPU matching backends: `cpu-bf16`, `cpu-int16` and `cpu-fp32` (`torch-cuda` is in
`torch_cuda`), each a screen (a `torch_screen.Recipe`, or the native `int_screen`), then the exact
re-check. Each runs the principal-subspace pre-screen of `project` first when the problem is big
enough for it to pay. Which is best depends on the CPU (`util.cpu`): bfloat16 matmuls where the CPU
has AVX-512 BF16 or AMX, the int16 screen where it has AVX2, float32 BLAS anywhere.
"""

from __future__ import annotations

from clipdedup.match.core import MATCHERS, recheck
from clipdedup.match.screen.project import PROJECT_DIM, projected_candidates
from clipdedup.match.screen.torch_screen import RECIPES, torch_screen
from clipdedup.util import cpu

BF16 = frozenset({"avx512_bf16", "amx_bf16"})


def _bf16_why_not() -> str | None:
    if not cpu.has("avx512_bf16") and not cpu.has("amx_bf16"):
        why = f"masked by {cpu.MASK_ENV}" if cpu.masked() & cpu.reported_flags() & BF16 else "absent"
        return f"avx512_bf16/amx_bf16 {why} (bf16 matmul would be slower than float32)"
    import torch

    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        if probe is not None and not probe():
            return "this CPU has no fast bfloat16 matmul (oneDNN reports no bf16 support)"
    except Exception:
        pass
    return None


def _int16_why_not() -> str | None:
    from clipdedup.match.screen.int_screen import isa

    if isa() == "generic":
        masked = f"masked by {cpu.MASK_ENV}" if "avx2" in cpu.masked() else "absent"
        return f"avx2 {masked} (the portable integer loop would be slower than float32 BLAS)"
    return None


def _screen_full(x, y, threshold, recipe: str, kw: dict):
    if recipe == "int16":
        from clipdedup.match.screen.int_screen import int16_rows_screen

        cand = int16_rows_screen(x, y, threshold)
        if kw.get("progress"):
            kw["progress"](1)
        return cand
    return torch_screen(x, y, threshold, RECIPES[recipe], **kw)


def pairs_cpu(
    x,
    y,
    threshold,
    *,
    recipe="bfloat16",
    progress=None,
    block_rows=2048,
    block_cols=2048,
    project=None,
    project_dim=PROJECT_DIM,
    max_candidates=None,
):
    """A CPU screen with `recipe` ("bfloat16", "float32" or "int16") + exact re-check. With `project`
    (default: D >= 2 * project_dim and at least 2^24 pairs) a principal-subspace pre-screen runs
    first, and the full rows are screened only when it leaves more than `max_candidates`
    candidates. The pre-screen's tiles are twice as wide: its matmuls are cheap, and fewer tiles
    mean fewer passes of per-tile overhead."""
    other = x if y is None else y
    kw = dict(block_rows=block_rows, block_cols=block_cols, progress=progress)
    if project is None:
        project = x.shape[1] >= 2 * project_dim and x.shape[0] * other.shape[0] >= 1 << 24
    cand = None
    if project:
        pre = dict(kw, block_rows=2 * block_rows, block_cols=2 * block_cols)
        if recipe == "int16":
            pre = {}
        cand = projected_candidates(
            x, y, threshold, k=project_dim, max_candidates=max_candidates, recipe=recipe, **pre
        )
    if cand is None:
        cand = _screen_full(x, y, threshold, recipe, kw)
    return recheck(x, other, cand[0], cand[1], threshold)


def _with_recipe(recipe: str, name: str):
    def run(x, y, threshold, **kw):
        return pairs_cpu(x, y, threshold, recipe=recipe, **kw)

    run.__name__ = name
    run.__doc__ = f"`pairs_cpu` with recipe {recipe!r}."
    return run


pairs_cpu_bf16 = _with_recipe("bfloat16", "pairs_cpu_bf16")
pairs_cpu_int16 = _with_recipe("int16", "pairs_cpu_int16")
pairs_cpu_fp32 = _with_recipe("float32", "pairs_cpu_fp32")

MATCHERS.register(
    "cpu-bf16",
    priority=20,
    why_not=_bf16_why_not,
    doc="bfloat16 screening (principal-subspace pre-screen) + exact re-check",
)(pairs_cpu_bf16)
MATCHERS.register(
    "cpu-int16",
    priority=15,
    why_not=_int16_why_not,
    doc="int16 screening of the principal-subspace projections (native, AVX2) + exact re-check",
)(pairs_cpu_int16)
MATCHERS.register(
    "cpu-fp32",
    priority=10,
    doc="float32 BLAS screening (principal-subspace pre-screen) + exact re-check",
)(pairs_cpu_fp32)
