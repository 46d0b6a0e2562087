"""The drop-in commands. Flags are parsed here and handed to the library; nothing else lives here."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click
import numpy as np

from clipdedup import __version__
from clipdedup.errors import UserError
from clipdedup.trash.keep import STRATEGIES

DEFAULT_BATCH = 32


def _default_model() -> str:
    from clipdedup.ingest.encode.base import DEFAULT_MODEL

    return DEFAULT_MODEL


def _check_device(device: str | None) -> str | None:
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device {device}: torch sees no CUDA device here; use -c cpu")
    return device


def _progress(quiet: bool) -> bool:
    return not quiet


def run_cli(cmd: click.Command, prog: str, args: list[str] | None = None) -> int:
    """Runs a click command; expected failures become one line on stderr and exit code 2."""
    try:
        rv = cmd.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.Abort:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except click.ClickException as e:
        print(f"{prog}: error: {e.format_message()}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # An I/O failure that no stage turned into a UserError (a full disk, a file size limit):
        # still one line. Every write is atomic, so nothing half-written is left behind.
        where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return rv if isinstance(rv, int) else 0


def _entry(cmd: click.Command, prog: str) -> Callable[[], None]:
    def main() -> None:
        for stream in (sys.stdout, sys.stderr):
            # A file name that is not UTF-8 prints as its original bytes (as ls prints it), not as
            # a UnicodeEncodeError; JSON output escapes such names instead (report.dumps).
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="surrogateescape")
        sys.exit(run_cli(cmd, prog))

    return main


existing_dir = click.Path(exists=True, file_okay=False, dir_okay=True)
any_dir = click.Path(file_okay=False, dir_okay=True)


def common_update_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--clean-orphans/--no-clean-orphans",
            default=True,
            show_default=True,
            help="Remove DB files whose image is gone.",
        ),
        click.option("-f", "--force-update", is_flag=True, help="Re-encode every image."),
        click.option(
            "-c",
            "--device",
            default=None,
            help="Torch device for the encoder: cuda, cuda:1, cpu. [default: cuda if available, else cpu]",
        ),
        click.option(
            "-m",
            "--model-id",
            default=None,
            help="Encoder: hf-hub:org/name, local-dir:/path (open_clip_config.json + weights), "
            "ARCH/TAG or ARCH/path/to/checkpoint, or builtin:NAME. "
            "[default: the DB's model; for a new DB hf-hub:timm/PE-Core-bigG-14-448]",
        ),
        click.option("--skip-update", is_flag=True, help="Use the DB as it is; encode nothing."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars or per-file lines."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def match_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "-th",
            "--threshold",
            type=float,
            default=None,
            help="Euclidean distance at or under which two images are duplicates. "
            "[default: the model's, 0.1 for CLIP models]",
        ),
        click.option(
            "-n", "--dry-run", is_flag=True, help="Print what would move; change nothing, DB included."
        ),
        click.option(
            "-t",
            "--trash-dir",
            type=any_dir,
            default=None,
            help="Where duplicates are moved, under their relative path. Without it nothing moves.",
        ),
        click.option(
            "--backend",
            default=None,
            help="Matching backend (see `clip-image-deduper backends`). [default: best available, "
            "or $CLIPDEDUP_BACKEND]",
        ),
        click.option(
            "--top-k",
            type=click.IntRange(0),
            default=0,
            show_default=True,
            help="Record each image's K nearest images within the threshold in the JSON summary "
            "(key top_k); 0: off.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout."),
        click.option(
            "--follow-symlinks",
            is_flag=True,
            help="Scan through symlinks to files and directories (loops are cut). A symlink is never "
            "kept in place of its own target, and nothing is moved out of a linked dir outside the "
            "image dir. [default: symlinks are not followed]",
        ),
        click.option(
            "--report",
            "report_dir",
            type=any_dir,
            default=None,
            help="Write the groups to this dir for review: report.json, groups.csv, pairs.csv and an "
            "HTML contact sheet (index.html) with cached thumbnails. Works with --dry-run.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _options(**kw: Any) -> Any:
    from clipdedup.pipeline import RunOptions

    quiet = kw.pop("quiet")
    return RunOptions(
        model_id=kw["model_id"],
        device=_check_device(kw["device"]),
        batch_size=kw.get("batch_size") or DEFAULT_BATCH,
        force=kw["force_update"],
        clean_orphans=kw["clean_orphans"],
        skip_update=kw["skip_update"],
        dry_run=kw["dry_run"],
        threshold=kw["threshold"],
        keeping_logic=kw.get("keeping_logic") or "largest",
        backend=kw["backend"],
        top_k=kw.get("top_k") or 0,
        progress=_progress(quiet),
        log=(lambda line: None) if quiet else None,
        follow_symlinks=kw.get("follow_symlinks", False),
    )


def _write_report(
    summary: Any, opts: Any, report_dir: str | None, roots: dict[str, str], quiet: bool
) -> None:
    if report_dir is None:
        return
    from clipdedup.report import core as report

    metas = [u.meta for u in summary.updates.values() if u.meta is not None]
    model = metas[0].model_id if metas else opts.model_id
    groups = report.write_report(
        summary, report_dir, roots, strategy=opts.keeping_logic, dry_run=opts.dry_run, model=model
    )
    if not quiet:
        click.echo(f"report: {len(groups)} groups in {os.path.join(report_dir, 'index.html')}", err=True)


def _finish(summary: Any, opts: Any, as_json: bool, quiet: bool) -> int:
    from clipdedup.report import core as report

    d = report.summary_dict(summary, dry_run=opts.dry_run)
    if getattr(opts, "top_k", 0):
        d["top_k"] = {"k": opts.top_k, "nearest": summary.top_k}
    if as_json:
        click.echo(report.dumps(d))
    elif not quiet:
        for line in report.move_lines(summary, dry_run=opts.dry_run):
            click.echo(line)
    if not quiet:
        click.echo(report.summary_text(d), err=True)
        if summary.journal:
            trash = os.path.dirname(os.path.dirname(summary.journal))
            click.echo(f"to undo: clip-image-deduper undo -t {trash} --run {summary.run_id}", err=True)
    return 0


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Find near-duplicate images in IMAGE_DIR with CLIP embeddings kept in DB_DIR, keep one "
    "of each group and move the others to TRASH_DIR. Nothing is ever deleted.",
)
@click.option("-i", "--image-dir", type=existing_dir, default=None, help="The image tree. [required]")
@click.option(
    "-d", "--db-dir", type=any_dir, default=None, help="Embedding DB mirroring the image tree. [required]"
)
@common_update_options
@click.option(
    "-b",
    "--batch-size",
    type=click.IntRange(1),
    default=DEFAULT_BATCH,
    show_default=True,
    help="Images per encoder batch.",
)
@match_options
@click.option(
    "-kl",
    "--keeping-logic",
    type=click.Choice(STRATEGIES.names()),
    default="largest",
    show_default=True,
    help="Which file of a group stays: "
    + "; ".join(f"{n}: {STRATEGIES.entries[n].doc}" for n in STRATEGIES.names()),
)
@click.version_option(__version__, "-V", "--version")
@click.pass_context
def dedup_cmd(
    ctx: click.Context,
    image_dir: str | None,
    db_dir: str | None,
    trash_dir: str | None,
    as_json: bool,
    quiet: bool,
    **kw: Any,
) -> int:
    if ctx.invoked_subcommand is not None:
        return 0
    if image_dir is None or db_dir is None:
        raise click.UsageError("missing option -i/--image-dir and -d/--db-dir (both required)")
    from clipdedup.pipeline import run_dedup
    from clipdedup.report.core import check_report_dir

    report_dir = kw.pop("report_dir", None)
    if report_dir is not None:
        check_report_dir(report_dir, [image_dir])
    opts = _options(quiet=quiet, **kw)
    summary = run_dedup(image_dir, db_dir, trash_dir, opts)
    _write_report(summary, opts, report_dir, {"": image_dir}, quiet)
    return _finish(summary, opts, as_json, quiet)


@dedup_cmd.command("backends", help="List the backends of every stage usable here, and why not the rest.")
def backends_cmd() -> int:
    from clipdedup.ingest.decode.base import DECODERS
    from clipdedup.ingest.encode.base import ENCODERS
    from clipdedup.ingest.encode.cpu_forward import CPU_FORWARDS
    from clipdedup.match import MATCHERS

    for reg in (MATCHERS, DECODERS, ENCODERS, CPU_FORWARDS, STRATEGIES):
        click.echo(f"{reg.kind}s:")
        for name, why, doc in reg.status():
            state = "available" if why is None else f"unavailable: {why}"
            click.echo(f"  {name:<16} {state}" + (f"  ({doc})" if doc else ""))
    return 0


@dedup_cmd.command(
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
        device=_check_device(device),
        seed=seed,
        progress=None if quiet else (lambda line: click.echo(line, err=True)),
    )
    click.echo(json.dumps(calibrate.to_dict(c), indent=2) if as_json else calibrate.format_text(c))
    return 0


@dedup_cmd.command(
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
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Move to TRASH_DIR the images of the import dir that have a near-duplicate in the base dir. "
    "The base image dir is never modified.",
)
@click.option(
    "-bi", "--base-image-dir", type=existing_dir, required=True, help="Images already in the collection."
)
@click.option("-bd", "--base-db-dir", type=any_dir, required=True, help="DB of the base images.")
@click.option("-ii", "--import-image-dir", type=existing_dir, required=True, help="Images to import.")
@click.option("-id", "--import-db-dir", type=any_dir, required=True, help="DB of the import images.")
@common_update_options
@click.option(
    "-b",
    "--batch-size",
    type=click.IntRange(1),
    default=DEFAULT_BATCH,
    show_default=True,
    help="Images per encoder batch.",
)
@match_options
@click.version_option(__version__, "-V", "--version")
def import_cmd(
    base_image_dir: str,
    base_db_dir: str,
    import_image_dir: str,
    import_db_dir: str,
    trash_dir: str | None,
    as_json: bool,
    quiet: bool,
    **kw: Any,
) -> int:
    from clipdedup.pipeline import run_import
    from clipdedup.report.core import BASE_PREFIX, check_report_dir

    report_dir = kw.pop("report_dir", None)
    if report_dir is not None:
        check_report_dir(report_dir, [base_image_dir, import_image_dir])
    opts = _options(quiet=quiet, **kw)
    summary = run_import(base_image_dir, base_db_dir, import_image_dir, import_db_dir, trash_dir, opts)
    roots = {"": import_image_dir, BASE_PREFIX: base_image_dir}
    _write_report(summary, opts, report_dir, roots, quiet)
    return _finish(summary, opts, as_json, quiet)


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Update the DB of IMAGE_DIR, load it, and report encode and load rates.",
)
@click.option("-i", "--image-dir", type=existing_dir, required=True, help="The image tree.")
@click.option("-d", "--db-dir", type=any_dir, required=True, help="Its embedding DB.")
@common_update_options
@click.option(
    "-b",
    "--batch-size",
    type=click.IntRange(1),
    default=DEFAULT_BATCH,
    show_default=True,
    help="Images per encoder batch.",
)
def db_test_cmd(
    image_dir: str,
    db_dir: str,
    clean_orphans: bool,
    force_update: bool,
    device: str | None,
    model_id: str | None,
    skip_update: bool,
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
                device=_check_device(device),
                batch_size=batch_size,
                force=force_update,
                clean_orphans=clean_orphans,
                progress=not quiet,
                log=log,
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

    enc = load_encoder(model_id or _default_model(), device=_check_device(device), dtype=dtype)
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


dedup_main = _entry(dedup_cmd, "clip-image-deduper")
import_main = _entry(import_cmd, "clip-image-import-deduper")
db_test_main = _entry(db_test_cmd, "clip-image-deduper-db-test")
encoding_test_main = _entry(encoding_test_cmd, "clip-image-encoding-test")
