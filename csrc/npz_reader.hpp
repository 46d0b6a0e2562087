// Parallel reader of the original tool's .npz embedding files into a caller-owned float32 matrix.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "npy_reader.hpp"

namespace clipdedup {

// Whether this build can inflate .npz members (it was built with zlib).
bool npz_supported();

// Reads member "clip_embedding.npy" of each zip paths[i] (stored or deflated, '<f4', shape (D,))
// into row rows ? rows[i] : i of out. Any file it cannot read is reported, row untouched; the
// caller may retry those in Python (np.load reads layouts this reader does not).
std::vector<RowError> read_npz_rows(const std::vector<std::string>& paths, float* out, std::size_t dim,
                                    int threads, const std::int64_t* rows = nullptr);

}  // namespace clipdedup
