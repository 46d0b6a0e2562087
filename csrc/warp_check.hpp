// Native fast path of builtin:dct's check (clipdedup.match.warp_check): the score of candidate pairs
// of check rows, float64 throughout, step for step as warp_check.warp_score_ref defines it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace clipdedup {

// The check part's shape and the definition's constants; Python's warp_check module fills them,
// so its constants stay the only spelling.
struct WarpParams {
    int side = 64;    // N: luma is N x N, N even
    int margin = 8;   // cut from each edge of a's window at full size, even, >= 2, 2 * margin < side
    int chroma = 8;   // C: chroma is 2 x C x C (Cb, Cr interleaved per block)
    int iters = 5;    // Gauss-Newton steps
    int grid = 4;     // blocks per side of the local comparison
    double colourless = 3.0, sd_log = 0.3, cm_log = 0.8, mu_log = 0.3;
    double scale_lim = 0.12, offset_lim = 0.1, floor = 0.02, flat = 1e-6, damp = 1e-6;

    std::size_t dims() const {
        return static_cast<std::size_t>(side) * side + 2 * static_cast<std::size_t>(chroma) * chroma;
    }
};

// Empty when p describes a shape the definition can score, else why not.
std::string warp_params_error(const WarpParams& p);

// out[k] = score of (row pairs[2k] of a, row pairs[2k + 1] of b), a: (na, dims) and b: (nb, dims)
// float32 C-contiguous. The caller has checked p (warp_params_error) and every index (in range).
// b may be a itself; the per-row precomputation is then shared. Pairs go to the threads in blocks
// of consecutive pairs; each thread keeps the precomputed tables of the last rows it met (at most
// 16, and under ~64 MB over all threads), so pairs sorted by their first row reuse its table.
void warp_scores(const float* a, std::size_t na, const float* b, std::size_t nb, const std::int64_t* pairs,
                 std::size_t npairs, const WarpParams& p, double* out, int threads);

}  // namespace clipdedup
