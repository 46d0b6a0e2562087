"""The drop-in commands. Flags are parsed here and handed to the library; nothing else lives here.

`common` has the shared options and output, `runs` the two run commands, `tools` the subcommands
and test commands; the subcommands are attached to clip-image-deduper below, in one place."""

from clipdedup.cli.common import console_entry, run_cli
from clipdedup.cli.runs import dedup_cmd, import_cmd
from clipdedup.cli.tools import (
    apply_cmd,
    backends_cmd,
    calibrate_cmd,
    db_test_cmd,
    encoding_test_cmd,
    undo_cmd,
)

for _sub in (backends_cmd, calibrate_cmd, undo_cmd, apply_cmd):
    dedup_cmd.add_command(_sub)

dedup_main = console_entry(dedup_cmd, "clip-image-deduper")
import_main = console_entry(import_cmd, "clip-image-import-deduper")
db_test_main = console_entry(db_test_cmd, "clip-image-deduper-db-test")
encoding_test_main = console_entry(encoding_test_cmd, "clip-image-encoding-test")

__all__ = [
    "db_test_main",
    "dedup_cmd",
    "dedup_main",
    "encoding_test_main",
    "import_cmd",
    "import_main",
    "run_cli",
]
