"""tests/mutations.py's own rules, without running any mutant (CI runs it whole): every mutation
still applies to today's sources (so a refactor that moves a target shows up here at once), and
an edit whose text is missing or ambiguous is refused rather than silently skipped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mutations as mu  # noqa: E402


@pytest.mark.parametrize("m", mu.MUTATIONS, ids=lambda m: m.name)
def test_mutation_applies_and_names_existing_tests(m: mu.Mutation) -> None:
    clean = (mu.PACKAGE / m.file).read_text()
    mutated, why = mu.apply(clean, m)
    assert mutated is not None, why
    assert mutated != clean
    for node in m.tests:
        path, _, func = node.partition("::")
        assert (mu.REPO / path).is_file(), node
        assert not func or f"def {func}(" in (mu.REPO / path).read_text(), node


def test_names_are_unique_and_there_are_enough() -> None:
    names = [m.name for m in mu.MUTATIONS]
    assert len(set(names)) == len(names) >= 10


def test_an_edit_must_match_exactly_once() -> None:
    m = mu.Mutation("x", "", "f.py", (("a = 1\n", "a = 2\n"),), ())
    assert mu.apply("a = 1\n", m) == ("a = 2\n", "")
    for text in ("b = 1\n", "a = 1\na = 1\n"):
        got, why = mu.apply(text, m)
        assert got is None and "must be once" in why
    two = mu.Mutation("y", "", "f.py", (("a = 1\n", "a = 2\n"), ("a = 2\n", "a = 3\n")), ())
    assert mu.apply("a = 1\n", two) == ("a = 3\n", "")  # edits apply in order
