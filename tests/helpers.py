"""Helpers shared by several test modules."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from clipdedup.cli import run_cli
from clipdedup.trash import journal as jm


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """rel path -> sha256 of every file under root; a trash dir's journal and lock dir left out."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            rel = p.relative_to(root).as_posix()
            if not rel.startswith(jm.META_DIR + "/"):
                out[rel] = sha(p)
    return out


def run_cli_json(cmd, args: list[str], capsys) -> dict:
    """Runs a click command in-process with --json -q; returns the parsed summary (exit code 0)."""
    capsys.readouterr()
    code = run_cli(cmd, "test", args + ["--json", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def open_clip_transform(spec):
    """open_clip's own eval transform for a PrepSpec: the reference of our preprocessing."""
    import open_clip

    return open_clip.image_transform(
        spec.size,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        resize_mode=spec.resize_mode,
        interpolation=spec.interpolation,
        fill_color=spec.fill,
    )
