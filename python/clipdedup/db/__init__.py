"""The embedding DB: the `.npy` mirror and its metadata (`layout`), loading (`load`), the packed
snapshot (`snapshot`) and the writer thread (`writer`). This package is the one DB API: the names
below are what the other stages use."""

from clipdedup.db.layout import (
    META_NAME,
    NPY_SUFFIX,
    NPZ_KEY,
    NPZ_SUFFIX,
    TMP_MARK,
    DBFile,
    DBIndex,
    UpdatePlan,
    atomic_write,
    check_meta,
    index_db,
    meta_path,
    mismatch_error,
    npy_bytes,
    npy_file_size,
    npy_path,
    plan_update,
    read_meta,
    remove_orphans,
    write_embedding,
    write_meta,
)
from clipdedup.db.load import SnapshotPrefetch, load_db, load_files, load_rows
from clipdedup.records import DBMeta, LoadInfo

__all__ = [
    "NPZ_KEY",
    "NPZ_SUFFIX",
    "NPY_SUFFIX",
    "mismatch_error",
    "TMP_MARK",
    "META_NAME",
    "DBFile",
    "DBIndex",
    "DBMeta",
    "LoadInfo",
    "SnapshotPrefetch",
    "UpdatePlan",
    "atomic_write",
    "check_meta",
    "index_db",
    "load_db",
    "load_files",
    "load_rows",
    "meta_path",
    "npy_bytes",
    "npy_file_size",
    "npy_path",
    "plan_update",
    "read_meta",
    "remove_orphans",
    "write_embedding",
    "write_meta",
]
