"""The integer screen's choice: the native int16 kernel against the libraries that could do its job.

One screening step, 4,096 rows against 4,096 rows of width 128 (a tile of projected rows), every
contender computing all 16.8M dot products and the rows over a threshold:

- torch float32 matmul + threshold (oneDNN/MKL sgemm): the baseline every ratio is against;
- torch bfloat16 matmul + threshold, only where the CPU has AVX-512 BF16 or AMX (else skipped);
- `torch.ops.quantized.linear` (FBGEMM u8 x s8 -> s32, requantized to uint8) + threshold, where
  this torch has it: the library the issue named (torch marks its quantized tensors deprecated);
- `torch._int_mm` (int8 x int8 -> int32) + threshold;
- the native int16 screen (csrc/int_screen.cpp) with each instruction set this CPU has: dots and
  threshold fused, nothing but the hits leaves the kernel.

Checks: every exact contender (int8/int16 paths on integer inputs, float32 on the same integers,
which are exact in float32 at these sizes) must find the same pairs as the int64 numpy definition
(`int_screen.int16_screen_ref` on the same operands); FBGEMM's output is requantized (not exact),
so its row is timed against the baseline but marked unchecked, with the reason. Rounds interleaved.
"""

from __future__ import annotations

import numpy as np

from clipdedup import native
from clipdedup.match.screen import int_screen as isc
from clipdedup.util import cpu
from common import Row, interleaved, main, skipped

BASE = "torch float32 mm + threshold"


def operands(n: int, k: int, seed: int = 0):
    """int8-range integer rows (exact in every contender's type) and thresholds keeping ~0.1%."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-127, 128, (n, k)).astype(np.int16)
    b = rng.integers(-127, 128, (n, k)).astype(np.int16)
    b[: n // 8] = a[: n // 8]  # some strong pairs
    dots = a[:512].astype(np.int64) @ b.astype(np.int64).T
    cut = int(np.quantile(dots, 0.999))
    ta = np.full(n, cut // 2, np.int32)
    tb = np.full(n, cut - cut // 2, np.int32)
    return a, b, ta, tb


def contenders(a, b, ta, tb) -> tuple[dict, dict[str, str]]:
    import torch

    fns, skips = {}, {}
    thr = torch.from_numpy(ta.astype(np.int64))[:, None] + torch.from_numpy(tb.astype(np.int64))[None, :]
    a32, b32 = torch.from_numpy(a).float(), torch.from_numpy(b).float()

    def hits(c):
        r, q = torch.nonzero(c >= thr, as_tuple=True)
        return r.numpy(), q.numpy()

    fns[BASE] = lambda: hits(a32 @ b32.T)
    if cpu.has("avx512_bf16") or cpu.has("amx_bf16"):
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        fns["torch bfloat16 mm + threshold"] = lambda: hits((a16 @ b16.T).float())
    else:
        skips["torch bfloat16 mm + threshold"] = "no avx512_bf16/amx_bf16 here (bf16 is emulated, slow)"
    a8, b8t = torch.from_numpy(a.astype(np.int8)), torch.from_numpy(b.astype(np.int8)).T.contiguous()
    fns["torch._int_mm int8 + threshold"] = lambda: hits(torch._int_mm(a8, b8t))
    try:
        qa = torch.quantize_per_tensor(a32 + 128, 1.0, 0, torch.quint8)
        w = torch.ops.quantized.linear_prepack(torch.quantize_per_tensor(b32, 1.0, 0, torch.qint8), None)
        qlinear = torch.ops.quantized.linear
        qlinear(qa, w, 1024.0, 0)
        fns["FBGEMM u8 x s8 quantized.linear"] = lambda: qlinear(qa, w, 1024.0, 0).int_repr()
    except Exception as e:  # a torch without the quantized CPU kernels
        skips["FBGEMM u8 x s8 quantized.linear"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    for name in native.int_screen_isas():
        if name == "generic" or cpu.has(name):
            fns[f"native int16 screen ({name})"] = lambda n=name: isc.int16_screen(a, b, ta, tb, isa_name=n)
        else:
            skipped[f"native int16 screen ({name})"] = f"{name} masked by {cpu.MASK_ENV}"
    return fns, skips


def run(quick: bool) -> list[Row]:
    import torch

    n, k = (1024, 128) if quick else (4096, 128)
    a, b, ta, tb = operands(n, k)
    want = set(zip(*(v.tolist() for v in isc.int16_screen_ref(a, b, ta, tb))))
    fns, skips = contenders(a, b, ta, tb)

    def check(name: str, out) -> bool:
        if name.startswith("FBGEMM"):
            return True  # requantized output: timed only (see the module docstring)
        return set(zip(np.asarray(out[0]).tolist(), np.asarray(out[1]).tolist())) == want

    timed = interleaved(fns, 2 if quick else 5, check)
    extra = {"cpu": cpu.describe(), "torch_threads": torch.get_num_threads(), "k": k}
    rows = []
    for name, tm in timed.items():
        exact = not name.startswith("FBGEMM")
        rows.append(
            Row(
                "iscreen",
                name,
                n,
                tm.seconds,
                n * n / tm.seconds,
                "pairs/s",
                correct=tm.ok if exact else None,
                baseline=None if name == BASE or not exact else BASE,
                extra=extra if exact else dict(extra, unchecked="requantized uint8 output, not exact dots"),
            )
        )
    for name, why in skips.items():
        rows.append(skipped("iscreen", name, n, why, "pairs/s"))
    return rows


if __name__ == "__main__":
    main(run, __doc__.split("\n")[0])
