"""What the commands share: option groups, RunOptions from flags, the end-of-run output, and running
a command the way its console script does (one-line errors, exit codes)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from clipdedup.errors import UserError

DEFAULT_BATCH = 32


def default_model() -> str:
    from clipdedup.ingest.encode.base import DEFAULT_MODEL

    return DEFAULT_MODEL


def check_device(device: str | None) -> str | None:
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device {device}: torch sees no CUDA device here; use -c cpu")
    return device


def show_progress(quiet: bool) -> bool:
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


def console_entry(cmd: click.Command, prog: str) -> Callable[[], None]:
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


batch_size_option = click.option(
    "-b",
    "--batch-size",
    type=click.IntRange(1),
    default=DEFAULT_BATCH,
    show_default=True,
    help="Images per encoder batch.",
)


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
        click.option(
            "--ctime/--no-ctime",
            "use_ctime",
            default=True,
            show_default=True,
            help="Re-encode an image whose ctime is newer than its embedding (catches content "
            "rewritten with its size and mtime put back). --no-ctime: size and mtime only, for file "
            "systems whose ctime is unreliable (some network and FUSE mounts).",
        ),
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
            "--retry-unreadable",
            is_flag=True,
            help="Decode again the images that failed before and have not changed since (by default "
            "they are reported from the DB's record of them).",
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
            "image dir. A followed link stays on the image dir's file system (see "
            "--cross-file-systems); /proc, /sys and /dev are never entered. "
            "[default: symlinks are not followed]",
        ),
        click.option(
            "--cross-file-systems",
            "cross_devices",
            is_flag=True,
            help="With --follow-symlinks: let a followed link lead onto another file system.",
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


def cluster_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--ray",
            "ray_address",
            envvar="CLIPDEDUP_RAY",
            default=None,
            metavar="ADDRESS",
            help="Decode and encode on a Ray cluster (extra: pip install 'clip-image-deduper[ray]'): "
            "local (start one here), auto (join this node's cluster), ray://HOST:PORT. The scan, DB "
            "writes, grouping and moves stay here. [env: CLIPDEDUP_RAY; see docs/cluster.md]",
        ),
        click.option(
            "--ray-match",
            is_flag=True,
            envvar="CLIPDEDUP_RAY_MATCH",
            help="With --ray: match on the cluster too, one task per tile (same pairs as here).",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def run_options(**kw: Any) -> Any:
    from clipdedup.cluster import open_cluster
    from clipdedup.pipeline import RunOptions

    quiet = kw.pop("quiet")
    return RunOptions(
        model_id=kw["model_id"],
        device=check_device(kw["device"]),
        batch_size=kw.get("batch_size") or DEFAULT_BATCH,
        force=kw["force_update"],
        clean_orphans=kw["clean_orphans"],
        skip_update=kw["skip_update"],
        use_ctime=kw.get("use_ctime", True),
        retry_unreadable=kw["retry_unreadable"],
        dry_run=kw["dry_run"],
        threshold=kw["threshold"],
        keeping_logic=kw.get("keeping_logic") or "largest",
        backend=kw["backend"],
        top_k=kw.get("top_k") or 0,
        progress=show_progress(quiet),
        log=(lambda line: None) if quiet else None,
        follow_symlinks=kw.get("follow_symlinks", False),
        cross_devices=kw.get("cross_devices", False),
        cluster=open_cluster(kw.get("ray_address"), kw.get("ray_match", False)),
    )


def write_report_dir(
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


def finish(summary: Any, opts: Any, as_json: bool, quiet: bool) -> int:
    from clipdedup.report import core as report

    d = report.summary_dict(summary, dry_run=opts.dry_run)
    if getattr(opts, "top_k", 0):
        d["top_k"] = {"k": opts.top_k, "nearest": report.top_k_labelled(summary)}
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
    failed = report.failed_moves_line(summary.move_skipped)
    if failed is not None:
        click.echo(f"error: {failed}", err=True)  # also with -q: the run did not do its job
        return 2
    return 0
