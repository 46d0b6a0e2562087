#include "warp_rows.hpp"

#include <algorithm>
#include <cmath>

namespace clipdedup::warp_detail {

// smooth(): [1, 2, 1] / 4 along rows then columns, edges repeated; tmp is n x n.
void smooth(const double* y, int n, double* tmp, double* out) {
    for (int i = 0; i < n; ++i) {
        const double* up = y + static_cast<std::size_t>(std::max(i - 1, 0)) * n;
        const double* mid = y + static_cast<std::size_t>(i) * n;
        const double* dn = y + static_cast<std::size_t>(std::min(i + 1, n - 1)) * n;
        double* t = tmp + static_cast<std::size_t>(i) * n;
#pragma omp simd
        for (int j = 0; j < n; ++j) t[j] = (up[j] + 2.0 * mid[j] + dn[j]) / 4.0;
    }
    for (int i = 0; i < n; ++i) {
        const double* t = tmp + static_cast<std::size_t>(i) * n;
        double* o = out + static_cast<std::size_t>(i) * n;
        o[0] = (t[0] + 2.0 * t[0] + t[1]) / 4.0;
#pragma omp simd
        for (int j = 1; j < n - 1; ++j) o[j] = (t[j - 1] + 2.0 * t[j] + t[j + 1]) / 4.0;
        o[n - 1] = (t[n - 2] + 2.0 * t[n - 1] + t[n - 1]) / 4.0;
    }
}

// The centred (n0 + k, n0 + l) window of side w of an n x n image into out; returns its norm.
double centred_window(const double* img, int n, int n0, int w, double* out) {
    double sum = 0.0;
    for (int i = 0; i < w; ++i) {
        const double* r = img + static_cast<std::size_t>(n0 + i) * n + n0;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < w; ++j) sum += r[j];
    }
    const double mean = sum / (static_cast<double>(w) * w);
    double ss = 0.0;
    for (int i = 0; i < w; ++i) {
        const double* r = img + static_cast<std::size_t>(n0 + i) * n + n0;
        double* o = out + static_cast<std::size_t>(i) * w;
#pragma omp simd reduction(+ : ss)
        for (int j = 0; j < w; ++j) {
            o[j] = r[j] - mean;
            ss += o[j] * o[j];
        }
    }
    return std::sqrt(ss);
}

// The stats of one row (kMu .. kCc2), as warp_check.stats and grey() compute them; lum (n x n) gets
// the row's luma as doubles.
void row_stats(const WarpParams& p, std::size_t nn, const float* row, double* lum, double* t) {
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (std::size_t k = 0; k < nn; ++k) {
        lum[k] = row[k];
        sum += lum[k];
    }
    const double mu = sum / static_cast<double>(nn);
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (std::size_t k = 0; k < nn; ++k) ss += (lum[k] - mu) * (lum[k] - mu);
    t[kMu] = mu;
    t[kSd] = std::sqrt(ss / static_cast<double>(nn));
    const float* ch = row + nn;
    const std::size_t blocks = Layout::sq(p.chroma);
    double cc2 = 0.0, cmax = 0.0;
    for (std::size_t k = 0; k < blocks; ++k) {
        const double cb = ch[2 * k], cr = ch[2 * k + 1];
        cc2 += cb * cb + cr * cr;
        cmax = std::max(cmax, std::max(std::fabs(cb), std::fabs(cr)));
    }
    t[kCm] = std::sqrt(cc2 / static_cast<double>(blocks));  // no chroma: 0 / 0, NaN, as numpy's mean
    t[kCmax] = std::isnan(cc2) ? cc2 : cmax;                // numpy's max is NaN when any value is
    t[kCc2] = cc2;
}

void precompute_row(const Layout& L, const float* row, const double* stats, double* t, RowScratch& s) {
    const int n = L.n, nh = L.nh;
    const std::size_t nn = Layout::sq(n), hh = Layout::sq(nh);
    s.lum.resize(nn);
    s.tmp.resize(nn);
    s.half.resize(hh);
    double* lum = s.lum.data();
    std::copy(stats, stats + kCc2 + 1, t);
#pragma omp simd
    for (std::size_t k = 0; k < nn; ++k) lum[k] = row[k];

    // half(): 2 x 2 means; then smooth() and np.gradient's differences (one-sided at the edges).
    for (int i = 0; i < nh; ++i) {
        const double* r0 = lum + static_cast<std::size_t>(2 * i) * n;
        const double* r1 = r0 + n;
        double* h = s.half.data() + static_cast<std::size_t>(i) * nh;
        for (int j = 0; j < nh; ++j) h[j] = (r0[2 * j] + r0[2 * j + 1] + r1[2 * j] + r1[2 * j + 1]) / 4.0;
    }
    smooth(lum, n, s.tmp.data(), t + L.full);
    double* sh = t + L.half3;
    smooth(s.half.data(), nh, s.tmp.data(), sh);
    double* gy = sh + hh;
    double* gx = gy + hh;
    for (int i = 0; i < nh; ++i) {
        const double* r = sh + static_cast<std::size_t>(i) * nh;
        const double* up = sh + static_cast<std::size_t>(std::max(i - 1, 0)) * nh;
        const double* dn = sh + static_cast<std::size_t>(std::min(i + 1, nh - 1)) * nh;
        double* oy = gy + static_cast<std::size_t>(i) * nh;
        double* ox = gx + static_cast<std::size_t>(i) * nh;
        if (i == 0 || i == nh - 1) {
            for (int j = 0; j < nh; ++j) oy[j] = dn[j] - up[j];
        } else {
#pragma omp simd
            for (int j = 0; j < nh; ++j) oy[j] = (dn[j] - up[j]) / 2.0;
        }
        ox[0] = r[1] - r[0];
#pragma omp simd
        for (int j = 1; j < nh - 1; ++j) ox[j] = (r[j + 1] - r[j - 1]) / 2.0;
        ox[nh - 1] = r[nh - 1] - r[nh - 2];
    }
    t[kNuHalf] = centred_window(sh, nh, L.mh, L.wh, t + L.wa_half);
    double* ua = t + L.ua_full;
    const double na = centred_window(t + L.full, n, L.m, L.w, ua);
    t[kNaFull] = na;
    // ua = wa / na as times 1 / na: within an ulp of the division, at a fraction of its cost.
    const double inv = na > 0.0 ? 1.0 / na : 0.0;
#pragma omp simd
    for (std::size_t k = 0; k < Layout::sq(L.w); ++k) ua[k] *= inv;
}

}  // namespace clipdedup::warp_detail
