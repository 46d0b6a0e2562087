"""The tool commands: `backends`, `calibrate`, `undo` and `apply` (subcommands of clip-image-deduper), and
the two test commands `clip-image-deduper-db-test` and `clip-image-encoding-test`."""

from __future__ import annotations

import os
import time

import click
import numpy as np

from clipdedup.cli.common import (
    any_dir,
    batch_size_option,
    check_device,
    common_update_options,
    default_model,
    existing_dir,
)
from clipdedup.errors import UserError
from clipdedup.trash.keep import STRATEGIES


@click.command("backends", help="List the backends of every stage usable here, and why not the rest.")
def backends_cmd() -> int:
    from clipdedup.ingest.decode.base import DECODERS
    from clipdedup.ingest.encode.base import ENCODERS
    from clipdedup.ingest.encode.cpu_forward import CPU_FORWARDS
    from clipdedup.match import MATCHERS
    from clipdedup.util import cpu

    click.echo(f"cpu: {cpu.describe()}")  # what the CPU backends' availability was decided on
    for reg in (MATCHERS, DECODERS, ENCODERS, CPU_FORWARDS, STRATEGIES):
        click.echo(f"{reg.kind}s:")
        for name, why, doc in reg.status():
            state = "available" if why is None else f"unavailable: {why}"
            click.echo(f"  {name:<16} {state}" + (f"  ({doc})" if doc else ""))
        if reg is MATCHERS:
            click.echo(f"  default: {reg.explain_default()}")
    return 0


@click.command(
    "calibrate",
    help="Help choose -th for the DB's model: print the distances of nearest neighbours in the DB and "
    "of synthetic near-duplicates (JPEG re-encode, resize, small crop) of sampled images, and suggest "
    "a threshold for a target precision.",
)
@click.option("-d", "--db-dir", type=existing_dir, required=True, help="The embedding DB.")
@click.option(
    "-i",
    "--image-dir",
    type=existing_dir,
    default=None,
    help="Images to sample for synthetic near-duplicates (usually the DB's image dir). Without it "
    "only the nearest-neighbour distances are printed.",
)
@click.option("-m", "--model-id", default=None, help="The DB's model, if its metadata does not record it.")
@click.option("-c", "--device", default=None, help="Torch device for the encoder.")
@click.option(
    "--precision",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.99,
    show_default=True,
    help="Target precision of the suggested threshold.",
)
@click.option("--samples", type=click.IntRange(1), default=64, show_default=True, help="Images to sample.")
@click.option(
    "--nn-samples",
    type=click.IntRange(1),
    default=2000,
    show_default=True,
    help="DB rows whose nearest neighbour is measured.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def calibrate_cmd(
    db_dir: str,
    image_dir: str | None,
    model_id: str | None,
    device: str | None,
    precision: float,
    samples: int,
    nn_samples: int,
    seed: int,
    as_json: bool,
    quiet: bool,
) -> int:
    import json

    from clipdedup import calibrate

    c = calibrate.calibrate(
        db_dir,
        image_dir,
        model_id,
        precision=precision,
        samples=samples,
        nn_samples=nn_samples,
        device=check_device(device),
        seed=seed,
        progress=None if quiet else (lambda line: click.echo(line, err=True)),
    )
    click.echo(json.dumps(calibrate.to_dict(c), indent=2) if as_json else calibrate.format_text(c))
    return 0


@click.command(
    "undo",
    help="Put the files that runs moved to TRASH_DIR back where they were, from the trash dir's "
    "journal. Works after a crash mid-run. Never overwrites: a file that has reappeared at its "
    "original path is reported and its twin stays in the trash. Exit code 1 if any file could not "
    "be restored.",
)
@click.option("-t", "--trash-dir", type=existing_dir, required=True, help="The trash dir of the runs.")
@click.option(
    "--run", "run_id", default=None, help="Undo only this run (see --list). [default: all, newest first]"
)
@click.option("--list", "list_runs", is_flag=True, help="List the runs in the journal and exit.")
@click.option("-n", "--dry-run", is_flag=True, help="Print what would be restored; change nothing.")
@click.option("-q", "--quiet", is_flag=True, help="Only the final count.")
def undo_cmd(trash_dir: str, run_id: str | None, list_runs: bool, dry_run: bool, quiet: bool) -> int:
    from clipdedup.trash import journal

    if list_runs:
        infos, bad = journal.runs(trash_dir)
        for line in bad:
            click.echo(line, err=True)
        for i in infos:
            h = i.header
            click.echo(
                f"{i.run}  {h.get('mode', '?'):<6} {h.get('image_dir', '?')}  moved {i.count('done')}, "
                f"unfinished {i.count('pending')}, undone {i.count('undone')}, "
                f"rolled back {i.count('failed')}"
            )
        return 0
    from clipdedup.trash.undo import undo

    results = undo(trash_dir, run_id, dry_run=dry_run, log=(lambda line: None) if quiet else click.echo)
    counts = {
        k: sum(1 for r in results if r.status == k)
        for k in ("restored", "nothing-to-do", "refused", "missing")
    }
    verb = "would restore" if dry_run else "restored"
    click.echo(
        f"{verb} {counts['restored']}, already in place {counts['nothing-to-do']}, "
        f"refused {counts['refused']}, missing {counts['missing']}",
        err=True,
    )
    return 1 if counts["refused"] or counts["missing"] else 0


