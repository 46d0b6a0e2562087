"""The CUDA-only branches of the batch runner, driven on CPU: batches mixing device tensors and
numpy arrays, graph capture once in `fit` with a stand-in `torch.cuda` (thread-local mode, fallback
when capture fails), and the float32 re-run of non-finite outputs down to the DB writer."""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdedup.ingest.encode.base import load_encoder
from clipdedup.ingest.encode.batch_runner import BatchRunner, capture_cuda_graph, capture_eager
from clipdedup.ingest.prep import PrepSpec
from clipdedup.ingest.update import update_db

SPEC = PrepSpec((8, 8))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))


def items(n: int, seed: int) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_mix_of_tensors_and_arrays(n: int) -> None:
    """Each item a numpy array (PIL) or a tensor (DALI 'mixed'), in every order, padded or full:
    the same embeddings as the all-numpy eager run."""
    m = model()
    ref = BatchRunner(m, SPEC, batch_size=4, fixed_shape=False)
    runner = BatchRunner(m, SPEC, batch_size=4, fixed_shape=True, capture=capture_eager)
    for seed, kinds in enumerate(itertools.product((np.ndarray, torch.Tensor), repeat=n)):
        batch = items(n, seed)
        want = ref.encode(batch)
        mixed = [torch.from_numpy(b) if k is torch.Tensor else b for b, k in zip(batch, kinds)]
        np.testing.assert_allclose(runner.submit(mixed).result(), want, atol=1e-6)
        np.testing.assert_allclose(ref.submit(mixed).result(), want, atol=1e-6)  # eager path too


class FakeGraph:
    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


class FakeCuda:
    """A recording stand-in for the parts of `torch.cuda` that capture uses."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail, self.graphs, self.modes, self.captured_inputs = fail, [], [], []
        self.active = "default"
        self.warmups_on: list[str] = []

    def Stream(self):  # noqa: N802 (torch.cuda.Stream)
        return self

    def current_stream(self):
        return self

    def wait_stream(self, other) -> None:
        pass

    @contextlib.contextmanager
    def stream(self, s):
        prev, self.active = self.active, "side"
        yield
        self.active = prev

    def CUDAGraph(self) -> FakeGraph:  # noqa: N802
        g = FakeGraph()
        self.graphs.append(g)
        return g

    @contextlib.contextmanager
    def graph(self, g: FakeGraph, capture_error_mode: str = "global"):
        self.modes.append(capture_error_mode)
        if self.fail is not None:
            raise self.fail
        self.active = "capture"
        yield
        self.active = "default"


def spy(fake: FakeCuda, m: torch.nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if fake.active == "side":
            fake.warmups_on.append("side")
        if fake.active == "capture":
            fake.captured_inputs.append(x.detach().clone())
        return m(x)

    return forward


def test_graph_captured_once_in_fit_thread_local() -> None:
    fake = FakeCuda()
    m = model()
    capture = functools.partial(capture_cuda_graph, cuda=fake)
    runner = BatchRunner(spy(fake, m), SPEC, batch_size=4, fixed_shape=True, capture=capture)
    runner.fit(4)
    assert runner.mode == "graph" and len(fake.graphs) == 1 and fake.modes == ["thread_local"]
    assert fake.warmups_on == ["side"] * 3
    (x,) = fake.captured_inputs
    shift = torch.tensor([-a / b for a, b in zip(SPEC.mean, SPEC.std)]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, shift.expand_as(x))  # captured on the zero batch
    for seed in range(3):
        runner.submit(items(3, seed)).result()
    runner.submit(items(6, 9)).result()  # larger than the fitted shape: eager, no new capture
    runner.fit(4)  # same shape: nothing rebuilt
    assert len(fake.graphs) == 1 and fake.graphs[0].replays == 3


def test_capture_failure_in_fit_runs_eagerly_with_one_line() -> None:
    fake = FakeCuda(fail=RuntimeError("operation not permitted when stream is capturing\ndetail"))
    m = model()
    lines: list[str] = []
    capture = functools.partial(capture_cuda_graph, cuda=fake)
    runner = BatchRunner(m, SPEC, batch_size=4, fixed_shape=True, capture=capture, log=lines.append)
    runner.fit(4)
    runner.fit(2)  # a new shape: no second attempt
    want = BatchRunner(m, SPEC, batch_size=4, fixed_shape=False).encode(items(7, 1))
    np.testing.assert_allclose(runner.encode(items(7, 1)), want, atol=1e-6)
    assert runner.mode == "fixed eager" and fake.modes == ["thread_local"]
    assert len(lines) == 1 and "capture failed" in lines[0] and "detail" not in lines[0]


class Overflowing(torch.nn.Module):
    """A 'float16' model: infinite rows for images whose first pixel is odd."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x.float())
        odd = x[:, 0, 0, 0].float() > 0
        return torch.where(odd[:, None], torch.full_like(out, float("inf")), out)


@pytest.mark.parametrize("fixed", [False, True])
def test_non_finite_rows_rerun_in_float32_once_said(fixed: bool) -> None:
    m = model()
    lines: list[str] = []
    made: list[int] = []

    def fp32():
        made.append(1)
        return m

    kw = dict(batch_size=4, fixed_shape=fixed, capture=capture_eager, log=lines.append)
    runner = BatchRunner(Overflowing(m), SPEC, dtype=torch.float16, fp32=fp32, **kw)
    batch = items(9, 3)
    for k, b in enumerate(batch):
        b[0, 0] = 255 if k % 2 == 0 else 0  # above the mean: the normalised first value is > 0
    want = BatchRunner(m, SPEC, batch_size=4, fixed_shape=False).encode(batch)
    got = runner.encode(batch)
    np.testing.assert_allclose(got, want, atol=1e-2)  # float16 input to the re-run's float32 model
    assert runner.reruns == 5 and made == [1]
    assert len(lines) == 1 and "float16" in lines[0] and "float32" in lines[0]
    runner.encode(batch)
    assert len(lines) == 1 and made == [1]
    plain = BatchRunner(Overflowing(m), SPEC, dtype=torch.float16, **kw)  # nothing to re-run with
    got = plain.encode(batch)
    assert np.isnan(got[::2]).all() and np.isfinite(got[1::2]).all()


def test_update_captures_before_decoders_and_never_writes_non_finite(
    tiny_model: str, pics: Path, tmp_path: Path
) -> None:
    """update_db: the graph is captured (fit) before any decoder thread exists; with a model whose
    every output overflows and an fp32 model that is no better, no vector is written and every
    image is a failure with its reason."""
    enc = load_encoder(tiny_model, device="cpu")
    seen: list[list[str]] = []

    def capture(step, static):
        seen.append([t.name for t in threading.enumerate() if t.name.startswith("clipdedup")])
        return capture_eager(step, static)

    inf = lambda x: torch.full((x.shape[0], enc.dim), float("inf"))  # noqa: E731
    lines: list[str] = []
    runner = BatchRunner(
        inf, enc.spec, batch_size=4, fixed_shape=True, capture=capture, dtype=torch.float16,
        fp32=lambda: inf, log=lines.append,
    )  # fmt: skip
    enc.runner, enc.submit, enc.encode_batch = runner, runner.submit, runner.encode
    s = update_db(pics, tmp_path / "db", encoder=enc, batch_size=4, log=lines.append)
    assert seen == [[]]
    assert s.encoded == 0 and sum("not finite" in why for _, why in s.failed) >= 20
    assert not list((tmp_path / "db").rglob("*.npy"))
    assert sum("re-running" in line for line in lines) == 1
