"""`clip-image-deduper backends`: the CPU's features first, then every registry, and which matching
backend is the default and why; CLIPDEDUP_CPU_MASK makes the registry see a smaller CPU."""

from __future__ import annotations

import pytest

from clipdedup.cli import dedup_cmd, run_cli
from clipdedup.match import MATCHERS
from clipdedup.util import cpu


def backends(capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    assert run_cli(dedup_cmd, "clip-image-deduper", ["backends"]) == 0
    return capsys.readouterr().out.splitlines()


def test_cpu_line_first_and_the_default_explained(capsys, monkeypatch) -> None:
    monkeypatch.delenv("CLIPDEDUP_BACKEND", raising=False)
    out = backends(capsys)
    assert out[0] == f"cpu: {cpu.describe()}" and out[1] == "matching backends:"
    default = next(line for line in out if line.startswith("  default: "))
    assert out.index(default) == 2 + len(MATCHERS.entries)  # right after the matching backends
    best = MATCHERS.get().name
    assert default.startswith(f"  default: {best}, the first available by priority")
    for name in MATCHERS.names()[: MATCHERS.names().index(best)]:  # each one above it, with its reason
        assert f"{name}: {MATCHERS.entries[name].unavailable_reason()}" in default


def test_masked_bf16_falls_back_and_says_why(capsys, monkeypatch) -> None:
    monkeypatch.delenv("CLIPDEDUP_BACKEND", raising=False)
    monkeypatch.setattr(cpu, "reported_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}))
    monkeypatch.setenv(cpu.MASK_ENV, "avx512_bf16,amx_bf16")
    assert cpu.flags() == {"avx2", "fma", "avx512f"} and not cpu.has("avx512_bf16")
    why = MATCHERS.entries["cpu-bf16"].unavailable_reason()
    assert why is not None and cpu.MASK_ENV in why
    out = backends(capsys)
    assert out[0] == f"cpu: {cpu.machine()}: avx2 fma avx512f (masked by {cpu.MASK_ENV}: avx512_bf16)"
    default = next(line for line in out if line.startswith("  default: "))
    assert f"cpu-bf16: {why}" in default and "cpu-bf16, the first" not in default
    monkeypatch.setenv(cpu.MASK_ENV, "")
    assert MATCHERS.entries["cpu-bf16"].unavailable_reason() is None or "oneDNN" in str(
        MATCHERS.entries["cpu-bf16"].unavailable_reason()
    )


def test_override_named_in_the_default_line(capsys, monkeypatch) -> None:
    monkeypatch.setenv("CLIPDEDUP_BACKEND", "reference")
    assert "  default: reference, set by CLIPDEDUP_BACKEND" in backends(capsys)
    monkeypatch.setenv("CLIPDEDUP_BACKEND", "nonesuch")
    assert any(
        "nonesuch, set by CLIPDEDUP_BACKEND, but not available here" in line for line in backends(capsys)
    )
