// pybind11 bindings of clipdedup._native. Only python/clipdedup/native.py imports this module.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <thread>

#include "int_screen.hpp"
#include "npy_reader.hpp"
#include "npz_reader.hpp"
#include "scanner.hpp"
#include "snapshot.hpp"
#include "warp_check.hpp"

namespace py = pybind11;

namespace {

py::tuple npy_header(const std::string& path) {
    clipdedup::NpyHeader h;
    std::string err = clipdedup::read_npy_header(path, &h);
    if (!err.empty()) return py::make_tuple(py::none(), py::none(), err);
    return py::make_tuple(h.dim, h.data_offset, py::none());
}

using RowsArg = std::optional<py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>>;
using RowReader = std::vector<clipdedup::RowError> (*)(const std::vector<std::string>&, float*, std::size_t, int,
                                                       const std::int64_t*);

std::vector<std::pair<std::size_t, std::string>> read_rows_into(RowReader reader, const std::vector<std::string>& paths,
                                                                py::buffer out, int threads, RowsArg rows) {
    py::buffer_info info = out.request(/*writable=*/true);
    if (info.format != py::format_descriptor<float>::format() || info.itemsize != 4)
        throw py::type_error("out must be a float32 buffer");
    if (info.ndim != 2) throw py::value_error("out must be 2-D (N, D)");
    const auto nrows = static_cast<std::size_t>(info.shape[0]);
    const auto dim = static_cast<std::size_t>(info.shape[1]);
    const std::int64_t* row_of = nullptr;
    if (rows) {
        if (static_cast<std::size_t>(rows->size()) != paths.size())
            throw py::value_error("rows and paths differ in length");
        row_of = rows->data();
        for (std::size_t i = 0; i < paths.size(); ++i)
            if (row_of[i] < 0 || static_cast<std::size_t>(row_of[i]) >= nrows)
                throw py::index_error("row index out of range");
    } else if (nrows != paths.size()) {
        throw py::value_error("out has a row count different from len(paths)");
    }
    if (nrows > 0 && (info.strides[1] != 4 || info.strides[0] != static_cast<py::ssize_t>(dim * 4)))
        throw py::value_error("out must be C-contiguous");
    if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    std::vector<clipdedup::RowError> errors;
    {
        py::gil_scoped_release release;
        errors = reader(paths, static_cast<float*>(info.ptr), dim, threads, row_of);
    }
    std::vector<std::pair<std::size_t, std::string>> result;
    result.reserve(errors.size());
    for (auto& e : errors) result.emplace_back(e.index, std::move(e.reason));
    return result;
}

// os.fsdecode of raw name bytes: UTF-8 with surrogateescape, so any name round-trips to bytes.
py::str fsdecode(const std::string& b) {
    PyObject* s = PyUnicode_DecodeFSDefaultAndSize(b.data(), static_cast<Py_ssize_t>(b.size()));
    if (s == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(s);
}

template <typename T, typename F>
py::array_t<T> column(const clipdedup::ScanOutput& o, F get) {
    py::array_t<T> a(static_cast<py::ssize_t>(o.records.size()));
    T* p = a.mutable_data();
    for (std::size_t i = 0; i < o.records.size(); ++i) p[i] = get(o.records[i]);
    return a;
}

// The DB-index view of a scan of a DB dir: which records are embedding files (a .npy shadows the
// .npz of the same image), which are stale temp files. Indices are into o.records, ascending.
py::tuple classify_db(const clipdedup::ScanOutput& o, const std::string& tmp_mark) {
    auto ends = [](const std::string& s, const char* suf, std::size_t n) {
        return s.size() >= n && std::memcmp(s.data() + s.size() - n, suf, n) == 0;
    };
    std::unordered_map<std::string_view, std::size_t> by_image;
    std::vector<std::size_t> temps, shadowed;
    for (std::size_t i = 0; i < o.records.size(); ++i) {
        const std::string& rel = o.records[i].rel;
        const bool npy = ends(rel, ".npy", 4);
        if (npy || ends(rel, ".npz", 4)) {
            auto [it, fresh] = by_image.emplace(std::string_view(rel.data(), rel.size() - 4), i);
            if (!fresh) {
                const std::size_t loser = npy ? it->second : i;
                if (npy) it->second = i;
                shadowed.push_back(loser);
            }
        } else if (ends(rel, tmp_mark.data(), tmp_mark.size())) {
            temps.push_back(i);
        }
    }
    std::vector<std::size_t> picked;
    picked.reserve(by_image.size());
    for (const auto& kv : by_image) picked.push_back(kv.second);
    std::sort(picked.begin(), picked.end());
    std::sort(shadowed.begin(), shadowed.end());
    return py::make_tuple(py::array_t<std::int64_t>(picked.size(), reinterpret_cast<const std::int64_t*>(picked.data())),
                          temps, shadowed);
}

// fsdecode(prefix + rel minus its last `drop` bytes) of the records at `idx`.
py::list names_of(const clipdedup::ScanOutput& o,
                  py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> idx,
                  const std::string& prefix, std::size_t drop) {
    const std::int64_t* p = idx.data();
    const auto n = static_cast<std::size_t>(idx.size());
    py::list out(n);
    std::string buf;
    for (std::size_t k = 0; k < n; ++k) {
        if (p[k] < 0 || static_cast<std::size_t>(p[k]) >= o.records.size()) throw py::index_error("record index");
        const std::string& rel = o.records[static_cast<std::size_t>(p[k])].rel;
        buf.assign(prefix);
        buf.append(rel, 0, rel.size() - std::min(drop, rel.size()));
        PyList_SET_ITEM(out.ptr(), static_cast<py::ssize_t>(k), fsdecode(buf).release().ptr());
    }
    return out;
}

clipdedup::ScanOutput scan(const std::string& root, std::optional<std::vector<std::string>> suffixes,
                           const std::vector<std::string>& exclude, bool follow_symlinks, int threads,
                           bool cross_devices, const std::vector<std::uint64_t>& system_devices,
                           std::optional<py::array_t<std::int64_t>> progress) {
    clipdedup::ScanOptions opt;
    opt.cross_devices = cross_devices;
    opt.system_devices = system_devices;
    if (progress) {
        if (progress->size() < 1 || !(progress->flags() & py::array::c_style))
            throw py::value_error("progress: a writable int64 array of at least one element");
        opt.progress = progress->mutable_data();
    }
    opt.root = root;
    opt.all_files = !suffixes.has_value();
    if (suffixes) opt.suffixes = *suffixes;
    opt.exclude = exclude;
    opt.follow_symlinks = follow_symlinks;
    opt.threads = threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    py::gil_scoped_release release;
    return clipdedup::scan_tree(opt);
}

// Instances of a plain (frozen) dataclass without running its __init__: object.__new__ plus
// object.__setattr__ per field, which is all a frozen dataclass's __init__ does, minus the
// interpreter overhead that dominates a million-file scan.
py::list construct(py::handle cls, const std::vector<py::str>& names, const std::vector<py::sequence>& columns) {
    if (!PyType_Check(cls.ptr())) throw py::type_error("cls must be a class");
    if (names.size() != columns.size()) throw py::value_error("one column per name");
    const py::ssize_t n = columns.empty() ? 0 : py::len(columns[0]);
    std::vector<py::object> fast;
    for (const auto& c : columns) {
        if (static_cast<py::ssize_t>(py::len(c)) != n) throw py::value_error("columns differ in length");
        fast.push_back(py::reinterpret_steal<py::object>(PySequence_Fast(c.ptr(), "column must be a sequence")));
        if (!fast.back()) throw py::error_already_set();
    }
    auto* type = reinterpret_cast<PyTypeObject*>(cls.ptr());
    py::tuple no_args;
    // The new objects hold no cycles, but creating a million of them would trigger a dozen full
    // collections that each walk every object alive: 10x the cost of the construction itself.
    struct GcPause {
        int was = PyGC_Disable();
        ~GcPause() {
            if (was) PyGC_Enable();
        }
    } pause;
    py::list out(n);
    for (py::ssize_t i = 0; i < n; ++i) {
        PyObject* obj = PyBaseObject_Type.tp_new(type, no_args.ptr(), nullptr);
        if (obj == nullptr) throw py::error_already_set();
        py::object holder = py::reinterpret_steal<py::object>(obj);
        for (std::size_t j = 0; j < names.size(); ++j) {
            PyObject* v = PySequence_Fast_GET_ITEM(fast[j].ptr(), i);
            if (PyObject_GenericSetAttr(obj, names[j].ptr(), v) != 0) throw py::error_already_set();
        }
        PyList_SET_ITEM(out.ptr(), i, holder.release().ptr());
    }
    return out;
}

py::buffer_info matrix_info(py::buffer b, bool writable) {
    py::buffer_info info = b.request(writable);
    if (info.format != py::format_descriptor<float>::format() || info.itemsize != 4 || info.ndim != 2)
        throw py::type_error("expected a float32 (N, D) buffer");
    if (info.shape[0] > 0 && (info.strides[1] != 4 || info.strides[0] != info.shape[1] * 4))
        throw py::value_error("expected a C-contiguous buffer");
    return info;
}

py::array_t<std::uint64_t> row_hashes(py::buffer mat, int threads) {
    py::buffer_info info = matrix_info(mat, false);
    const auto rows = static_cast<std::size_t>(info.shape[0]);
    py::array_t<std::uint64_t> out(static_cast<py::ssize_t>(rows));
    std::uint64_t* p = out.mutable_data();
    {
        py::gil_scoped_release release;
        clipdedup::row_hashes(static_cast<const float*>(info.ptr), rows, static_cast<std::size_t>(info.shape[1]), p,
                              std::max(1, threads));
    }
    return out;
}

using Int64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;
using Uint64Array = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>;

// path is a str/bytes (opened here) or an int (a descriptor the caller keeps open).
py::tuple gather_rows(const py::object& path, std::uint64_t data_offset, Int64Array src, Int64Array dst,
                      Uint64Array expect, py::buffer out, int threads) {
    py::buffer_info info = matrix_info(out, true);
    const auto pairs = static_cast<std::size_t>(src.size());
    if (static_cast<std::size_t>(dst.size()) != pairs || static_cast<std::size_t>(expect.size()) != pairs)
        throw py::value_error("src, dst and expect differ in length");
    const auto rows = info.shape[0];
    const std::int64_t* d = dst.data();
    const std::int64_t* s = src.data();
    for (std::size_t k = 0; k < pairs; ++k)
        if (d[k] < 0 || d[k] >= rows || s[k] < 0) throw py::index_error("row index out of range");
    clipdedup::GatherResult res;
    const bool is_fd = py::isinstance<py::int_>(path);
    const int fd = is_fd ? path.cast<int>() : -1;
    const std::string name = is_fd ? std::string() : path.cast<std::string>();
    const std::uint64_t* e = expect.data();
    {
        py::gil_scoped_release release;
        const auto dim = static_cast<std::size_t>(info.shape[1]);
        auto* o = static_cast<float*>(info.ptr);
        res = is_fd ? clipdedup::gather_rows_fd(fd, data_offset, dim, s, d, e, pairs, o, std::max(1, threads))
                    : clipdedup::gather_rows(name, data_offset, dim, s, d, e, pairs, o, std::max(1, threads));
    }
    py::object fatal = res.fatal.empty() ? py::object(py::none()) : py::object(py::str(res.fatal));
    return py::make_tuple(fatal, res.bad);
}

// Scores of pairs (a[i], b[j]) of check rows into out (float64 (P,)); all checks before any work.
void warp_scores(py::buffer a, py::buffer b, Int64Array pairs, py::buffer out, const clipdedup::WarpParams& p,
                 int threads) {
    const std::string bad = clipdedup::warp_params_error(p);
    if (!bad.empty()) throw py::value_error(bad);
    py::buffer_info ia = matrix_info(a, false), ib = matrix_info(b, false);
    const auto dims = static_cast<py::ssize_t>(p.dims());
    if (ia.shape[1] != dims || ib.shape[1] != dims)
        throw py::value_error("a and b must have side^2 + 2 chroma^2 = " + std::to_string(dims) + " columns");
    if (pairs.ndim() != 2 || pairs.shape(1) != 2) throw py::value_error("pairs must be an int64 (P, 2) array");
    py::buffer_info io = out.request(/*writable=*/true);
    const py::ssize_t np_ = pairs.shape(0);
    if (io.format != py::format_descriptor<double>::format() || io.ndim != 1 || io.shape[0] != np_ ||
        (np_ > 0 && io.strides[0] != 8))
        throw py::value_error("out must be a contiguous writable float64 (P,) array");
    const std::int64_t* q = pairs.data();
    for (py::ssize_t k = 0; k < np_; ++k)
        if (q[2 * k] < 0 || q[2 * k] >= ia.shape[0] || q[2 * k + 1] < 0 || q[2 * k + 1] >= ib.shape[0])
            throw py::index_error("pair " + std::to_string(k) + ": row index out of range");
    py::gil_scoped_release release;
    clipdedup::warp_scores(static_cast<const float*>(ia.ptr), static_cast<std::size_t>(ia.shape[0]),
                           static_cast<const float*>(ib.ptr), static_cast<std::size_t>(ib.shape[0]), q,
                           static_cast<std::size_t>(np_), p, static_cast<double*>(io.ptr), std::max(1, threads));
}

using Int16Array = py::array_t<std::int16_t, py::array::c_style>;
using Int32Array = py::array_t<std::int32_t, py::array::c_style>;
using Int64Out = py::array_t<std::int64_t, py::array::c_style>;

// Hits of the integer screen into out_r/out_q (int64 (cap,)); returns how many there are (> cap: gave up).
std::int64_t int16_screen(Int16Array a, Int16Array b, Int32Array ta, Int32Array tb, std::int64_t row_base,
                          std::int64_t col_base, bool upper, Int64Out out_r, Int64Out out_q, const std::string& isa,
                          int threads) {
    if (a.ndim() != 2 || b.ndim() != 2 || a.shape(1) != b.shape(1))
        throw py::value_error("a and b must be int16 (N, K) and (M, K) arrays with the same K");
    if (a.shape(1) % 2) throw py::value_error("K must be even");
    if (ta.ndim() != 1 || ta.shape(0) != a.shape(0) || tb.ndim() != 1 || tb.shape(0) != b.shape(0))
        throw py::value_error("ta and tb must be int32 (N,) and (M,)");
    if (out_r.ndim() != 1 || out_q.ndim() != 1 || out_r.shape(0) != out_q.shape(0) || !out_r.writeable() ||
        !out_q.writeable())
        throw py::value_error("out_r and out_q must be writable int64 (cap,) arrays of one length");
    clipdedup::IntScreenArgs s;
    s.a = a.data();
    s.n = a.shape(0);
    s.b = b.data();
    s.m = b.shape(0);
    s.k = a.shape(1);
    s.ta = ta.data();
    s.tb = tb.data();
    s.row_base = row_base;
    s.col_base = col_base;
    s.upper = upper;
    s.out_r = out_r.mutable_data();
    s.out_q = out_q.mutable_data();
    s.cap = out_r.shape(0);
    std::int64_t found;
    {
        py::gil_scoped_release release;
        found = clipdedup::int16_screen(s, isa, std::max(1, threads));
    }
    if (found < 0) throw py::value_error("instruction set " + isa + " is not available here");
    return found;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native I/O of clip-image-deduper (private; use clipdedup.native).";
    m.def("npy_header", &npy_header, py::arg("path"),
          "(dim, data_offset, None) for a valid one-vector float32 .npy, else (None, None, reason).");
    m.def(
        "read_npy_into",
        [](const std::vector<std::string>& paths, py::buffer out, int threads, RowsArg rows) {
            return read_rows_into(&clipdedup::read_npy_rows, paths, out, threads, rows);
        },
        py::arg("paths"), py::arg("out"), py::arg("threads") = 0, py::arg("rows") = py::none(),
          "Reads .npy paths[i] into row rows[i] (default i) of out (float32, (M, D), C order) with the "
          "GIL released. Returns [(i, reason)] for the files that could not be read.");

    m.def(
        "read_npz_into",
        [](const std::vector<std::string>& paths, py::buffer out, int threads, RowsArg rows) {
            return read_rows_into(&clipdedup::read_npz_rows, paths, out, threads, rows);
        },
        py::arg("paths"), py::arg("out"), py::arg("threads") = 0, py::arg("rows") = py::none(),
        "As read_npy_into, for the original tool's .npz files (member clip_embedding.npy).");
    m.def("npz_supported", &clipdedup::npz_supported, "Whether this build reads .npz natively (zlib).");

    py::class_<clipdedup::ScanOutput>(m, "ScanOutput", "Result of scan_tree, sorted by path bytes.")
        .def("__len__", [](const clipdedup::ScanOutput& o) { return o.records.size(); })
        .def("rels",
             [](const clipdedup::ScanOutput& o) {
                 py::list out(o.records.size());
                 for (std::size_t i = 0; i < o.records.size(); ++i)
                     PyList_SET_ITEM(out.ptr(), static_cast<py::ssize_t>(i), fsdecode(o.records[i].rel).release().ptr());
                 return out;
             })
        .def("mtime_ns", [](const clipdedup::ScanOutput& o) { return column<std::int64_t>(o, [](auto& r) { return r.mtime_ns; }); })
        .def("ctime_ns", [](const clipdedup::ScanOutput& o) { return column<std::int64_t>(o, [](auto& r) { return r.ctime_ns; }); })
        .def("size", [](const clipdedup::ScanOutput& o) { return column<std::int64_t>(o, [](auto& r) { return r.size; }); })
        .def("ino", [](const clipdedup::ScanOutput& o) { return column<std::uint64_t>(o, [](auto& r) { return r.ino; }); })
        .def("unsure",
             [](const clipdedup::ScanOutput& o) {
                 std::vector<std::size_t> idx;
                 for (std::size_t i = 0; i < o.records.size(); ++i)
                     if (o.records[i].suffix_unsure) idx.push_back(i);
                 return idx;
             })
        .def("classify_db", &classify_db, py::arg("tmp_mark"),
             "(picked int64 array, temps, shadowed): record indices of the embedding files, the temp "
             "files and the .npz files a .npy shadows.")
        .def("names", &names_of, py::arg("idx"), py::arg("prefix") = "", py::arg("drop") = 0,
             "[fsdecode(prefix + rel[:-drop])] of the records at idx.")
        .def("errors", [](const clipdedup::ScanOutput& o) {
            py::list out;
            for (const auto& e : o.errors) out.append(py::make_tuple(fsdecode(e.rel), e.reason));
            return out;
        });
    m.def("scan_tree", &scan, py::arg("root"), py::arg("suffixes"), py::arg("exclude"), py::arg("follow_symlinks"),
          py::arg("threads") = 0, py::arg("cross_devices") = false,
          py::arg("system_devices") = std::vector<std::uint64_t>{}, py::arg("progress") = py::none(),
          "Walks root with threads (GIL released); suffixes: lowercase ASCII with the dot, or None for all. "
          "progress: an int64 array whose [0] the walk adds the entries it has seen to.");
    m.def("construct", &construct, py::arg("cls"), py::arg("names"), py::arg("columns"),
          "[cls instances] with attribute names[j] = columns[j][i], built without calling __init__.");
    m.def("row_hashes", &row_hashes, py::arg("mat"), py::arg("threads") = 1,
          "uint64 checksum of each row of a float32 (N, D) C-contiguous matrix.");
    m.def("gather_rows", &gather_rows, py::arg("path"), py::arg("data_offset"), py::arg("src"), py::arg("dst"),
          py::arg("expect"), py::arg("out"), py::arg("threads") = 1,
          "Reads matrix rows src[k] of the file into out[dst[k]], checking each against expect[k]. Returns "
          "(fatal reason or None, [k of the pairs that were short or failed the check]).");
    m.def("int_screen_isas", &clipdedup::int_screen_isas,
          "Instruction sets of int16_screen that this build has and this CPU runs, fastest first.");
    m.def("int16_screen", &int16_screen, py::arg("a"), py::arg("b"), py::arg("ta"), py::arg("tb"),
          py::arg("row_base"), py::arg("col_base"), py::arg("upper"), py::arg("out_r"), py::arg("out_q"),
          py::arg("isa"), py::arg("threads") = 1,
          "Pairs (r, q) with int32 dot(a[r], b[q]) >= ta[r] + tb[q] (upper: col_base + q > row_base + r) into "
          "out_r/out_q while they fit; returns how many there are (more than the capacity: it gave up). "
          "GIL released.");
    m.def(
        "warp_scores",
        [](py::buffer a, py::buffer b, Int64Array pairs, py::buffer out, int side, int margin, int chroma, int iters,
           int grid, double colourless, double sd_log, double cm_log, double mu_log, double scale_lim,
           double offset_lim, double floor, double flat, double damp, int threads) {
            const clipdedup::WarpParams p{side,   margin, chroma,    iters,      grid,  colourless, sd_log,
                                          cm_log, mu_log, scale_lim, offset_lim, floor, flat,       damp};
            warp_scores(a, b, pairs, out, p, threads);
        },
        py::arg("a"), py::arg("b"), py::arg("pairs"), py::arg("out"), py::kw_only(), py::arg("side"),
        py::arg("margin"), py::arg("chroma"), py::arg("iters"), py::arg("grid"), py::arg("colourless"),
        py::arg("sd_log"), py::arg("cm_log"), py::arg("mu_log"), py::arg("scale_lim"), py::arg("offset_lim"),
        py::arg("floor"), py::arg("flat"), py::arg("damp"), py::arg("threads") = 1,
        "out[k] = builtin:dct's check score of (a[pairs[k, 0]], b[pairs[k, 1]]) (clipdedup.match.warp_check), "
        "float64, GIL released; a, b float32 (N, dims), (M, dims) C-contiguous.");
}
