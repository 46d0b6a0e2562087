"""oneDNN-packed CPU forward (clipdedup.ingest.encode.cpu_forward) against the modules it replaces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipdedup.ingest.encode import cpu_forward
from clipdedup.ingest.encode.cpu_forward import (
    CPU_FORWARDS,
    PackedLinear,
    PackedSelfAttention,
    PackError,
    onednn_forward,
    pack_model,
    packable_attention,
)

pytestmark = pytest.mark.skipif(
    CPU_FORWARDS.entries["onednn"].unavailable_reason() is not None, reason="no oneDNN in this torch"
)

# fp32 with another summation order: relative to the output's scale.
TOL = 1e-5


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    scale = max(float(want.abs().max()), 1.0) if want.numel() else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= TOL * scale, (err, scale)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [0, 1, 63, 65, 1600])
@pytest.mark.parametrize(("fin", "fout"), [(1, 1), (37, 129), (768, 3072)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
def test_packed_linear_matches_linear(rows: int, fin: int, fout: int, bias: bool, gelu: bool) -> None:
    g = gen(rows * 1000 + fin)
    lin = nn.Linear(fin, fout, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(fout, fin, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(fout, generator=g))
    x = torch.randn(rows, fin, generator=g)
    want = F.gelu(lin(x)) if gelu else lin(x)
    packed = PackedLinear.of(lin, gelu=gelu)
    assert not hasattr(packed, "weight")  # direct readers must fail, not compute with blocked data
    with torch.inference_mode():
        assert_close(packed(x), want.detach())


def test_packed_linear_leading_dims_and_strided_input() -> None:
    g = gen(1)
    lin = nn.Linear(48, 20)
    x = torch.randn(3, 48, 7, generator=g).transpose(1, 2)  # (3, 7, 48), not contiguous
    with torch.inference_mode():
        assert_close(PackedLinear.of(lin)(x), lin(x))
        assert PackedLinear.of(lin)(torch.zeros(0, 5, 48)).shape == (0, 5, 20)


def mha(dim: int, heads: int, seed: int, bias: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(dim, heads, batch_first=True, bias=bias).eval()
    with torch.no_grad():  # nonzero biases (they start at zero)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize(
    ("b", "n", "dim", "heads"), [(1, 1, 8, 1), (2, 7, 24, 3), (3, 50, 64, 4), (1, 65, 36, 6)]
)
@pytest.mark.parametrize("mask", [None, "float2d", "bool2d", "float3d", "bool3d"])
def test_packed_attention_matches_multihead_attention(
    b: int, n: int, dim: int, heads: int, mask: str | None
) -> None:
    m = mha(dim, heads, seed=b * 100 + n)
    g = gen(n)
    x = torch.randn(b, n, dim, generator=g)
    attn_mask = None
    if mask is not None:
        shape = (n, n) if mask.endswith("2d") else (b * heads, n, n)
        if mask.startswith("bool"):
            attn_mask = torch.rand(*shape, generator=g) < 0.3
            attn_mask[..., 0] = False  # every query may attend somewhere (no all-masked rows)
        else:
            attn_mask = torch.randn(*shape, generator=g)
    with torch.inference_mode():
        want = m(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        got, weights = PackedSelfAttention(m)(x, x, x, need_weights=False, attn_mask=attn_mask)
    assert weights is None
    assert_close(got, want)


def test_packed_attention_without_bias() -> None:
    m = mha(32, 4, seed=3, bias=False)
    x = torch.randn(2, 9, 32, generator=gen(3))
    with torch.inference_mode():
        assert_close(
            PackedSelfAttention(m)(x, x, x, need_weights=False)[0], m(x, x, x, need_weights=False)[0]
        )


def test_packed_attention_refuses_other_calls() -> None:
    m = PackedSelfAttention(mha(16, 2, seed=0))
    x = torch.randn(2, 5, 16)
    y = torch.randn(2, 5, 16)
    with torch.inference_mode():
        with pytest.raises(PackError):
            m(x, y, y, need_weights=False)  # cross-attention
        with pytest.raises(PackError):
            m(x, x, x)  # need_weights defaults to True
        with pytest.raises(PackError):
            m(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))


def test_packable_attention_only_what_it_computes() -> None:
    assert packable_attention(nn.MultiheadAttention(16, 2, batch_first=True))
    assert not packable_attention(nn.MultiheadAttention(16, 2))  # sequence-first
    assert not packable_attention(nn.MultiheadAttention(16, 2, batch_first=True, kdim=8, vdim=8))
    assert not packable_attention(nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True))


class Mixed(nn.Module):
    """A sequence-first attention (left whole, out_proj included), an open_clip MLP, plain layers."""

    def __init__(self) -> None:
        super().__init__()
        self.seq_first = nn.MultiheadAttention(16, 2)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(16, 64))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(64, 16))
        self.quick = nn.Sequential(nn.Linear(16, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, 16)
        s = x.transpose(0, 1)
        x = x + self.seq_first(s, s, s, need_weights=False)[0].transpose(0, 1)
        return self.quick(x + self.mlp(x))


def test_pack_model_skips_what_it_cannot_compute_and_keeps_output() -> None:
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(3, 11, 16)
    with torch.inference_mode():
        want = model(x)
    assert pack_model(model) == 4  # c_fc (+gelu), c_proj, the two plain layers
    assert type(model.seq_first) is nn.MultiheadAttention
    assert type(model.seq_first.out_proj) is not PackedLinear
    assert isinstance(model.mlp.gelu, nn.Identity)  # fused into c_fc
    assert isinstance(model.quick[1], nn.GELU)  # tanh GELU: not fused
    with torch.inference_mode():
        assert_close(model(x), want)


class ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fc.weight, self.fc.bias)  # bypasses the module


def test_onednn_forward_raises_when_the_model_reads_weights_directly() -> None:
    with pytest.raises(PackError):
        onednn_forward(ReadsWeight().eval(), torch.randn(2, 8))


def test_onednn_forward_leaves_other_dtypes_alone() -> None:
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16).eval()
    assert onednn_forward(model, torch.randn(2, 8).to(torch.bfloat16)) is model
    assert type(model[0]) is nn.Linear


def test_pack_model_detects_a_wrong_replacement(monkeypatch: pytest.MonkeyPatch) -> None:
    real = PackedLinear.forward
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: real(self, x) * 1.001)
    with pytest.raises(PackError, match="differs"):
        pack_model(nn.Sequential(nn.Linear(8, 8)).eval())


@pytest.mark.parametrize("batch", [1, 3, 33])
def test_open_clip_visual_packed_matches_eager(tiny_model: str, batch: int) -> None:
    import open_clip

    from clipdedup.ingest.encode.open_clip import _resolve_open_clip

    name, pretrained = _resolve_open_clip(tiny_model)
    eager = open_clip.create_model_from_pretrained(name, pretrained=pretrained, return_transform=False)
    visual = eager.visual.eval()
    x = torch.randn(batch, 3, 64, 64, generator=gen(batch))
    with torch.inference_mode():
        want = visual(x)
    packed = onednn_forward(visual, torch.randn(1, 3, 64, 64))
    assert type(packed.transformer.resblocks[0].attn) is PackedSelfAttention
    with torch.inference_mode():
        assert_close(packed(x), want)


@pytest.mark.parametrize(
    "arch",
    [
        "vit_tiny_patch16_224",
        "vit_pe_core_tiny_patch16_384",  # the default model's family (rope attention, attention pool)
    ],
)
def test_timm_vit_packed_matches_eager(arch: str) -> None:
    timm = pytest.importorskip("timm")
    if arch not in timm.list_models(arch):
        pytest.skip(f"timm {timm.__version__} has no {arch}")
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, img_size=64, num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64, generator=gen(2))
    with torch.inference_mode():
        want = model(x)
    assert pack_model(model) > 0
    with torch.inference_mode():
        assert_close(model(x), want)


def encode(model_id: str, items: list[np.ndarray], forward: str, monkeypatch: pytest.MonkeyPatch, log=None):
    from clipdedup.ingest.encode.base import load_encoder

    monkeypatch.setenv("CLIPDEDUP_CPU_FORWARD", forward)
    enc = load_encoder(model_id, device="cpu", dtype="fp32", log=log)
    return enc, enc.encode_batch(items)


def test_encoder_onednn_matches_eager_on_real_images(
    tiny_model: str, testdata: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from clipdedup.ingest.prep import prepare_pil

    paths = sorted(testdata.rglob("*.jpg"))[:6]
    eager_enc, _ = encode(tiny_model, [np.zeros((64, 64, 3), np.uint8)], "eager", monkeypatch)
    items = []
    for p in paths:
        try:
            with Image.open(p) as im:
                items.append(prepare_pil(im.convert("RGB"), spec=eager_enc.spec))
        except OSError:
            continue  # the corrupt ones
    assert len(items) >= 3
    want = eager_enc.encode_batch(items)
    packed_enc, got = encode(tiny_model, items, "onednn", monkeypatch)
    assert any(isinstance(m, PackedLinear) for m in packed_enc.runner.forward.modules())
    assert not any(isinstance(m, PackedLinear) for m in eager_enc.runner.forward.modules())
    assert np.abs(got - want).max() <= 1e-5


def test_encoder_falls_back_to_eager_with_one_log_line(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(model: nn.Module, seed: int = 0) -> int:
        model.transformer.resblocks[0].mlp.c_fc = nn.Identity()  # a half-packed, wrong model
        raise PackError("simulated")

    monkeypatch.setattr(cpu_forward, "pack_model", broken)
    lines: list[str] = []
    item = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    enc, got = encode(tiny_model, [item], "onednn", monkeypatch, log=lines.append)
    assert len(lines) == 1 and "simulated" in lines[0] and "as loaded" in lines[0]
    assert isinstance(enc.runner.forward.transformer.resblocks[0].mlp.c_fc, nn.Linear)  # reloaded whole
    _, want = encode(tiny_model, [item], "eager", monkeypatch)
    assert np.abs(got - want).max() <= 1e-6


def test_unknown_cpu_forward_is_a_model_error(tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdedup.errors import ModelError
    from clipdedup.ingest.encode.base import load_encoder

    monkeypatch.setenv("CLIPDEDUP_CPU_FORWARD", "nonesuch")
    with pytest.raises(ModelError, match="cpu forward"):
        load_encoder(tiny_model, device="cpu")


def test_backends_lists_the_cpu_forwards(capsys: pytest.CaptureFixture[str]) -> None:
    from clipdedup.cli import dedup_cmd, run_cli

    assert run_cli(dedup_cmd, "clip-image-deduper", ["backends"]) == 0
    out = capsys.readouterr().out
    assert "cpu forwards:" in out
    assert "onednn" in out and "eager" in out


def tiny_visual(tiny_model: str):
    import open_clip

    from clipdedup.ingest.encode.open_clip import _resolve_open_clip

    name, pretrained = _resolve_open_clip(tiny_model)
    model = open_clip.create_model_from_pretrained(name, pretrained=pretrained, return_transform=False)
    return model.visual.eval()


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_class_token_block_only_where_the_class_token_is_all_that_is_read(tiny_model: str, pool: str) -> None:
    visual = tiny_visual(tiny_model)
    visual.pool_type = pool
    x = torch.randn(5, 3, 64, 64, generator=gen(5))
    with torch.inference_mode():
        want = visual(x)
    onednn_forward(visual, torch.randn(1, 3, 64, 64))
    last = visual.transformer.resblocks[-1]
    assert (type(last) is cpu_forward.ClassTokenBlock) == (pool == "tok")
    with torch.inference_mode():
        assert_close(visual(x), want)


def test_class_token_block_not_used_when_tokens_are_returned(tiny_model: str) -> None:
    visual = tiny_visual(tiny_model)
    visual.output_tokens = True
    x = torch.randn(2, 3, 64, 64, generator=gen(2))
    with torch.inference_mode():
        want_pooled, want_tokens = visual(x)
    onednn_forward(visual, torch.randn(1, 3, 64, 64))
    assert type(visual.transformer.resblocks[-1]) is not cpu_forward.ClassTokenBlock
    with torch.inference_mode():
        pooled, tokens = visual(x)
    assert_close(pooled, want_pooled)
    assert_close(tokens, want_tokens)


@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("mask", [None, "bool2d", "float3d"])
def test_attend_first_queries_matches_full_attention(queries: int, mask: str | None) -> None:
    m = mha(24, 3, seed=7)
    x = torch.randn(2, 9, 24, generator=gen(9))
    attn_mask = None
    if mask == "bool2d":
        attn_mask = torch.rand(9, 9, generator=gen(1)) < 0.3
        attn_mask[:, 0] = False
    elif mask == "float3d":
        attn_mask = torch.randn(2 * 3, 9, 9, generator=gen(1))
    with torch.inference_mode():
        want = m(x, x, x, need_weights=False, attn_mask=attn_mask)[0][:, :queries]
        got = PackedSelfAttention(m).attend(x, attn_mask, queries)
    assert_close(got, want)


def test_default_cpu_forward_is_onednn_else_eager(tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdedup.ingest.encode.base import load_encoder

    monkeypatch.delenv("CLIPDEDUP_CPU_FORWARD", raising=False)
    enc = load_encoder(tiny_model, device="cpu", dtype="fp32")
    assert any(isinstance(m, PackedLinear) for m in enc.runner.forward.modules())
    monkeypatch.setattr(CPU_FORWARDS.entries["onednn"], "why_not", lambda: "no oneDNN (simulated)")
    enc = load_encoder(tiny_model, device="cpu", dtype="fp32")
    assert not any(isinstance(m, PackedLinear) for m in enc.runner.forward.modules())


def test_onednn_only_on_x86_64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLIPDEDUP_CPU_FORWARD", raising=False)
    monkeypatch.setattr(cpu_forward.platform, "machine", lambda: "arm64")
    assert "x86-64" in (CPU_FORWARDS.entries["onednn"].unavailable_reason() or "")
    assert CPU_FORWARDS.get().name == "eager"
