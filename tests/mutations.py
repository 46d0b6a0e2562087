"""Mutation check of the guarantees: each mutation breaks one promise in a copy of the package, and
the tests that guard that promise must fail. Not collected by pytest (no test_ prefix).

    python tests/mutations.py            # all; prints a table, exit 1 if any mutation survives
    python tests/mutations.py --list     # the mutations and the lines they target
    python tests/mutations.py --only drop-ctime-check,skip-exact-recheck

How: python/clipdedup is copied to a temporary directory (with the compiled `_native` module, taken
from the checkout or, where the checkout has none, from the installed package). A mutation is a list
of exact text replacements in one file of the copy; each old text must occur exactly once, else the
mutation "does not apply" (a refactor moved its target: re-point it) and the run fails. The guarding
tests then run with PYTHONPATH at the copy, so they and every process they start import the mutant.
Before any mutation, a canary (an import error planted in the copy) must fail a test, which proves
the copy is what the tests import, and the unmutated guarding tests must all pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python" / "clipdedup"
TIMEOUT_S = 600


@dataclass(frozen=True)
class Mutation:
    name: str
    guarantee: str
    file: str  # relative to python/clipdedup
    edits: tuple[tuple[str, str], ...]  # (old, new), each old found exactly once
    tests: tuple[str, ...]  # pytest node ids, relative to the repository root


MUTATIONS = [
    Mutation(
        "check-without-alignment",
        "builtin:dct's check aligns scale and offset per axis before comparing (a 5% off-centre crop)",
        "match/verify/warp_check.py",
        (("ITERS = 5  #", "ITERS = 0  #"),),
        ("tests/match/test_verify.py::test_decisions_on_planted_variants_of_real_photos",),
    ),
    Mutation(
        "check-whole-picture",
        "builtin:dct's check turns down a picture with one part replaced (the worst block decides)",
        "match/verify/warp_check.py",
        (("GRID = 4  #", "GRID = 1  #"),),
        ("tests/match/test_verify.py::test_decisions_on_planted_variants_of_real_photos",),
    ),
    Mutation(
        "drop-ctime-check",
        "a snapshot row whose .npy was rewritten in place (same mtime, size, inode) is re-read",
        "db/snapshot.py",
        (
            (
                "    for name in STAT_FIELDS:\n        same &=",
                '    for name in ("mtime_ns", "size", "ino"):\n        same &=',
            ),
        ),
        (
            "tests/db/test_snapshot.py::test_inplace_rewrite_keeping_mtime_and_size_is_seen",
            "tests/db/test_snapshot.py::test_reusable_rows_rules",
        ),
    ),
    Mutation(
        "drop-racy-window",
        "a snapshot row written within the timestamp granularity of its load is not trusted",
        "db/snapshot.py",
        (("    same &= snap.ctime_ns[src] <= snap.written_ns - RACY_NS\n", ""),),
        ("tests/db/test_snapshot.py::test_reusable_rows_rules",),
    ),
    Mutation(
        "skip-exact-recheck",
        "every reported pair passed the float64 re-check (screening candidates are not answers)",
        "match/core.py",
        (
            (
                "        m = d <= threshold\n        keep_i",
                "        m = np.ones(d.shape, bool)\n        keep_i",
            ),
        ),
        ("tests/match/test_match.py::test_self_matches_reference",),
    ),
    Mutation(
        "halve-screen-margin",
        "low-precision screening loses no pair within the threshold",
        "match/screen/bounds.py",
        (
            (
                "    return (per_norm * na + const) * scale, (per_norm * nb + const) * scale",
                "    return (per_norm * na + const) * scale / 2, (per_norm * nb + const) * scale / 2",
            ),
        ),
        (
            "tests/match/test_match.py::test_bf16_margin_edge",
            "tests/match/test_match.py::test_margin_covers_adversarial_pairs_at_threshold",
        ),
    ),
    Mutation(
        "int-screen-without-rounding-margin",
        "the integer screen loses no pair within the threshold (its rounding error is in tau)",
        "match/screen/int_screen.py",
        (
            (
                "    big_t = n2 / 2 - s2t2 / 4 - l1 / 2 - 3 * k / 8",
                "    big_t = n2 / 2 - s2t2 / 4",
            ),
        ),
        (
            "tests/match/test_int_screen.py::test_thresholds_keep_every_pair_at_the_edge",
            "tests/match/test_int_screen.py::test_int16_store_recipe_equals_reference",
        ),
    ),
    Mutation(
        "move-before-journaling",
        "a move is journaled before it happens",
        "trash/move.py",
        (
            (
                "        seq = journal.intend(\n",
                "        move_exact(src, target, expect=checked)\n        seq = journal.intend(\n",
            ),
            (
                "            move_exact(src, target, expect=checked, "
                "grab=move_grab_path(src, journal.run_id, seq))\n",
                "            pass\n",
            ),
        ),
        ("tests/trash/test_journal.py::test_records_are_written_before_the_move",),
    ),
    Mutation(
        "no-fsync-of-move-record",
        "a move's journal record is fsynced before the move",
        "trash/journal.py",
        (('"seq": self._seq, **rec}, sync=True)', '"seq": self._seq, **rec}, sync=False)'),),
        ("tests/trash/test_journal_fsync.py",),
    ),
    Mutation(
        "overwrite-trash-name",
        "a move never replaces a file already at the destination",
        "trash/fileops.py",
        (
            (
                "        os.link(src, dst, follow_symlinks=False)  # atomic, and fails if dst exists\n",
                "        os.path.lexists(dst) and os.unlink(dst)\n"
                "        os.link(src, dst, follow_symlinks=False)\n",
            ),
        ),
        ("tests/trash/test_move.py::test_move_exact_moves_and_never_replaces",),
    ),
    Mutation(
        "ignore-mtime-before-move",
        "a file changed since the scan is not moved",
        "trash/move.py",
        (
            (
                "    if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:\n",
                "    if st.st_size != entry.size:\n",
            ),
        ),
        ("tests/trash/test_move.py::test_check_before_move_refuses_stale_information",),
    ),
    Mutation(
        "follow-symlinks-by-default",
        "symlinks are not followed unless asked",
        "pipeline.py",
        (("    follow_symlinks: bool = False  #", "    follow_symlinks: bool = True  #"),),
        ("tests/trash/test_move.py::test_symlinks_not_followed_by_default",),
    ),
    Mutation(
        "write-the-base-db",
        "import mode never writes the base image dir or the base DB",
        "pipeline.py",
        (("            dry_run=opts.dry_run or read_only,\n", "            dry_run=opts.dry_run,\n"),),
        ("tests/test_import_readonly.py::test_import_never_writes_the_base_dir_or_base_db",),
    ),
    Mutation(
        "accept-another-model",
        "a DB written by another model is refused",
        "db/layout.py",
        (("    if have.model_id != want.model_id or have.dim != want.dim", "    if have.dim != want.dim"),),
        ("tests/db/test_model_guard.py",),
    ),
    Mutation(
        "stale-embedding-is-fresh",
        "an image whose mtime differs from its .npy's is re-encoded",
        "db/layout.py",
        (
            (
                "    return img.mtime_ns != mtime_ns or (expected_size is not None and size != expected_size)\n",  # noqa: E501
                "    return expected_size is not None and size != expected_size\n",
            ),
        ),
        ("tests/db/test_layout.py::test_plan_update_rules",),
    ),
    Mutation(
        "undo-overwrites",
        "undo never overwrites a file that reappeared at the original path",
        "trash/undo.py",
        (
            (
                '        return res("refused", f"a file has reappeared here; left {dst} in the trash")\n'
                "    if got != want:\n",
                "        os.replace(dst, src)\n"
                '        return res("restored", "replaced what was there")\n'
                "    if got != want:\n",
            ),
        ),
        ("tests/trash/test_journal.py::test_undo_never_overwrites_a_file_that_reappeared",),
    ),
    Mutation(
        "undo-skips-hash-check",
        "undo puts back only the content that was moved",
        "trash/undo.py",
        (("    if got != want:\n        return res(", "    if False:\n        return res("),),
        ("tests/trash/test_journal.py::test_undo_checks_the_content_hash",),
    ),
    Mutation(
        "lock-inherited-by-children",
        "a child process started by a run does not keep the run's lock",
        "util/lock.py",
        (
            (
                "        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)\n",
                "        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)\n"
                "        os.set_inheritable(fd, True)\n",
            ),
        ),
        ("tests/util/test_lock.py::test_a_child_spawned_while_locked_does_not_hold_the_lock",),
    ),
    Mutation(
        "unreadable-dir-is-fatal",
        "an unreadable directory is reported, and the scan goes on",
        "scan.py",
        (
            (
                "    cols = [t.rels, t.mtime_ns.tolist(), t.size.tolist(), t.ctime_ns.tolist()]\n",
                "    if t.errors:\n        raise PermissionError(t.errors[0][1])\n"
                "    cols = [t.rels, t.mtime_ns.tolist(), t.size.tolist(), t.ctime_ns.tolist()]\n",
            ),
        ),
        ("tests/test_scan.py::test_unreadable_directory_is_reported_not_fatal",),
    ),
    Mutation(
        "cache-trusts-paths",
        "a rerun reuses no pair of a row whose embedding changed (rows are compared by content)",
        "match/cache/matches.py",
        (
            (
                "    same[same] = c.hashes[old[same]] == np.asarray(hashes, np.uint64)[same]\n",
                "    same[same] = True\n",
            ),
        ),
        ("tests/match/test_cache.py::test_random_sequences_equal_full_runs",),
    ),
    Mutation(
        "stale-screen-operands",
        "a rerun screens new and changed rows with their own operands, not the cache's",
        "match/cache/incremental.py",
        (("project_changed(sr, store, np.flatnonzero(old < 0))", "(sr, '')"),),
        ("tests/match/test_cache.py::test_random_sequences_equal_full_runs",),
    ),
    Mutation(
        "dedup-outside-locks",
        "a dedup run holds the DB and trash locks while it works, not only while it starts",
        "pipeline.py",
        (
            (
                "        return _run_dedup_locked(image_dir, db_dir, trash_dir, opts, exclude)\n",
                "    return _run_dedup_locked(image_dir, db_dir, trash_dir, opts, exclude)\n",
            ),
        ),
        ("tests/util/test_locks_held.py::test_dedup_holds_its_locks_while_it_moves",),
    ),
    Mutation(
        "keep-tie-inverted",
        "a full tie of a keep strategy keeps the first path in byte order",
        "trash/keep.py",
        (
            (
                "os.fsencode(group[k].rel) < os.fsencode(group[best].rel)",
                "os.fsencode(group[k].rel) > os.fsencode(group[best].rel)",
            ),
        ),
        ("tests/trash/test_keep.py",),
    ),
    Mutation(
        "import-base-load-writes",
        "import mode loads the base DB read-only (no cache refreshed there)",
        "pipeline.py",
        (
            (
                "in_memory=ub.in_memory, dry_run=True, info=binfo",
                "in_memory=ub.in_memory, dry_run=opts.dry_run, info=binfo",
            ),
        ),
        ("tests/test_import_readonly.py::test_import_never_writes_the_base_dir_or_base_db",),
    ),
    Mutation(
        "gpu-rows-own-pairs-below",
        "a GPU rerun reports a new row's pairs with unchanged rows below it too, each pair once",
        "match/backends/stream.py",
        (("keep = (a != b) & ((a < b) | ~in_rows[b])", "keep = (a != b) & (a < b)"),),
        ("tests/match/test_stream.py::test_torch_steps_on_cpu_equal_find_pairs_store",),
    ),
    Mutation(
        "torch-step-no-rerun",
        "torch-cuda's step re-runs with the exact size when its candidate buffer was too small",
        "match/backends/torch_steps.py",
        (
            (
                "        if found <= cap and most <= tile_hits:\n            return out[:, :found].T",
                "        return out[:, : min(found, cap)].T",
            ),
        ),
        ("tests/match/test_stream.py::test_torch_steps_on_cpu_equal_find_pairs_store",),
    ),
    Mutation(
        "gpu-run-takes-the-matrix",
        "a dedup run with a GPU backend streams its row store, never a matrix of it",
        "match/cache/incremental.py",
        (("    elif backend in stream.GPU_STORE_BACKENDS:", "    elif False:"),),
        ("tests/match/test_stream_runs.py::test_dedup_runs_stream_full_and_incremental",),
    ),
    Mutation(
        "chain-moves-whole-group",
        "a file moves only if it is itself a near-duplicate of the file kept (a chain A~B, B~C, A!~C "
        "does not move C)",
        "trash/group.py",
        (("        dups = sorted(adj.get(k, set()) & inside)\n", "        dups = sorted(inside - {k})\n"),),
        (
            "tests/trash/test_chains.py::test_chain_a_b_c_moves_only_b",
            "tests/trash/test_chains.py::"
            "test_on_the_test_images_with_chains_every_move_is_within_the_threshold_of_its_kept_file",
        ),
    ),
    Mutation(
        "ignore-ctime",
        "content rewritten in place with its size and mtime put back (touch -r) is re-encoded",
        "db/layout.py",
        (("    if ctime_ns is not None and img.ctime_ns > ctime_ns:\n", "    if False:\n"),),
        (
            "tests/ingest/test_ctime.py::test_rewritten_content_with_size_and_mtime_restored_is_reencoded",
            "tests/ingest/test_ctime.py::test_a_rewritten_duplicate_is_not_moved_as_its_old_self",
        ),
    ),
    Mutation(
        "unchecked-row-trusted",
        "a snapshot row located but not read at opening is checked when read (a damaged one: its .npy)",
        "db/rowstore.py",
        (
            (
                "            if fatal or bad:\n                rows = ",
                "            if False:\n                rows = ",
            ),
        ),
        (
            "tests/db/test_rowstore.py::test_unchecked_open_reads_no_snapshot_row",
            "tests/test_rerun_reads.py::test_nothing_changed_reads_no_row_and_lists_the_db_once",
        ),
    ),
    Mutation(
        "unchecked-open-reads-every-row",
        "a rerun that needs no full screen reads only the rows the snapshot lacks (O(changed) load)",
        "db/store_load.py",
        (("            if unchecked:  # written from rows", "            if False:  # written from rows"),),
        (
            "tests/db/test_rowstore.py::test_unchecked_open_reads_no_snapshot_row",
            "tests/test_rerun_reads.py::test_nothing_changed_reads_no_row_and_lists_the_db_once",
        ),
    ),
]


def apply(text: str, m: Mutation) -> tuple[str | None, str]:
    """The mutated text, or None and why the mutation does not apply."""
    for k, (old, new) in enumerate(m.edits):
        n = text.count(old)
        if n != 1:
            return None, f"edit {k + 1}: its text occurs {n} times in {m.file} (must be once)"
        text = text.replace(old, new)
    return text, ""


def compiled(pkg: Path) -> list[Path]:
    return sorted(pkg.glob("_native*.so")) + sorted(pkg.glob("_native*.pyd"))


def native_module() -> Path | None:
    """The compiled _native of the checkout, else of the installed package (found without the
    checkout on the path)."""
    if compiled(PACKAGE):
        return compiled(PACKAGE)[0]
    code = "import importlib.util as u; s = u.find_spec('clipdedup._native'); print(s.origin if s else '')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env)
    origin = out.stdout.strip()
    return Path(origin) if out.returncode == 0 and origin else None


def copy_package(dst_root: Path) -> Path:
    pkg = dst_root / "clipdedup"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"), ignore_dangling_symlinks=True)
    if not (pkg / "kernels").exists():  # the wheel maps kernels/ (repository root) to clipdedup/kernels
        shutil.copytree(REPO / "kernels", pkg / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    if not compiled(pkg):
        so = native_module()
        if so is None:
            raise SystemExit("mutations: no compiled clipdedup._native in the checkout or installed")
        shutil.copy2(so, pkg / so.name)
    return pkg


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, float, str]:
    """(pytest exit code, seconds, last lines of its output); exit 124 on timeout."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--runslow", *tests]
    t = time.perf_counter()
    try:
        r = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S
        )
        code, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        code, out = 124, str(e.stdout or "")
    tail = " | ".join(line for line in out.strip().splitlines()[-3:])
    return code, time.perf_counter() - t, tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutations and their targets")
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: python/clipdedup/{m.file}\n  guards: {m.guarantee}")
            for old, _ in m.edits:
                print("  target: " + old.strip().replace("\n", " / "))
            print("  tests: " + " ".join(m.tests))
        return 0
    if not chosen:
        print(f"mutations: none named {args.only!r}", file=sys.stderr)
        return 2
    all_tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    rows: list[tuple[str, str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="clipdedup-mutants-") as tmp:
        root = Path(tmp)
        pkg = copy_package(root)
        init = pkg / "__init__.py"
        clean_init = init.read_text()
        init.write_text(clean_init + "\nraise ImportError('mutation canary: the copy is imported')\n")
        code, _, tail = run_tests(root, chosen[0].tests)
        init.write_text(clean_init)
        if code == 0:
            print(f"mutations: the canary survived, so the tests do not import the copy ({tail})")
            return 2
        code, secs, tail = run_tests(root, all_tests)
        if code != 0:
            print(f"mutations: the guarding tests fail without any mutation ({secs:.0f}s): {tail}")
            return 2
        print(f"unmutated: {len(all_tests)} guarding test selections pass ({secs:.0f}s)", flush=True)
        for m in chosen:
            path = pkg / m.file
            clean = path.read_text() if path.exists() else None
            mutated, why = apply(clean, m) if clean is not None else (None, f"{m.file} does not exist")
            if mutated is None:
                rows.append((m.name, m.file, f"DOES NOT APPLY: {why}", 0.0))
                continue
            path.write_text(mutated)
            try:
                code, secs, tail = run_tests(root, m.tests)
            finally:
                path.write_text(clean)  # type: ignore[arg-type]
            if code == 124:
                status = "killed (timeout)"
            elif code == 1:
                status = "killed"
            elif code == 0:
                status = "SURVIVED"
            else:
                status = f"ERROR: pytest exit {code}: {tail}"
            rows.append((m.name, m.file, status, secs))
            print(f"  {m.name}: {status} ({secs:.0f}s)", flush=True)
    width = max(len("mutation"), *(len(r[0]) for r in rows))
    fw = max(len("file"), *(len(r[1]) for r in rows))
    print(f"\n{'mutation':<{width}}  {'file':<{fw}}  {'seconds':>7}  result")
    for name, file, status, secs in rows:
        print(f"{name:<{width}}  {file:<{fw}}  {secs:>7.0f}  {status}")
    bad = [r for r in rows if not r[2].startswith("killed")]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} mutations killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
