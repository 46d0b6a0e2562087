"""The open_clip encoder: resolves `hf-hub:`, `local-dir:`, `ARCH/TAG` and `ARCH/path` model ids
(cached hub files are used without the network), loads the visual tower in the requested dtype,
prepares it with the best CPU forward on CPU, and wraps it in a `BatchRunner`."""

from __future__ import annotations

import functools
import os
import socket
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from clipdedup.errors import ModelError
from clipdedup.ingest.encode.base import (
    DTYPES,
    ENCODERS,
    OFFLINE_HINT,
    Encoder,
    EncoderFactory,
    canonical_model_id,
)
from clipdedup.ingest.prep import PrepSpec, prepare_pil

# NHWC input on CPU: no gain for ViT in bench/bench_encode.py (only the patch embedding is a conv).
CPU_CHANNELS_LAST = False


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None if the Hugging Face endpoint accepts a TCP connection, else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host} unreachable ({e.strerror or e})"


def _cached_hub_dir(repo_id: str) -> str | None:
    """The local snapshot dir of an open_clip hub model whose config and weights are cached."""
    from huggingface_hub import try_to_load_from_cache

    cfg = try_to_load_from_cache(repo_id, "open_clip_config.json")
    if not isinstance(cfg, str):
        return None
    d = os.path.dirname(cfg)
    names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    for n in names:
        if isinstance(try_to_load_from_cache(repo_id, n), str):
            return d
    return None


def _resolve_open_clip(model_id: str) -> tuple[str, str | None]:
    """(model_name, pretrained) for open_clip, with cached hub files used without the network."""
    if model_id.startswith("local-dir:"):
        path = os.path.expanduser(model_id[len("local-dir:") :])
        if not os.path.isfile(os.path.join(path, "open_clip_config.json")):
            raise ModelError(f"{model_id}: no open_clip_config.json in {path}")
        return "local-dir:" + path, None
    if model_id.startswith("hf-hub:"):
        repo = model_id[len("hf-hub:") :]
        cached = _cached_hub_dir(repo)
        if cached:
            return "local-dir:" + cached, None
        why = _hub_reachable()
        if why:
            raise ModelError(
                f"model {model_id} is not in the local Hugging Face cache and cannot be "
                f"downloaded ({why}); run `huggingface-cli download {repo}` where there is "
                f"network, or pass -m local-dir:/path/with/open_clip_config.json; {OFFLINE_HINT}"
            )
        return model_id, None
    arch, _, tag = model_id.partition("/")
    if not tag:
        raise ModelError(
            f"model {model_id!r} has no weights: use ARCH/TAG (e.g. ViT-B-32/laion2b_s34b_b79k), "
            "ARCH/path/to/checkpoint, hf-hub:org/name or local-dir:/path"
        )
    if os.path.isfile(tag):
        return arch, tag
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ModelError(f"model {model_id!r}: unknown architecture or pretrained tag")
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        parts = hub.strip("/").split("/")
        repo = "/".join(parts[:2])
        for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, fname)
            if isinstance(hit, str):
                return arch, hit
    why = _hub_reachable()
    if why:
        raise ModelError(
            f"model {model_id} is not in the local cache and cannot be downloaded ({why}); "
            f"download its weights where there is network and pass ARCH/path/to/checkpoint; {OFFLINE_HINT}"
        )
    return arch, tag


def load_open_clip(
    model_id: str,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    batch_size: int = 32,
    log: Callable[[str], None] | None = None,
) -> Encoder:
    import open_clip
    import torch

    from clipdedup.ingest.encode.batch_runner import BatchRunner

    name, pretrained = _resolve_open_clip(model_id)
    # fp32 stays the CPU default: bf16 is 1.7-2.1x faster on CPUs with native bf16 (AVX512-BF16,
    # AMX; bench/bench_encode.py) but moves distances by ~0.01, a tenth of the CLIP threshold.
    dtype = dtype or os.environ.get("CLIPDEDUP_DTYPE") or ("fp16" if device.startswith("cuda") else "fp32")
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} (argument or CLIPDEDUP_DTYPE): choose from {', '.join(DTYPES)}")
    tdtype = getattr(torch, DTYPES[dtype])
    model = _create(model_id, name, pretrained, device)
    visual = model.visual.to(dtype=tdtype)
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    spec = PrepSpec.from_open_clip(cfg)
    on_cpu = device == "cpu"
    if on_cpu:
        visual = _cpu_forward(visual, spec, tdtype, lambda: _create(model_id, name, pretrained, device), log)
    if on_cpu and CPU_CHANNELS_LAST:
        visual = visual.to(memory_format=torch.channels_last)
    runner = BatchRunner(
        visual,
        spec,
        batch_size=batch_size,
        device=device,
        dtype=tdtype,
        channels_last=on_cpu and CPU_CHANNELS_LAST,
        log=log,
        fp32=None if tdtype == torch.float32 else lambda: _create(model_id, name, pretrained, device).visual,
    )
    with torch.inference_mode():
        dim = int(visual(torch.zeros(1, 3, *spec.size, device=device, dtype=tdtype)).shape[-1])
    return Encoder(
        model_id=canonical_model_id(model_id),
        dim=dim,
        input_size=spec.min_side,
        prepare=functools.partial(prepare_pil, spec=spec),
        encode_batch=runner.encode,
        preprocess={k: _jsonable(v) for k, v in cfg.items()},
        device=device,
        spec=spec,
        submit=runner.submit,
        runner=runner,
    )


def _create(model_id: str, name: str, pretrained: str | None, device: str) -> Any:
    import open_clip

    try:
        model = open_clip.create_model_from_pretrained(
            name, pretrained=pretrained, device=device, return_transform=False
        )
    except ModelError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"model {model_id}: cannot load ({first})") from None
    return model.eval()


def _cpu_forward(visual: Any, spec: PrepSpec, dtype: Any, reload: Callable[[], Any], log: Any) -> Any:
    """The visual tower prepared by the best CPU forward (cpu_forward.CPU_FORWARDS); when packing
    fails its check, one log line and the tower reloaded as it was."""
    import torch

    from clipdedup.ingest.encode.cpu_forward import CPU_FORWARDS, PackError
    from clipdedup.registry import UnavailableError

    try:
        entry = CPU_FORWARDS.get()
    except UnavailableError as e:
        raise ModelError(str(e)) from None
    example = torch.randn(1, 3, *spec.size, generator=torch.Generator().manual_seed(0)).to(dtype)
    try:
        return entry.fn(visual, example)
    except PackError as e:
        (log or (lambda line: print(line, file=sys.stderr)))(
            f"clipdedup: cpu forward {entry.name!r} off ({e}); running the model as loaded"
        )
        return reload().visual.to(dtype=dtype)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


ENCODERS.add(
    "open_clip", EncoderFactory(load_open_clip), doc="open_clip model (hf-hub:, local-dir:, ARCH/TAG)"
)
