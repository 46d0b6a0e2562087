"""How the image model runs on the CPU: as loaded ("eager"), or with oneDNN-packed fp32 linear layers.

PyTorch's fp32 `nn.Linear` on the CPU goes to MKL's sgemm; on the dev machine (AMD Zen 4, 2 cores)
that gives ~155 GFLOP/s on a ViT-B-32 MLP shape, while oneDNN with its weights reordered once into
its blocked layout ("packed") gives ~210, and the whole ViT-B-32 forward pass runs ~1.3x faster
(bench/bench_encode.py). Linear layers are ~90% of a ViT's time, so this is where fp32 inference on
CPU goes faster without giving up fp32.

`CPU_FORWARDS` (override `CLIPDEDUP_CPU_FORWARD`): "onednn" packs, "eager" is the reference and the
fallback. Packing swaps, in place:
- `nn.Linear` -> `PackedLinear` (open_clip's `c_fc` + exact `nn.GELU` -> one linear with GELU fused);
- `nn.MultiheadAttention` (batch_first self-attention) -> `PackedSelfAttention`: the packed in/out
  projections around `scaled_dot_product_attention`, what the module computes in eval mode;
- the last block of an open_clip ViT that pools its class token -> `ClassTokenBlock` (that token only).
Every replacement is checked against the module it replaces on a random input before the original
is dropped, and the packed model's output against the eager model's; any difference beyond fp32
rounding raises `PackError` and the caller reloads the model unpacked (one log line).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipdedup.registry import Registry

# A replacement may differ from its original by fp32 summation order, nothing more.
RTOL = 1e-4


class PackError(RuntimeError):
    """Packing a model failed or changed its output; the model must be used unpacked."""


def _why_no_onednn() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        # Measured on x86-64 only; elsewhere torch's own linear layers (e.g. Accelerate on Apple
        # silicon) may well be faster.
        return f"measured on x86-64 only, not on {platform.machine()}"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    for op in ("_reorder_linear_weight", "_linear_pointwise"):
        if not hasattr(torch.ops.mkldnn, op):
            return f"torch.ops.mkldnn.{op} is missing in torch {torch.__version__}"
    return None


class PackedLinear(nn.Module):
    """`nn.Linear` (optionally followed by exact GELU) with its weight in oneDNN's blocked layout.

    Deliberately has no `weight` / `bias` attributes: code that reads them directly (instead of
    calling the module) fails loudly and the model falls back to eager, rather than computing with a
    blocked tensor.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> None:
        """weight: (out_features, in_features) float32; bias: (out_features,) or None."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Plain attributes, not buffers: `.to()`, `state_dict()` and copies have no use for a blocked
        # oneDNN tensor.
        self._w = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self._b = None if bias is None else bias.detach().clone()
        self._attr, self._algo = ("gelu", "none") if gelu else ("none", "")

    @classmethod
    def of(cls, linear: nn.Linear, gelu: bool = False) -> PackedLinear:
        return cls(linear.weight, linear.bias, gelu)

    def extra_repr(self) -> str:
        gelu = ", gelu fused" if self._attr == "gelu" else ""
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, bias={self._b is not None}{gelu}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) float32 -> (..., out_features) float32."""
        lead = x.shape[:-1]
        if x.numel() == 0:
            return x.new_zeros(*lead, self.out_features)
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features), self._w, self._b, self._attr, [], self._algo
        )
        return y.reshape(*lead, self.out_features)


def packable_attention(m: nn.Module) -> bool:
    """Whether `m` is an `nn.MultiheadAttention` that `PackedSelfAttention` computes exactly."""
    return (
        type(m) is nn.MultiheadAttention
        and m.batch_first
        and m._qkv_same_embed_dim
        and m.bias_k is None
        and not m.add_zero_attn
        and m.in_proj_weight is not None
    )


class PackedSelfAttention(nn.Module):
    """Eval-mode `nn.MultiheadAttention(batch_first=True)` self-attention with packed projections.

    Supports the calls vision towers make: query, key and value the same tensor, no key padding
    mask, no attention weights returned, an optional 2-D (L, L) or 3-D (B * heads, L, L) float or
    bool mask (bool True = not allowed, as in `nn.MultiheadAttention`). Anything else raises
    `PackError`.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.heads, self.dim = mha.num_heads, mha.embed_dim
        self.qkv = PackedLinear(mha.in_proj_weight, mha.in_proj_bias)
        self.out = PackedLinear.of(mha.out_proj)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query or query.dim() != 3:
            raise PackError("packed attention computes batched self-attention only")
        if key_padding_mask is not None or need_weights or is_causal:
            raise PackError("packed attention: no key padding mask, attention weights or is_causal")
        return self.attend(query, attn_mask, query.shape[1]), None

    def attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None, queries: int) -> torch.Tensor:
        """x: (B, L, E) -> (B, queries, E): the outputs of the first `queries` positions only (all
        L positions are keys and values)."""
        b, n, e = x.shape
        h = self.heads
        qkv = self.qkv(x).view(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4)  # [3, B, h, L, e/h]
        mask = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # True = not allowed; SDPA's bool masks mean the opposite
                zeros = torch.zeros_like(attn_mask, dtype=x.dtype)
                attn_mask = zeros.masked_fill(attn_mask, float("-inf"))
            mask = attn_mask.view(b, h, n, n) if attn_mask.dim() == 3 else attn_mask
            mask = mask[..., :queries, :]
        q = qkv[0][:, :, :queries]
        o = F.scaled_dot_product_attention(q, qkv[1], qkv[2], attn_mask=mask)  # [B, h, queries, e/h]
        return self.out(o.transpose(1, 2).reshape(b, queries, e))


class ClassTokenBlock(nn.Module):
    """open_clip's last `ResidualAttentionBlock` of a tower that keeps only the class token.

    Such a tower (`pool_type='tok'`, no attention pooling, no token outputs) reads position 0 of the
    last block's output and nothing else, so that block computes the attention query, projection
    and MLP for position 0 alone (keys and values still from every position) and returns (B, 1, E):
    ~70% of the last block's work, ~6% of ViT-B-32's, skipped with the same result.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise PackError("class-token block: self-attention only")
        b: Any = self.block  # open_clip's ResidualAttentionBlock with a PackedSelfAttention
        x = q_x[:, :1] + b.ls_1(b.attn.attend(b.ln_1(q_x), attn_mask, 1))
        return x + b.ls_2(b.mlp(b.ln_2(x)))


