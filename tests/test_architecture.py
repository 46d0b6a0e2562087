"""The package's shape: no import cycles inside clipdedup, registrations that do not depend on
import order, and modules of a readable size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "clipdedup"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the clipdedup modules it imports anywhere in its body (lazy imports included).
    `from a import b` counts as importing `a.b` when that is a module, else `a`; importing a
    submodule does not count as importing its package's __init__ (Python runs it, but a plugin
    importing its base module through the package is the registry pattern, not a cycle)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    compiled = (PKG.parent / sub.replace(".", "/")).with_suffix(".pyi").is_file()
                    targets.append(sub if sub in mods or compiled else base)
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("stage", ["report", "trash", "match", "db", "ingest", "scan"])
def test_stages_do_not_reach_back_up_the_chain(stage: str) -> None:
    """Only `pipeline` and `cli` wire whole runs; no stage imports them."""
    graph = import_graph()
    bad = {
        (m, t)
        for m, ts in graph.items()
        if m == f"clipdedup.{stage}" or m.startswith(f"clipdedup.{stage}.")
        for t in ts
        if t in ("clipdedup.pipeline", "clipdedup.calibrate") or t.startswith("clipdedup.cli")
    }
    assert not bad


def test_modules_are_of_a_readable_size() -> None:
    long = {
        str(p.relative_to(PKG)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_registrations_do_not_depend_on_what_was_imported_first() -> None:
    """Importing any one module first yields the same registries as importing the package."""
    probe = (
        "import importlib, sys; importlib.import_module(sys.argv[1]);"
        "from clipdedup.ingest.decode.base import DECODERS;"
        "from clipdedup.ingest.encode.base import ENCODERS;"
        "from clipdedup.match.core import MATCHERS; from clipdedup.trash.keep import STRATEGIES;"
        "print([sorted(r.entries) for r in (DECODERS, ENCODERS, MATCHERS, STRATEGIES)])"
    )
    firsts = [
        "clipdedup",
        "clipdedup.ingest.decode.base",
        "clipdedup.ingest.encode.base",
        "clipdedup.match.core",
        "clipdedup.ingest.encode.dct",
        "clipdedup.ingest.decode.dali",
        "clipdedup.report.core",
    ]
    seen = {
        first: subprocess.run(
            [sys.executable, "-c", probe, first], capture_output=True, text=True, check=True
        ).stdout
        for first in firsts
    }
    assert len(set(seen.values())) == 1, seen
