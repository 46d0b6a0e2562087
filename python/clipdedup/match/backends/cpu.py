"""The torch-based CPU matching backends: `cpu-bf16` and `cpu-fp32` (`torch-cuda` is in
`torch_cuda`), each a screen of `torch_screen` with its `Recipe`, then the exact re-check.
`cpu-bf16` runs the principal-subspace pre-screen of `project` first when the problem is big enough
for it to pay.
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


def _matcher(recipe_name: str, device: str, block: int):
    def run(x, y, threshold, *, progress=None, block_rows=block, block_cols=block):
        i, j = torch_screen(
            x,
            y,
            threshold,
            RECIPES[recipe_name],
            device=device,
            block_rows=block_rows,
            block_cols=block_cols,
            progress=progress,
        )
        return recheck(x, x if y is None else y, i, j, threshold)

    run.__name__ = f"pairs_{recipe_name}_{device}"
    return run


def pairs_cpu_bf16(
    x,
    y,
    threshold,
    *,
    progress=None,
    block_rows=2048,
    block_cols=2048,
    project=None,
    project_dim=PROJECT_DIM,
    max_candidates=None,
):
    """bf16 screening + exact re-check. With `project` (default: D >= 2 * project_dim and at least
    2^24 pairs) a principal-subspace pre-screen runs first, and the full rows are screened only when
    it leaves more than `max_candidates` candidates. The pre-screen's tiles are twice as wide: its
    matmuls are cheap, and fewer tiles mean fewer passes of per-tile overhead."""
    other = x if y is None else y
    kw = dict(block_rows=block_rows, block_cols=block_cols, progress=progress)
    if project is None:
        project = x.shape[1] >= 2 * project_dim and x.shape[0] * other.shape[0] >= 1 << 24
    cand = None
    if project:
        pre = dict(kw, block_rows=2 * block_rows, block_cols=2 * block_cols)
        cand = projected_candidates(x, y, threshold, k=project_dim, max_candidates=max_candidates, **pre)
    if cand is None:
        cand = torch_screen(x, y, threshold, RECIPES["bfloat16"], **kw)
    return recheck(x, other, cand[0], cand[1], threshold)


MATCHERS.register(
    "cpu-bf16",
    priority=20,
    why_not=_bf16_why_not,
    doc="bfloat16 screening (principal-subspace pre-screen) + exact re-check",
)(pairs_cpu_bf16)
pairs_cpu_fp32 = MATCHERS.register("cpu-fp32", priority=10, doc="float32 BLAS screening + exact re-check")(
    _matcher("float32", "cpu", 2048)
)