def class_token_only(visual: nn.Module) -> bool:
    """Makes the last block of an open_clip VisionTransformer that pools its class token compute
    that token only (`ClassTokenBlock`); False when `visual` is not such a tower."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if type(visual) is not VisionTransformer:
        return False
    transformer: Any = visual.transformer
    blocks = transformer.resblocks
    if (
        visual.attn_pool is not None
        or visual.pool_type != "tok"
        or visual.output_tokens
        or not transformer.batch_first
        or len(blocks) == 0
        or type(blocks[-1]) is not ResidualAttentionBlock
        or type(blocks[-1].attn) is not PackedSelfAttention
    ):
        return False
    blocks[-1] = ClassTokenBlock(blocks[-1])
    return True


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    if want.numel() == 0:
        return True
    scale = max(float(want.abs().max()), 1.0)
    return bool(torch.isfinite(got).all()) and float((got - want).abs().max()) <= RTOL * scale


def _tensors(out: object) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or tuples / lists of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.shape != want.shape or not _close(got, want):
        raise PackError(f"packed {what} differs from the original")


def pack_model(model: nn.Module, seed: int = 0) -> int:
    """Swaps `model`'s fp32 linear layers and self-attention for packed ones, in place.

    Args:
        model: an eval-mode float32 module on the CPU.
        seed: for the random inputs each replacement is checked on.
    Returns:
        how many modules were replaced. Raises PackError (the model is then half-packed: reload it).
    """
    gen = torch.Generator().manual_seed(seed)
    count = 0

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def visit(parent: nn.Module) -> None:
        nonlocal count
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                if packable_attention(child):  # else leave it whole: it reads its out_proj's weight
                    x = rand(2, 5, child.embed_dim)
                    attn = PackedSelfAttention(child)
                    _check(attn(x, x, x, need_weights=False)[0], child(x, x, x, need_weights=False)[0], name)
                    setattr(parent, name, attn)
                    count += 1
                continue
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                gelu = _fused_gelu(parent, name)
                x = rand(3, child.in_features)
                lin = PackedLinear.of(child, gelu=gelu)
                _check(lin(x), F.gelu(child(x)) if gelu else child(x), name)
                setattr(parent, name, lin)
                if gelu:
                    parent.gelu = nn.Identity()
                count += 1
                continue
            visit(child)

    with torch.inference_mode():
        try:
            visit(model)
        except PackError:
            raise
        except Exception as e:  # a oneDNN op refusing a shape or dtype: the model stays eager
            raise PackError(f"{type(e).__name__}: {e}") from None
    return count


def _fused_gelu(parent: nn.Module, name: str) -> bool:
    """open_clip's MLP: Sequential(c_fc, gelu, c_proj); fuse an exact GELU into c_fc."""
    gelu = getattr(parent, "gelu", None)
    return (
        name == "c_fc"
        and isinstance(parent, nn.Sequential)
        and type(gelu) is nn.GELU
        and gelu.approximate == "none"
        and list(parent._modules) == ["c_fc", "gelu", "c_proj"]
    )


CPU_FORWARDS: Registry[Callable[..., nn.Module]] = Registry("cpu forward", env_var="CLIPDEDUP_CPU_FORWARD")


@CPU_FORWARDS.register(
    "onednn", priority=10, why_not=_why_no_onednn, doc="fp32 linear layers with oneDNN-packed weights"
)
def onednn_forward(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Packs `model` (fp32 only; other dtypes are returned as they are) and checks its output on
    `example` against the eager output. Raises PackError; the model must then be reloaded."""
    if example.dtype != torch.float32:
        return model
    with torch.inference_mode():
        want = model(example)
        if pack_model(model) == 0:
            return model
        class_token_only(model)
        try:
            got = model(example)
        except PackError:
            raise
        except Exception as e:
            raise PackError(f"packed model failed: {type(e).__name__}: {e}") from None
    gots, wants = _tensors(got), _tensors(want)
    if len(gots) != len(wants):
        raise PackError("packed model returns other outputs than the eager model")
    for g, w in zip(gots, wants):
        _check(g, w, "model")
    return model


@CPU_FORWARDS.register("eager", priority=0, doc="the model as open_clip loads it (the reference)")
def eager_forward(model: nn.Module, example: torch.Tensor) -> nn.Module:
    return model
