"""`trash.chains.group_record` reads only its group's entries: a run records every group, so work in
proportion to all entries per group made the act stage quadratic (97 s of a 300k-row rerun)."""

from __future__ import annotations

from collections.abc import Sequence

from clipdedup.records import FileEntry
from clipdedup.trash.chains import Planned, group_record


class Counted(Sequence):
    """Entries that count the reads of each index and refuse to be walked whole."""

    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            raise AssertionError("a slice of all entries")
        self.reads += 1
        return FileEntry(f"d/{k:06d}.jpg", 0, 1)

    def __iter__(self):
        raise AssertionError("walked every entry to record one group")


def test_group_record_reads_only_its_group() -> None:
    entries = Counted(300_000)
    p = Planned(kept=7, rows=[3, 7, 9], distances=[(3, 7, 0.1), (7, 9, 0.2)], stays=[], split_from=None)
    g = group_record(entries, p, [])
    assert g.members == ["d/000003.jpg", "d/000007.jpg", "d/000009.jpg"] and g.kept == "d/000007.jpg"
    assert g.distances == [("d/000003.jpg", "d/000007.jpg", 0.1), ("d/000007.jpg", "d/000009.jpg", 0.2)]
    assert entries.reads <= 20
