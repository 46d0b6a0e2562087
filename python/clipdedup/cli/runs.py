"""The two run commands: `clip-image-deduper` (a click group; its subcommands are added in
`clipdedup.cli`) and `clip-image-import-deduper`."""

from __future__ import annotations

import contextlib
from typing import Any

import click

from clipdedup import __version__
from clipdedup.cli.common import (
    any_dir,
    batch_size_option,
    cluster_options,
    common_update_options,
    existing_dir,
    finish,
    match_options,
    run_options,
    write_report_dir,
)
from clipdedup.trash.keep import STRATEGIES


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
@batch_size_option
@match_options
@cluster_options
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
    from clipdedup.report.core import check_report_dir, report_roots

    report_dir = kw.pop("report_dir", None)
    if report_dir is not None:
        check_report_dir(report_dir, [image_dir])
    opts = run_options(quiet=quiet, **kw)
    with opts.cluster or contextlib.nullcontext():  # a Ray instance started for the run stops after it
        summary = run_dedup(image_dir, db_dir, trash_dir, opts)
    write_report_dir(summary, opts, report_dir, report_roots(image_dir), quiet)
    return finish(summary, opts, as_json, quiet)


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
@batch_size_option
@match_options
@cluster_options
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
    from clipdedup.report.core import check_report_dir, report_roots

    report_dir = kw.pop("report_dir", None)
    if report_dir is not None:
        check_report_dir(report_dir, [base_image_dir, import_image_dir])
    opts = run_options(quiet=quiet, **kw)
    with opts.cluster or contextlib.nullcontext():
        summary = run_import(base_image_dir, base_db_dir, import_image_dir, import_db_dir, trash_dir, opts)
    roots = report_roots(import_image_dir, base_image_dir)
    write_report_dir(summary, opts, report_dir, roots, quiet)
    return finish(summary, opts, as_json, quiet)
