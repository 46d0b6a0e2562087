"""The CPU's features, as every CPU-dependent choice of this package sees them.

One place reads them: the flags the kernel reports (`/proc/cpuinfo`'s `flags` on x86, `Features` on
ARM), less those named in `CLIPDEDUP_CPU_MASK` (comma-separated, e.g. `avx512_bf16,amx_bf16` to run
as a CPU without fast bfloat16 would, or `avx2` to take the portable integer screen). The matching
backends' availability and the native integer screen's instruction set both ask `has()`, so one
variable makes a machine behave as a smaller CPU of its class (docs/backends.md).
"""

from __future__ import annotations

import functools
import os
import platform

MASK_ENV = "CLIPDEDUP_CPU_MASK"


@functools.lru_cache(maxsize=1)
def reported_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def masked() -> frozenset[str]:
    """The features `CLIPDEDUP_CPU_MASK` hides (read on every call, so tests may set it)."""
    return frozenset(f.strip() for f in os.environ.get(MASK_ENV, "").split(",") if f.strip())


def flags() -> frozenset[str]:
    """The features this package may use: the reported ones less the masked ones."""
    return reported_flags() - masked()


def has(*features: str) -> bool:
    """True when every one of `features` is present and not masked."""
    return all(f in flags() for f in features)


def machine() -> str:
    """The architecture name (`x86_64`, `aarch64`, ...)."""
    return platform.machine()


def describe() -> str:
    """One line for `clip-image-deduper backends`: architecture, the features that matter here, masks."""
    keys = (
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_bf16",
        "asimd",
        "asimddp",
    )
    seen = [k for k in keys if k in reported_flags()]
    hidden = sorted(masked() & reported_flags())
    line = f"{machine()}: " + (" ".join(f for f in seen if f not in hidden) or "none of " + " ".join(keys))
    if hidden:
        line += f" (masked by {MASK_ENV}: {' '.join(hidden)})"
    return line
