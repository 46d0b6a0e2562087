"""Model ids: local-dir, hf-hub (cached and not), ARCH/TAG; failures are fast one-line ModelErrors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipdedup.errors import ModelError
from clipdedup.ingest.encode.base import canonical_model_id, default_threshold, load_encoder
from clipdedup.ingest.encode.open_clip import _resolve_open_clip


def test_local_dir_loads_tiny_model(tiny_model: str) -> None:
    enc = load_encoder(tiny_model, device="cpu")
    assert enc.dim == 32 and enc.input_size == 64
    assert enc.model_id == canonical_model_id(tiny_model)
    assert enc.preprocess["size"] in (64, [64, 64])


def test_local_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no open_clip_config.json"):
        load_encoder(f"local-dir:{tmp_path}", device="cpu")


def test_uncached_hub_model_fails_fast_offline(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(ModelError) as e:
        load_encoder("hf-hub:timm/PE-Core-bigG-14-448", device="cpu")
    assert time.perf_counter() - t < 5  # no retry loop
    msg = str(e.value)
    assert "hf-hub:timm/PE-Core-bigG-14-448" in msg and "not in the local Hugging Face cache" in msg
    assert len(msg.splitlines()) == 1
    # A fresh machine without network: the message names the option that works offline.
    assert "-m builtin:dct works offline" in msg


def test_cached_hub_model_loads_without_network(monkeypatch, tmp_path: Path, tiny_model: str) -> None:
    import huggingface_hub.constants as c

    repo = tmp_path / "models--someorg--tiny"
    snap = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model[len("local-dir:") :], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_encoder("hf-hub:someorg/tiny", device="cpu")
    assert enc.dim == 32
    assert enc.model_id == "hf-hub:someorg/tiny"  # the DB records the hub id, not the cache path


def test_arch_without_weights_is_refused() -> None:
    with pytest.raises(ModelError, match="has no weights"):
        load_encoder("ViT-B-32", device="cpu")


def test_arch_with_unknown_tag_is_refused() -> None:
    with pytest.raises(ModelError, match="unknown architecture or pretrained tag"):
        load_encoder("ViT-B-32/no_such_tag", device="cpu")


def test_arch_with_checkpoint_file_resolves_to_the_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"")
    assert _resolve_open_clip(f"ViT-B-32/{ckpt}") == ("ViT-B-32", str(ckpt))
    assert canonical_model_id(f"ViT-B-32/{ckpt}") == f"ViT-B-32/{ckpt}"


def test_known_tag_not_cached_fails_fast_offline(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local cache") as e:
        load_encoder("ViT-B-32/laion2b_s34b_b79k", device="cpu")
    assert "-m builtin:dct works offline" in str(e.value)


def test_default_model_without_cuda_says_its_rate_once(monkeypatch, tmp_path: Path) -> None:
    """On a CPU the default model logs one line with its expected rate here and smaller choices
    (before it fails to load offline); other models and CUDA runs log nothing of the kind."""
    import huggingface_hub.constants as c

    from clipdedup.ingest.encode.base import DEFAULT_MODEL, cpu_rate_notice

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines: list[str] = []
    with pytest.raises(ModelError):
        load_encoder(DEFAULT_MODEL, device="cpu", log=lines.append)
    assert len(lines) == 1, lines
    cores = len(os.sched_getaffinity(0))
    assert f"on {cores} CPU cores" in lines[0] and "s per image" in lines[0]
    assert "-m ViT-B-32/laion2b_s34b_b79k" in lines[0] and "-m builtin:dct" in lines[0]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert "expect ~20 s per image on 2 CPU cores" in (cpu_rate_notice(DEFAULT_MODEL, "cpu") or "")
    assert cpu_rate_notice(DEFAULT_MODEL, "cuda") is None
    assert cpu_rate_notice("ViT-B-32/laion2b_s34b_b79k", "cpu") is None


def test_clip_default_threshold() -> None:
    assert default_threshold("hf-hub:timm/PE-Core-bigG-14-448") == 0.1
    assert default_threshold("ViT-B-32/laion2b_s34b_b79k") == 0.1


def test_cli_model_failure_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "pics" / "a.png")
    exe = Path(sys.executable).parent / "clip-image-deduper"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PATH": "/usr/bin:/bin"}
    t = time.perf_counter()
    r = subprocess.run(
        [str(exe), "-i", str(tmp_path / "pics"), "-d", str(tmp_path / "db"), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert time.perf_counter() - t < 60
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "PE-Core-bigG-14-448" in r.stderr and "huggingface-cli download" in r.stderr
