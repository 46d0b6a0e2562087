"""Fixtures of the matching tests: a CPU backend usable on this CPU (see helpers.use_backend)."""

from __future__ import annotations

import pytest

from helpers import use_backend


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The backend named by `@pytest.mark.parametrize("backend", [...], indirect=True)`, made usable
    here (cpu-bf16 on a CPU without fast bfloat16) or the test skipped with the registry's reason."""
    return use_backend(monkeypatch, request.param)
