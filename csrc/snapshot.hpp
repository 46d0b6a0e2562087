// Native pieces of the packed DB snapshot: a per-row checksum and a parallel gather of rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace clipdedup {

// 64-bit checksum of one row's bytes (not cryptographic: it catches a damaged or stale file).
// Four independent multiply-rotate lanes over little-endian 64-bit words, the tail zero-padded;
// clipdedup.snapshot.row_hashes_ref is the same function in numpy.
std::uint64_t row_hash(const unsigned char* data, std::size_t nbytes);

// hashes[i] = row_hash of row i of a (rows, dim) float32 matrix.
void row_hashes(const float* mat, std::size_t rows, std::size_t dim, std::uint64_t* hashes, int threads);

struct GatherResult {
    std::string fatal;              // non-empty: the file could not be used at all
    std::vector<std::size_t> bad;   // pair indices whose bytes were short or failed their checksum
};

// For each pair k: reads row src[k] of the matrix stored at byte `data_offset` of `path` into row
// dst[k] of `out` (float32, (M, dim)), and checks it against expect[k]. Runs of consecutive rows
// are read with one pread each, straight into `out`; no other memory is allocated per row.
GatherResult gather_rows(const std::string& path, std::uint64_t data_offset, std::size_t dim,
                         const std::int64_t* src, const std::int64_t* dst, const std::uint64_t* expect,
                         std::size_t pairs, float* out, int threads);

// As gather_rows, from a file the caller has open (pread only: the descriptor's offset is not
// moved, so one descriptor serves many threads and calls).
GatherResult gather_rows_fd(int fd, std::uint64_t data_offset, std::size_t dim, const std::int64_t* src,
                            const std::int64_t* dst, const std::uint64_t* expect, std::size_t pairs, float* out,
                            int threads);

}  // namespace clipdedup
