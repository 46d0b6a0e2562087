from collections.abc import Sequence

import numpy as np
from typing_extensions import Buffer

# Buffer | np.ndarray: numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12, so an
# ndarray is not a Buffer to mypy checking for Python 3.11 ([tool.mypy] python_version).

def npy_header(path: bytes | str) -> tuple[int | None, int | None, str | None]: ...
def read_npy_into(
    paths: Sequence[bytes | str], out: Buffer | np.ndarray, threads: int = 0, rows: np.ndarray | None = None
) -> list[tuple[int, str]]: ...
def read_npz_into(
    paths: Sequence[bytes | str], out: Buffer | np.ndarray, threads: int = 0, rows: np.ndarray | None = None
) -> list[tuple[int, str]]: ...
def npz_supported() -> bool: ...

class ScanOutput:
    def __len__(self) -> int: ...
    def rels(self) -> list[str]: ...
    def mtime_ns(self) -> np.ndarray: ...
    def ctime_ns(self) -> np.ndarray: ...
    def size(self) -> np.ndarray: ...
    def ino(self) -> np.ndarray: ...
    def unsure(self) -> list[int]: ...
    def classify_db(self, tmp_mark: str) -> tuple[np.ndarray, list[int], list[int]]: ...
    def names(self, idx: np.ndarray, prefix: bytes = b"", drop: int = 0) -> list[str]: ...
    def errors(self) -> list[tuple[str, str]]: ...

def scan_tree(
    root: bytes,
    suffixes: Sequence[bytes] | None,
    exclude: Sequence[bytes],
    follow_symlinks: bool,
    threads: int = 0,
    cross_devices: bool = False,
    system_devices: Sequence[int] = ...,
    progress: np.ndarray | None = None,
) -> ScanOutput: ...
def construct(cls: type, names: Sequence[str], columns: Sequence[Sequence[object]]) -> list: ...
def row_hashes(mat: Buffer | np.ndarray, threads: int = 1) -> np.ndarray: ...
def gather_rows(
    path: bytes | int,
    data_offset: int,
    src: np.ndarray,
    dst: np.ndarray,
    expect: np.ndarray,
    out: Buffer | np.ndarray,
    threads: int = 1,
) -> tuple[str | None, list[int]]: ...
def int_screen_isas() -> list[str]: ...
def int16_screen(
    a: np.ndarray,
    b: np.ndarray,
    ta: np.ndarray,
    tb: np.ndarray,
    row_base: int,
    col_base: int,
    upper: bool,
    out_r: np.ndarray,
    out_q: np.ndarray,
    isa: str,
    threads: int = 1,
) -> int: ...
def warp_scores(
    a: Buffer | np.ndarray,
    b: Buffer | np.ndarray,
    pairs: np.ndarray,
    out: Buffer | np.ndarray,
    *,
    side: int,
    margin: int,
    chroma: int,
    iters: int,
    grid: int,
    colourless: float,
    sd_log: float,
    cm_log: float,
    mu_log: float,
    scale_lim: float,
    offset_lim: float,
    floor: float,
    flat: float,
    damp: float,
    threads: int = 1,
) -> None: ...
