// Parallel reader of one-vector .npy files into a caller-owned float32 matrix.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace clipdedup {

struct NpyHeader {
    std::size_t dim = 0;          // number of float32 values in the file
    std::size_t data_offset = 0;  // byte offset of the first value
};

// Parses and validates the header at the start of `bytes` (size `n`).
// Accepts dtype '<f4', shape (D,) or (1, D); any other layout is an error.
// Returns an empty string on success, else a one-line reason.
std::string parse_npy_header(const char* bytes, std::size_t n, NpyHeader* out);

// Reads header only. Empty string on success, else the reason.
std::string read_npy_header(const std::string& path, NpyHeader* out);

struct RowError {
    std::size_t index;
    std::string reason;
};

// Reads paths[i] into row r = rows ? rows[i] : i of out, i.e. out[r * dim, (r + 1) * dim), using
// `threads` threads. A file whose header or size does not match is reported in the result (by i)
// and its row is left untouched; nothing is allocated on the caller's behalf.
std::vector<RowError> read_npy_rows(const std::vector<std::string>& paths, float* out,
                                    std::size_t dim, int threads, const std::int64_t* rows = nullptr);

}  // namespace clipdedup
