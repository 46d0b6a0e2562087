// builtin:dct's check, per row (warp_check.cpp's internals): what warp_score_ref computes from one
// row alone, whichever side of a pair it is on, and a thread's cache of such tables.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "warp_check.hpp"

namespace clipdedup::warp_detail {

// What warp_score_ref computes from one row alone, whichever side of a pair it is on.
enum Stat { kMu, kSd, kCm, kCmax, kCc2, kNuHalf, kNaFull, kStats = 8 };

// One row's table (doubles): stats | half-size smoothed thumbnail, its d/dy, its d/dx (nh x nh
// each) | full-size smoothed thumbnail (n x n) | a's centred half-size window (wh x wh) | a's
// centred full-size window over its norm (w x w).
struct Layout {
    int n, m, nh, mh, w, wh;
    std::size_t half3, full, wa_half, ua_full, total;  // half3: the three half-size planes
    explicit Layout(const WarpParams& p)
        : n(p.side), m(p.margin), nh(p.side / 2), mh(p.margin / 2), w(p.side - 2 * p.margin),
          wh(p.side / 2 - p.margin) {
        half3 = kStats;
        full = half3 + 3 * sq(nh);
        wa_half = full + sq(n);
        ua_full = wa_half + sq(wh);
        total = ua_full + sq(w);
    }
    static std::size_t sq(int k) { return static_cast<std::size_t>(k) * static_cast<std::size_t>(k); }
};

struct RowScratch {
    std::vector<double> lum, tmp, half;
};

// smooth(): [1, 2, 1] / 4 along rows then columns, edges repeated; tmp is n x n.
void smooth(const double* y, int n, double* tmp, double* out);

// The centred (n0 + k, n0 + l) window of side w of an n x n image into out; returns its norm.
double centred_window(const double* img, int n, int n0, int w, double* out);

// The stats of one row (kMu .. kCc2), as warp_check.stats and grey() compute them; lum (n x n) gets
// the row's luma as doubles.
void row_stats(const WarpParams& p, std::size_t nn, const float* row, double* lum, double* t);

// The whole table of one row (Layout) into t, its stats (kMu .. kCc2) taken from `stats` (row_stats).
void precompute_row(const Layout& L, const float* row, const double* stats, double* t, RowScratch& s);

// A thread's tables of the rows it met last: rows are looked up by key (a's row i: i; b's row j:
// j when b is a, else na + j), and the least recently used one is replaced.
class RowCache {
public:
    RowCache(const Layout& L, std::size_t slots) : L_(L), keys_(slots, -1), used_(slots, 0), data_(slots * L.total) {
        scratch_.lum.resize(Layout::sq(L.n));
        scratch_.tmp.resize(Layout::sq(L.n));
        scratch_.half.resize(Layout::sq(L.nh));
    }

    // The table of row `key` (from `row` and its row_stats `stats`), never the slot of `keep`.
    const double* get(std::int64_t key, const float* row, const double* stats, const double* keep) {
        std::size_t victim = keys_.size();
        for (std::size_t k = 0; k < keys_.size(); ++k) {
            if (keys_[k] == key) {
                used_[k] = ++clock_;
                return slot(k);
            }
            if (slot(k) != keep && (victim == keys_.size() || used_[k] < used_[victim])) victim = k;
        }
        keys_[victim] = key;  // there are at least two slots, so one is not `keep`
        used_[victim] = ++clock_;
        double* t = slot(victim);
        precompute_row(L_, row, stats, t, scratch_);
        return t;
    }

private:
    double* slot(std::size_t k) { return data_.data() + k * L_.total; }

    const Layout& L_;
    std::vector<std::int64_t> keys_;
    std::vector<std::uint64_t> used_;
    std::vector<double> data_;
    RowScratch scratch_;
    std::uint64_t clock_ = 0;
};

}  // namespace clipdedup::warp_detail
