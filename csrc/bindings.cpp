// pybind11 bindings of clipdedup._native. Only python/clipdedup/native.py imports this module.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <thread>

#include "npy_reader.hpp"

namespace py = pybind11;

namespace {

py::tuple npy_header(const std::string& path) {
    clipdedup::NpyHeader h;
    std::string err = clipdedup::read_npy_header(path, &h);
    if (!err.empty()) return py::make_tuple(py::none(), py::none(), err);
    return py::make_tuple(h.dim, h.data_offset, py::none());
}

std::vector<std::pair<std::size_t, std::string>> read_npy_into(
    const std::vector<std::string>& paths, py::buffer out, int threads) {
    py::buffer_info info = out.request(/*writable=*/true);
    if (info.format != py::format_descriptor<float>::format() || info.itemsize != 4)
        throw py::type_error("out must be a float32 buffer");
    if (info.ndim != 2) throw py::value_error("out must be 2-D (N, D)");
    const auto rows = static_cast<std::size_t>(info.shape[0]);
    const auto dim = static_cast<std::size_t>(info.shape[1]);
    if (rows != paths.size()) throw py::value_error("out has a row count different from len(paths)");
    if (rows > 0 && (info.strides[1] != 4 || info.strides[0] != static_cast<py::ssize_t>(dim * 4)))
        throw py::value_error("out must be C-contiguous");
    if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    std::vector<clipdedup::RowError> errors;
    {
        py::gil_scoped_release release;
        errors = clipdedup::read_npy_rows(paths, static_cast<float*>(info.ptr), dim, threads);
    }
    std::vector<std::pair<std::size_t, std::string>> result;
    result.reserve(errors.size());
    for (auto& e : errors) result.emplace_back(e.index, std::move(e.reason));
    return result;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native I/O of clip-image-deduper (private; use clipdedup.native).";
    m.def("npy_header", &npy_header, py::arg("path"),
          "(dim, data_offset, None) for a valid one-vector float32 .npy, else (None, None, reason).");
    m.def("read_npy_into", &read_npy_into, py::arg("paths"), py::arg("out"), py::arg("threads") = 0,
          "Reads each .npy of paths into the matching row of out (float32, (N, D), C order) with the "
          "GIL released. Returns [(row, reason)] for the files that could not be read.");
}
