"""Shared fixtures: a tiny open_clip model with random weights, the real test images, markers."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from testdata import materialize

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub from the test suite

# The real test images, laid out once per session from tests/data (copies made, see testdata.py).
_TESTDATA_ROOT = Path(tempfile.mkdtemp(prefix="clipdedup-testdata-"))
atexit.register(shutil.rmtree, _TESTDATA_ROOT, True)
TESTDATA = materialize(_TESTDATA_ROOT / "imagededup")

TINY_CFG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {
        "size": 64,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_slow = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("slow") and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    """Writes an open_clip config and random weights to `path`; returns it. Load: local-dir:<path>."""
    import torch
    from open_clip.model import CLIP

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIP(**TINY_CFG["model_cfg"])
    (path / "open_clip_config.json").write_text(json.dumps(TINY_CFG))
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Model id of a tiny random-weight open_clip model (not a real model: its distances mean nothing)."""
    return "local-dir:" + str(make_tiny_model(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The matching backend named by `@pytest.mark.parametrize("backend", [...], indirect=True)`,
    made usable here (cpu-bf16 without fast bfloat16, cpu-int16 without AVX2: see
    helpers.use_backend) or the test skipped with the registry's reason."""
    from helpers import use_backend

    return use_backend(monkeypatch, request.param)


@pytest.fixture(scope="session")
def testdata() -> Path:
    return TESTDATA


@pytest.fixture
def pics(tmp_path: Path, testdata: Path) -> Path:
    """A writable copy of the real test images."""
    dst = tmp_path / "pics"
    shutil.copytree(testdata, dst, ignore=shutil.ignore_patterns("*.json", "*.md"))
    for p in dst.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return dst