@click.command(
    "apply",
    help="Move what the review page of REPORT_DIR (written with --report, usually by a dry run) shows "
    "as moving: the report's plan with the decisions exported from the page on top. Each file must "
    "still have the size, mtime and content hash the report recorded, or it stays; moves are "
    "journaled and undone with `undo`, as in a normal run.",
)
@click.argument("report_dir", type=existing_dir)
@click.option("-t", "--trash-dir", type=any_dir, required=True, help="Where the files are moved.")
@click.option(
    "--decisions",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="decisions.json exported from the report's page. [default: the report's plan as it is]",
)
@click.option(
    "-i", "--image-dir", type=existing_dir, default=None, help="Refuse unless the report is for this dir."
)
@click.option("-n", "--dry-run", is_flag=True, help="Print what would move; change nothing.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary line.")
def apply_cmd(
    report_dir: str, trash_dir: str, decisions: str | None, image_dir: str | None, dry_run: bool, quiet: bool
) -> int:
    from clipdedup.report import apply as report_apply

    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    res = report_apply.apply_report(
        report_dir, trash_dir, decisions=decisions, image_dir=image_dir, dry_run=dry_run, log=log
    )
    if not quiet:
        for line in report_apply.result_lines(res, dry_run=dry_run):
            click.echo(line)
    click.echo(report_apply.summary_text(res, dry_run=dry_run), err=True)
    if res.journal and not quiet:
        click.echo(f"to undo: clip-image-deduper undo -t {trash_dir} --run {res.run_id}", err=True)
    from clipdedup.report.core import failed_moves_line

    failed = failed_moves_line(r for _, r in res.moves)
    if failed is not None:
        click.echo(f"error: {failed}", err=True)  # also with -q, as a dedup run
        return 2
    return 0


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Update the DB of IMAGE_DIR, load it, and report encode and load rates.",
)
@click.option("-i", "--image-dir", type=existing_dir, required=True, help="The image tree.")
@click.option("-d", "--db-dir", type=any_dir, required=True, help="Its embedding DB.")
@common_update_options
@batch_size_option
def db_test_cmd(
    image_dir: str,
    db_dir: str,
    clean_orphans: bool,
    force_update: bool,
    device: str | None,
    model_id: str | None,
    skip_update: bool,
    use_ctime: bool,
    quiet: bool,
    batch_size: int,
) -> int:
    from clipdedup.db import load_db
    from clipdedup.ingest.update import update_db

    if not skip_update:
        from clipdedup.util.lock import db_lock

        log = (lambda s: None) if quiet else None
        with db_lock(db_dir, log):
            u = update_db(
                image_dir,
                db_dir,
                model_id,
                device=check_device(device),
                batch_size=batch_size,
                force=force_update,
                clean_orphans=clean_orphans,
                progress=not quiet,
                log=log,
                use_ctime=use_ctime,
            )
        enc_s = u.seconds.get("encode", 0.0)
        rate = f"{u.encoded / enc_s:.1f} img/s" if enc_s > 0 and u.encoded else "n/a"
        click.echo(
            f"update: scanned {u.scanned}, encoded {u.encoded} ({rate}), up to date "
            f"{u.up_to_date}, skipped {len(u.failed)}, orphans removed {len(u.removed)}"
        )
    errors: list[tuple[str, str]] = []
    t = time.perf_counter()
    paths, x = load_db(db_dir, errors=errors)
    dt = time.perf_counter() - t
    mb = x.nbytes / 1e6
    click.echo(
        f"load: {len(paths)} embeddings of dim {x.shape[1] if x.ndim == 2 else 0} in {dt:.3f}s "
        f"({len(paths) / dt if dt > 0 else 0:.0f} files/s, {mb / dt if dt > 0 else 0:.1f} MB/s), "
        f"{len(errors)} unreadable"
    )
    return 0


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Encode IMAGE_PATHS and print their pairwise euclidean distance matrix.",
)
@click.option("-m", "--model-id", default=None, help="Encoder id, as for clip-image-deduper -m.")
@click.option("-d", "--device", default=None, help="Torch device. [default: cuda if available, else cpu]")
@click.option(
    "-p",
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default=None,
    help="Model precision. [default: fp16 on CUDA, fp32 on CPU]",
)
@click.argument("image_paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def encoding_test_cmd(
    model_id: str | None, device: str | None, dtype: str | None, image_paths: tuple[str, ...]
) -> int:
    from clipdedup.ingest.decode.base import DecodeError, decode_pil
    from clipdedup.ingest.encode.base import load_encoder
    from clipdedup.match import exact_distances

    enc = load_encoder(model_id or default_model(), device=check_device(device), dtype=dtype)
    items, names = [], []
    for p in image_paths:
        try:
            items.append(enc.prepare(decode_pil(p, enc.input_size)))
            names.append(p)
        except DecodeError as e:
            click.echo(f"{p}: skipped: {e}", err=True)
    if not items:
        raise UserError("no image could be decoded")
    t = time.perf_counter()
    x = enc.encode_batch(items)
    dt = time.perf_counter() - t
    n = len(names)
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    d = exact_distances(x[ii.ravel()], x[jj.ravel()]).reshape(n, n)
    click.echo(f"model {enc.model_id}, dim {enc.dim}, {n} images encoded in {dt:.3f}s", err=True)
    width = max(len(os.path.basename(p)) for p in names)
    for k, p in enumerate(names):
        click.echo(f"{k:>3} {os.path.basename(p):<{width}} " + " ".join(f"{v:7.4f}" for v in d[k]))
    return 0
