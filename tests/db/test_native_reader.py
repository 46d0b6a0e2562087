"""The native .npy reader against np.load, on good files and on every kind of bad one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from clipdedup import db as dbmod
from clipdedup import native


def _save(path: Path, arr: np.ndarray, **kw) -> str:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, arr, allow_pickle=False, **kw)
    return str(path)


def _poisoned(n: int, d: int) -> np.ndarray:
    return np.full((n, d), np.nan, np.float32)


@pytest.mark.parametrize("dim", [1, 3, 7, 511, 1281])
@pytest.mark.parametrize("threads", [1, 2, 3, 4, 5, 6, 7, 8])
def test_matches_np_load_on_random_files(tmp_path: Path, dim: int, threads: int) -> None:
    rng = np.random.default_rng(dim * 10 + threads)
    n = int(rng.integers(1, 70))
    paths = [_save(tmp_path / f"{k}.npy", rng.standard_normal(dim).astype(np.float32)) for k in range(n)]
    out = _poisoned(n, dim)
    assert native.read_npy_into(paths, out, threads) == []
    np.testing.assert_array_equal(out, np.stack([np.load(p) for p in paths]))


def test_zero_and_one_file(tmp_path: Path) -> None:
    out = np.zeros((0, 5), np.float32)
    assert native.read_npy_into([], out, 4) == []
    v = np.arange(5, dtype=np.float32)
    one = _poisoned(1, 5)
    assert native.read_npy_into([_save(tmp_path / "a.npy", v)], one, 4) == []
    np.testing.assert_array_equal(one[0], v)


def test_rows_scatter_into_a_bigger_buffer(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vs = rng.standard_normal((6, 9)).astype(np.float32)
    paths = [_save(tmp_path / f"{k}.npy", v) for k, v in enumerate(vs)]
    rows = np.array([9, 0, 4, 3, 7, 1])
    out = _poisoned(10, 9)
    assert native.read_npy_into(paths, out, 3, rows) == []
    np.testing.assert_array_equal(out[rows], vs)
    assert np.isnan(out[[2, 5, 6, 8]]).all()  # untouched
    with pytest.raises(IndexError):
        native.read_npy_into(paths, out, 3, np.array([0, 1, 2, 3, 4, 10]))


def _bad_files(d: Path, dim: int) -> dict[str, str]:
    """path -> the start of the reason the reader must give."""
    v = np.arange(dim, dtype=np.float32)
    full = Path(_save(d / "full.npy", v)).read_bytes()
    bad = {}
    (d / "truncated.npy").write_bytes(full[:-3])
    bad["truncated.npy"] = "truncated: "
    (d / "header_cut.npy").write_bytes(full[:20])
    bad["header_cut.npy"] = "truncated .npy header"
    (d / "trailing.npy").write_bytes(full + b"\0\0\0\0")
    bad["trailing.npy"] = "trailing bytes"
    _save(d / "f64.npy", v.astype(np.float64))
    bad["f64.npy"] = "dtype '<f8', expected '<f4'"
    _save(d / "bigendian.npy", v.astype(">f4"))
    bad["bigendian.npy"] = "dtype '>f4'"
    _save(d / "matrix_f.npy", np.asfortranarray(np.ones((2, dim), np.float32)))
    bad["matrix_f.npy"] = f"shape (2, {dim}), expected one vector"
    _save(d / "wrong_dim.npy", np.ones(dim + 1, np.float32))
    bad["wrong_dim.npy"] = f"dim {dim + 1}, DB holds dim {dim}"
    (d / "text.npy").write_text("this is not numpy\n")
    bad["text.npy"] = "not an .npy file (bad magic)"
    (d / "empty.npy").write_bytes(b"")
    bad["empty.npy"] = "not an .npy file"
    (d / "dir.npy").mkdir()
    bad["dir.npy"] = "not a regular file"
    bad["missing.npy"] = "open: No such file or directory"
    os.unlink(d / "full.npy")
    return bad


def test_bad_files_give_reasons_and_leave_rows_untouched(tmp_path: Path) -> None:
    dim = 13
    bad = _bad_files(tmp_path, dim)
    rng = np.random.default_rng(2)
    good = {f"ok{k}.npy": rng.standard_normal(dim).astype(np.float32) for k in range(5)}
    for name, v in good.items():
        _save(tmp_path / name, v)
    names = sorted(bad) + sorted(good)
    rng.shuffle(names)
    out = _poisoned(len(names), dim)
    errors = dict(native.read_npy_into([tmp_path / n for n in names], out, 4))
    assert sorted(names[k] for k in errors) == sorted(bad)
    for k, reason in errors.items():
        assert reason.startswith(bad[names[k]]), (names[k], reason)
        assert "\n" not in reason
        assert np.isnan(out[k]).all()
    for k, n in enumerate(names):
        if n in good:
            np.testing.assert_array_equal(out[k], good[n])


def test_header_variants_np_load_accepts(tmp_path: Path) -> None:
    """Version 2 headers, a (1, D) shape and a Fortran-order vector hold one vector: read them."""
    v = np.random.default_rng(3).standard_normal(6).astype(np.float32)
    paths = [
        _save(tmp_path / "v2.npy", v, version=(2, 0)),
        _save(tmp_path / "row.npy", v.reshape(1, 6)),
    ]
    fortran = tmp_path / "fortran.npy"
    with open(fortran, "wb") as f:
        header = np.lib.format.header_data_from_array_1_0(v.reshape(1, 6))
        header["fortran_order"] = True
        np.lib.format.write_array_header_1_0(f, header)
        f.write(v.tobytes())
    paths.append(str(fortran))
    out = _poisoned(3, 6)
    assert native.read_npy_into(paths, out, 2) == []
    for k, p in enumerate(paths):
        np.testing.assert_array_equal(out[k], np.load(p).reshape(-1))


def test_awkward_paths(tmp_path: Path) -> None:
    v = np.arange(4, dtype=np.float32)
    names = ["with space.npy", "new\nline.npy", "ünï 日本.npy"]
    paths = [_save(tmp_path / n, v + k) for k, n in enumerate(names)]
    raw = os.fsencode(tmp_path) + b"/\xff\xfe.npy"
    with open(raw, "wb") as f:
        np.save(f, v + 9)
    paths.append(os.fsdecode(raw))
    out = _poisoned(4, 4)
    assert native.read_npy_into(paths, out, 2) == []
    np.testing.assert_array_equal(out, np.stack([v, v + 1, v + 2, v + 9]))
    assert native.npy_dim(paths[1]) == (4, None)
    assert native.npy_dim(tmp_path / "nope.npy")[0] is None


def test_rejects_a_buffer_of_the_wrong_layout(tmp_path: Path) -> None:
    p = [_save(tmp_path / "a.npy", np.zeros(4, np.float32))]
    for out in (np.zeros((1, 4), np.float64), np.zeros((2, 8), np.float32)[:1, ::2], np.zeros(4, np.float32)):
        with pytest.raises(ValueError):
            native.read_npy_into(p, out)


def test_load_rows_mixes_npy_and_legacy_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    vs = rng.standard_normal((4, 11)).astype(np.float32)
    files = []
    for k, v in enumerate(vs):
        if k % 2:
            path = str(tmp_path / f"{k}.jpg.npz")
            np.savez_compressed(path, clip_embedding=v)  # the original tool's format
        else:
            path = _save(tmp_path / f"{k}.jpg.npy", v)
        files.append(dbmod.DBFile(f"{k}.jpg", path, 0, 0, bool(k % 2)))
    np.savez(tmp_path / "bad.npz", other=vs[0])
    files.append(dbmod.DBFile("bad", str(tmp_path / "bad.npz"), 0, 0, True))
    np.savez(tmp_path / "f64.npz", clip_embedding=vs[1].astype(np.float64))  # native refuses, np.load reads
    files.append(dbmod.DBFile("f64", str(tmp_path / "f64.npz"), 0, 0, True))
    mat, ok, errors = dbmod.load_rows(files, None, threads=3)
    assert ok.tolist() == [True] * 4 + [False, True]
    np.testing.assert_array_equal(mat[:4], vs)
    np.testing.assert_array_equal(mat[5], vs[1])
    assert not mat[4].any()
    assert errors == [(files[4].path, "ValueError: no key 'clip_embedding'")]


@pytest.mark.parametrize("dim", [1, 5, 8, 13, 1280])
def test_row_hashes_match_reference(dim: int) -> None:
    from clipdedup.db.snapshot import row_hashes_ref

    m = np.random.default_rng(dim).standard_normal((37, dim)).astype(np.float32)
    h = native.row_hashes(m, 3)
    np.testing.assert_array_equal(h, row_hashes_ref(m))
    m[5, dim // 2] = np.nextafter(m[5, dim // 2], np.inf)  # one ulp in one row
    h2 = native.row_hashes(m, 1)
    assert (h2 != h).tolist() == [k == 5 for k in range(37)]
    assert native.row_hashes(np.zeros((0, dim), np.float32)).shape == (0,)


def test_alloc_rows_plain() -> None:
    a = native.alloc_rows(3, 7, pinned=False)
    assert a.shape == (3, 7) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    assert native.alloc_rows(0, 7).shape == (0, 7)


@pytest.mark.gpu
def test_alloc_rows_pinned_is_torch_pinned_and_readable_into(tmp_path: Path) -> None:
    import torch

    a = native.alloc_rows(4, 9)
    assert torch.from_numpy(a).is_pinned()
    v = np.arange(9, dtype=np.float32)
    assert native.read_npy_into([_save(tmp_path / "a.npy", v)], a[:1]) == []
    np.testing.assert_array_equal(torch.from_numpy(a[:1]).cuda().cpu().numpy()[0], v)


needs_npz = pytest.mark.skipif(not native.npz_supported(), reason="built without zlib: .npz read in Python")


@needs_npz
@pytest.mark.parametrize("dim", [1, 3, 511, 1280])
@pytest.mark.parametrize("threads", [1, 2, 5, 8])
def test_npz_matches_np_load(tmp_path: Path, dim: int, threads: int) -> None:
    from clipdedup.db.load import read_legacy_ref

    rng = np.random.default_rng(dim + threads)
    paths = []
    for k in range(int(rng.integers(1, 40))):
        p = tmp_path / f"{k} ü.npz"
        v = rng.standard_normal(dim).astype(np.float32)
        # the original wrote savez_compressed; plain savez (stored members) is read too
        (np.savez_compressed if k % 3 else np.savez)(p, clip_embedding=v, other=v[:1])
        paths.append(str(p))
    out = _poisoned(len(paths), dim)
    assert native.read_npz_into(paths, out, threads) == []
    np.testing.assert_array_equal(out, np.stack([read_legacy_ref(p) for p in paths]))


@needs_npz
def test_npz_refusals(tmp_path: Path) -> None:
    dim = 8
    v = np.arange(dim, dtype=np.float32)
    np.savez_compressed(tmp_path / "good.npz", clip_embedding=v)
    good = (tmp_path / "good.npz").read_bytes()
    cases = {
        "nokey.npz": "no key 'clip_embedding'",
        "f64.npz": "dtype '<f8'",
        "dim.npz": "dim 9, DB holds dim 8",
        "cut.npz": "not a zip archive",
        "flipped.npz": "",  # a flipped byte in the deflate stream: damaged data or CRC
        "text.npz": "not a zip archive",
        "missing.npz": "open: No such file or directory",
    }
    np.savez_compressed(tmp_path / "nokey.npz", embedding=v)
    np.savez_compressed(tmp_path / "f64.npz", clip_embedding=v.astype(np.float64))
    np.savez_compressed(tmp_path / "dim.npz", clip_embedding=np.ones(dim + 1, np.float32))
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    data = 30 + int.from_bytes(good[26:28], "little") + int.from_bytes(good[28:30], "little")
    flipped[data + 5] ^= 0xFF  # inside the deflate stream
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    (tmp_path / "text.npz").write_text("hello")
    names = sorted(cases)
    out = _poisoned(len(names) + 1, dim)
    errors = dict(native.read_npz_into([tmp_path / n for n in [*names, "good.npz"]], out, 3))
    assert sorted(errors) == list(range(len(names)))
    for k, n in enumerate(names):
        assert errors[k].startswith(cases[n]), (n, errors[k])
        assert np.isnan(out[k]).all()
    np.testing.assert_array_equal(out[-1], v)
