#include "warp_check.hpp"

#include "warp_rows.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <system_error>
#include <thread>
#include <vector>

namespace clipdedup {
namespace {

using namespace warp_detail;

// Each thread keeps the tables of the last few rows it met (least recently used out): up to
// kRowsPerThread of them within kTableBytes over all threads (small enough to stay in cache), at
// least two; where two rows per thread would pass kMaxBytes, fewer threads run.
constexpr std::size_t kTableBytes = 16u << 20;
constexpr std::size_t kMaxBytes = 64u << 20;
constexpr std::size_t kRowsPerThread = 16;

struct PairScratch {
    std::vector<int> y0, x0;
    std::vector<double> u, fy, fx, gy, gx, hrows, bw, by, bx;
};

// sample()'s cells along one axis of the grid s * (k - c) + c + o, k = m .. m + w - 1: cell i0,
// weight f of cell + 1 and g = 1 - f of the cell.
void grid_axis(double s, double o, double c, int m, int w, int n, int* i0, double* f, double* g) {
    for (int k = 0; k < w; ++k) {
        double t = s * (static_cast<double>(m + k) - c) + c + o;
        t = std::min(std::max(t, 0.0), n - 1.0);
        if (std::isnan(t)) t = 0.0;  // unreachable for rows that pass the gates; keeps the cell in range
        const int cell = std::min(static_cast<int>(std::floor(t)), n - 2);
        i0[k] = cell;
        f[k] = t - cell;
        g[k] = 1.0 - f[k];
    }
}

// Bilinear samples of `planes` n x n planes (plane q at img + q n^2) at rows y0/fy x columns
// x0/fx into outs[q] (w x w each), with sample()'s arithmetic: the two rows of a cell are
// interpolated along x first, then along y.
template <int planes>
void sample_grid(const double* img, int n, const PairScratch& s, int w, double* hrows, double* const* outs) {
    const auto [lo, hi] = std::minmax_element(s.y0.begin(), s.y0.begin() + w);
    const int r0 = *lo, r1 = *hi + 1;
    const std::size_t rows = static_cast<std::size_t>(r1 - r0 + 1), nn = static_cast<std::size_t>(n) * n;
    const int* x0 = s.x0.data();
    const double* fx = s.fx.data();
    const double* gx = s.gx.data();
    for (int r = r0; r <= r1; ++r) {
        const double* src = img + static_cast<std::size_t>(r) * n;
        double* h = hrows + static_cast<std::size_t>(r - r0) * w;
        for (int k = 0; k < w; ++k) {
            const double* c = src + x0[k];
            for (int q = 0; q < planes; ++q) h[q * rows * w + k] = c[q * nn] * gx[k] + c[q * nn + 1] * fx[k];
        }
    }
    for (int q = 0; q < planes; ++q) {
        const double* hq = hrows + q * rows * w;
        for (int i = 0; i < w; ++i) {
            const double* h0 = hq + static_cast<std::size_t>(s.y0[i] - r0) * w;
            const double* h1 = h0 + w;
            const double fy = s.fy[i], gy = s.gy[i];
            double* oi = outs[q] + static_cast<std::size_t>(i) * w;
#pragma omp simd
            for (int k = 0; k < w; ++k) oi[k] = h0[k] * gy + h1[k] * fy;
        }
    }
}

// Solves a x = b (6 x 6) by Gaussian elimination with partial pivoting; false when a pivot is 0.
bool solve6(double a[6][6], double b[6], double x[6]) {
    for (int k = 0; k < 6; ++k) {
        int piv = k;
        for (int i = k + 1; i < 6; ++i)
            if (std::fabs(a[i][k]) > std::fabs(a[piv][k])) piv = i;
        if (!(a[piv][k] != 0.0)) return false;
        if (piv != k) {
            std::swap(a[piv], a[k]);
            std::swap(b[piv], b[k]);
        }
        for (int i = k + 1; i < 6; ++i) {
            const double l = a[i][k] / a[k][k];
            for (int j = k + 1; j < 6; ++j) a[i][j] -= l * a[k][j];
            b[i] -= l * b[k];
        }
    }
    for (int k = 5; k >= 0; --k) {
        double v = b[k];
        for (int j = k + 1; j < 6; ++j) v -= a[k][j] * x[j];
        x[k] = v / a[k][k];
    }
    return true;
}

double clamp(double v, double lo, double hi) { return std::min(std::max(v, lo), hi); }

// Whole-pixel start: the shift of b's window within +-1 that correlates best with a's (zncc).
void integer_start(const Layout& L, const WarpParams& p, const double* A, const double* B, double* oy,
                   double* ox) {
    const int nh = L.nh, m = L.mh, w = L.wh;
    const double* wa = A + L.wa_half;
    const double nu = A[kNuHalf];
    const double cnt = static_cast<double>(w) * w;
    double best = -2.0;
    for (int dy = -1; dy <= 1; ++dy)
        for (int dx = -1; dx <= 1; ++dx) {
            const double* b0 = B + L.half3 + static_cast<std::size_t>(m + dy) * nh + m + dx;
            double sum = 0.0;
            for (int i = 0; i < w; ++i) {
                const double* r = b0 + static_cast<std::size_t>(i) * nh;
#pragma omp simd reduction(+ : sum)
                for (int j = 0; j < w; ++j) sum += r[j];
            }
            const double mean = sum / cnt;
            double vv = 0.0, uv = 0.0;
            for (int i = 0; i < w; ++i) {
                const double* r = b0 + static_cast<std::size_t>(i) * nh;
                const double* ur = wa + static_cast<std::size_t>(i) * w;
#pragma omp simd reduction(+ : vv, uv)
                for (int j = 0; j < w; ++j) {
                    const double v = r[j] - mean;
                    vv += v * v;
                    uv += ur[j] * v;
                }
            }
            const double nv = std::sqrt(vv);
            double z;
            if (nu <= p.flat || nv <= p.flat)
                z = (nu <= p.flat && nv <= p.flat) ? 1.0 : 0.0;
            else
                z = uv / (nu * nv);
            if (z > best) {
                best = z;
                *oy = dy;
                *ox = dx;
            }
        }
}

// The sums behind J^T J and J^T r of one Gauss-Newton step, J = [g by uy, g by, g bx ux, g bx,
// bw, 1] and r = wa - g (bw - mean): per row of the window sums over x, then weighted by uy.
enum Sum { YY, YX, YXU, XX, XXU, XUXU, YW, XW, XUW, WW, Y, X, XU, W, YR, XR, XUR, WR, R, kSums };

// tot[q] = sum over the window of term q (y = by, x = bx, u = ux, w = bw, r), uyt[q] = the same
// weighted by uy; *uy2yy = sum of uy^2 by^2.
void normal_sums(const double* by, const double* bx, const double* bw, const double* wa, const double* u, int w,
                 double g, double mean, double* tot, double* uyt, double* uy2yy) {
    for (int i = 0; i < w; ++i) {
        const std::size_t o = static_cast<std::size_t>(i) * w;
        double yy = 0, yx = 0, yxu = 0, xx = 0, xxu = 0, xuxu = 0, yw = 0, xw = 0, xuw = 0, ww = 0;
        double sy = 0, sx = 0, sxu = 0, sw = 0, yr = 0, xr = 0, xur = 0, wr = 0, sr = 0;
#pragma omp simd reduction(+ : yy, yx, yxu, xx, xxu, xuxu, yw, xw, xuw, ww, sy, sx, sxu, sw, yr, xr, xur, wr, sr)
        for (int k = 0; k < w; ++k) {
            const double y = by[o + k], x = bx[o + k], b = bw[o + k];
            const double xu = x * u[k], r = wa[o + k] - g * (b - mean);
            yy += y * y, yx += y * x, yxu += y * xu, xx += x * x, xxu += x * xu, xuxu += xu * xu;
            yw += y * b, xw += x * b, xuw += xu * b, ww += b * b;
            sy += y, sx += x, sxu += xu, sw += b;
            yr += y * r, xr += x * r, xur += xu * r, wr += b * r, sr += r;
        }
        const double row[kSums] = {yy, yx, yxu, xx, xxu, xuxu, yw, xw, xuw, ww, sy, sx, sxu, sw, yr, xr, xur, wr, sr};
        const double uy = u[i];
        for (int q = 0; q < kSums; ++q) {
            tot[q] += row[q];
            uyt[q] += uy * row[q];
        }
        *uy2yy += uy * uy * yy;
    }
}

// Step 3 (warp_check.align) on the half-size tables: (sy, oy, sx, ox).
void align(const Layout& L, const WarpParams& p, const double* A, const double* B, PairScratch& s, double* warp) {
    const int n = L.nh, m = L.mh, w = L.wh;
    const std::size_t ww = Layout::sq(w);
    const double c = (n - 1) / 2.0;
    double oy = 0.0, ox = 0.0;
    integer_start(L, p, A, B, &oy, &ox);
    const double* wa = A + L.wa_half;
    double sy = 1.0, sx = 1.0;
    const double lim = p.offset_lim * n;
    double* outs[3] = {s.bw.data(), s.by.data(), s.bx.data()};
    for (int it = 0; it < p.iters; ++it) {
        grid_axis(sy, oy, c, m, w, n, s.y0.data(), s.fy.data(), s.gy.data());
        grid_axis(sx, ox, c, m, w, n, s.x0.data(), s.fx.data(), s.gx.data());
        sample_grid<3>(B + L.half3, n, s, w, s.hrows.data(), outs);
        const double* bw = outs[0];
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (std::size_t k = 0; k < ww; ++k) sum += bw[k];
        const double mean = sum / static_cast<double>(ww);
        double num = 0.0, den = 0.0;
#pragma omp simd reduction(+ : num, den)
        for (std::size_t k = 0; k < ww; ++k) {
            const double bc = bw[k] - mean;
            num += wa[k] * bc;
            den += bc * bc;
        }
        const double g = num / std::max(den, 1e-12);
        // J = [g by uy, g by, g bx ux, g bx, bw, 1], r = wa - g (bw - mean): J^T J and J^T r from
        // sums per row of the window, g and g^2 applied at the end.
        double t[kSums] = {}, ut[kSums] = {}, uy2yy = 0.0;
        normal_sums(outs[1], outs[2], bw, wa, s.u.data(), w, g, mean, t, ut, &uy2yy);
        const double g2 = g * g;
        double a[6][6] = {
            {g2 * uy2yy, g2 * ut[YY], g2 * ut[YXU], g2 * ut[YX], g * ut[YW], g * ut[Y]},
            {0, g2 * t[YY], g2 * t[YXU], g2 * t[YX], g * t[YW], g * t[Y]},
            {0, 0, g2 * t[XUXU], g2 * t[XXU], g * t[XUW], g * t[XU]},
            {0, 0, 0, g2 * t[XX], g * t[XW], g * t[X]},
            {0, 0, 0, 0, t[WW], t[W]},
            {0, 0, 0, 0, 0, static_cast<double>(ww)},
        };
        for (int i = 0; i < 6; ++i) {
            a[i][i] += p.damp;
            for (int j = 0; j < i; ++j) a[i][j] = a[j][i];
        }
        double rhs[6] = {g * ut[YR], g * t[YR], g * t[XUR], g * t[XR], t[WR], t[R]};
        double step[6];
        if (!solve6(a, rhs, step)) break;  // numpy would raise; J^T J + damp I is positive definite
        sy = clamp(sy + step[0], 1.0 - p.scale_lim, 1.0 + p.scale_lim);
        oy = clamp(oy + step[1], -lim, lim);
        sx = clamp(sx + step[2], 1.0 - p.scale_lim, 1.0 + p.scale_lim);
        ox = clamp(ox + step[3], -lim, lim);
    }
    warp[0] = sy, warp[1] = oy, warp[2] = sx, warp[3] = ox;
}

// Step 4 (warp_check.local_term) at full size, the warp's offsets already in full-size pixels.
double local_term(const Layout& L, const WarpParams& p, const double* A, const double* B, const double* warp,
                  PairScratch& s) {
    const int n = L.n, m = L.m, w = L.w;
    const std::size_t ww = Layout::sq(w);
    const double c = (n - 1) / 2.0;
    grid_axis(warp[0], warp[1], c, m, w, n, s.y0.data(), s.fy.data(), s.gy.data());
    grid_axis(warp[2], warp[3], c, m, w, n, s.x0.data(), s.fx.data(), s.gx.data());
    double* wb = s.bw.data();
    sample_grid<1>(B + L.full, n, s, w, s.hrows.data(), &wb);
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (std::size_t k = 0; k < ww; ++k) sum += wb[k];
    const double mean = sum / static_cast<double>(ww);
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (std::size_t k = 0; k < ww; ++k) {
        wb[k] -= mean;
        ss += wb[k] * wb[k];
    }
    const double na = A[kNaFull], nb = std::sqrt(ss);
    if (na <= p.flat || nb <= p.flat) return (na <= p.flat && nb <= p.flat) ? 1.0 : 0.0;
    const double inv = 1.0 / nb;  // as ua: within an ulp of wb / nb
#pragma omp simd
    for (std::size_t k = 0; k < ww; ++k) wb[k] *= inv;
    const double* ua = A + L.ua_full;
    const int k = w / p.grid;
    double loc = 0.0;
    for (int bi = 0; bi < p.grid; ++bi)
        for (int bj = 0; bj < p.grid; ++bj) {
            double e = 0.0, sig = 0.0;
            for (int i = bi * k; i < (bi + 1) * k; ++i) {
                const double* ar = ua + static_cast<std::size_t>(i) * w + bj * k;
                const double* br = wb + static_cast<std::size_t>(i) * w + bj * k;
#pragma omp simd reduction(+ : e, sig)
                for (int j = 0; j < k; ++j) {
                    const double d = ar[j] - br[j];
                    e += d * d;
                    sig += ar[j] * ar[j] + br[j] * br[j];
                }
            }
            const double v = e / (sig / 2.0 + p.floor);
            if (v > loc) loc = v;
        }
    return 1.0 - loc;
}

bool gate(double x, double y, double add, double lim) { return std::fabs(std::log((x + add) / (y + add))) <= lim; }

// The gates of warp_check.gates_pass on two rows' stats.
bool gates_pass(const WarpParams& p, const double* A, const double* B) {
    const bool either_grey = A[kCmax] < p.colourless || B[kCmax] < p.colourless;
    return gate(A[kSd], B[kSd], 1.0, p.sd_log) && (either_grey || gate(A[kCm], B[kCm], 2.0, p.cm_log)) &&
           gate(A[kMu], B[kMu], 8.0, p.mu_log);
}

double score_pair(const Layout& L, const WarpParams& p, const double* A, const double* B, const float* ca,
                  const float* cb, PairScratch& s) {
    // grey: no chroma block reaches `colourless`; then the colour gate and term stand aside.
    const bool either_grey = A[kCmax] < p.colourless || B[kCmax] < p.colourless;
    if (!gates_pass(p, A, B)) return -1.0;
    double warp[4];
    align(L, p, A, B, s, warp);
    warp[1] *= 2.0;
    warp[3] *= 2.0;
    const double luma = local_term(L, p, A, B, warp, s);
    double colour = 1.0;
    if (!either_grey) {
        const std::size_t nc = 2 * Layout::sq(p.chroma);
        double dot = 0.0;
        for (std::size_t k = 0; k < nc; ++k) dot += static_cast<double>(ca[k]) * static_cast<double>(cb[k]);
        colour = dot / std::sqrt(A[kCc2] * B[kCc2]);
    }
    return colour < luma ? colour : luma;
}

void init_scratch(const Layout& L, PairScratch& s) {
    const int wmax = std::max(L.w, L.wh);
    s.y0.resize(wmax);
    s.x0.resize(wmax);
    s.fy.resize(wmax);
    s.fx.resize(wmax);
    s.gy.resize(wmax);
    s.gx.resize(wmax);
    s.u.resize(L.wh);
    const double c = (L.nh - 1) / 2.0;
    for (int k = 0; k < L.wh; ++k) s.u[k] = static_cast<double>(L.mh + k) - c;
    s.hrows.resize(std::max(static_cast<std::size_t>(L.n) * L.w, 3 * static_cast<std::size_t>(L.nh) * L.wh));
    s.bw.resize(std::max(Layout::sq(L.w), Layout::sq(L.wh)));
    s.by.resize(Layout::sq(L.wh));
    s.bx.resize(Layout::sq(L.wh));
}

// Runs fn(t) for t = 0 .. nt - 1, t = 0 on this thread; where no more threads can be had, the ones
// running share the work out (fn takes work from a shared counter).
void run_threads(std::size_t nt, const std::function<void(std::size_t)>& fn) {
    std::vector<std::thread> pool;
    try {
        for (std::size_t t = 1; t < nt; ++t) pool.emplace_back(fn, t);
    } catch (const std::system_error&) {
    }
    fn(0);
    for (auto& t : pool) t.join();
}

}  // namespace

std::string warp_params_error(const WarpParams& p) {
    if (p.side < 4 || p.side % 2 != 0) return "side must be even and at least 4";
    if (p.margin < 2 || p.margin % 2 != 0) return "margin must be even and at least 2";
    if (2 * p.margin >= p.side) return "margin must leave a window: 2 * margin < side";
    if (p.side > 1024 || p.chroma < 0 || p.chroma > 1024) return "side and chroma must be at most 1024";
    if (p.iters < 0 || p.grid < 1) return "iters must be >= 0 and grid >= 1";
    return {};
}

void warp_scores(const float* a, std::size_t na, const float* b, std::size_t nb, const std::int64_t* pairs,
                 std::size_t npairs, const WarpParams& p, double* out, int threads) {
    if (npairs == 0) return;
    const Layout L(p);
    const std::size_t dims = p.dims(), nn = Layout::sq(p.side);
    const bool same = a == b && na == nb;
    // Blocks of consecutive pairs keep a thread on the rows that sorted pairs share.
    constexpr std::size_t kBlock = 64;
    std::size_t nt = std::min<std::size_t>(std::max(1, threads), (npairs + kBlock - 1) / kBlock);
    const std::size_t row_bytes = L.total * sizeof(double);
    nt = std::min(nt, std::max<std::size_t>(1, kMaxBytes / (3 * row_bytes)));  // 2 slots + scratch
    const std::size_t slots = std::max<std::size_t>(2, std::min(kRowsPerThread, kTableBytes / nt / row_bytes));
    struct Worker {
        RowCache cache;
        PairScratch s;
        Worker(const Layout& L, std::size_t slots) : cache(L, slots) { init_scratch(L, s); }
    };
    std::vector<Worker> workers;  // allocated here, so that running out of memory raises, not aborts
    workers.reserve(nt);
    for (std::size_t t = 0; t < nt; ++t) workers.emplace_back(L, slots);
    // Every row's stats first: most candidates of a loose screen fail a gate, and those need no table.
    const std::size_t nrows = same ? na : na + nb;
    std::vector<double> stats(nrows * kStats);
    std::vector<char> used(nrows, 0);  // only the rows some pair names
    for (std::size_t k = 0; k < npairs; ++k) {
        used[static_cast<std::size_t>(pairs[2 * k])] = 1;
        used[static_cast<std::size_t>(pairs[2 * k + 1]) + (same ? 0 : na)] = 1;
    }
    std::atomic<std::size_t> next_row{0};
    auto stat_rows = [&](std::vector<double>& lum) {
        constexpr std::size_t kRowBlock = 256;
        for (std::size_t lo; (lo = next_row.fetch_add(kRowBlock)) < nrows;)
            for (std::size_t r = lo; r < std::min(nrows, lo + kRowBlock); ++r)
                if (used[r]) row_stats(p, nn, r < na ? a + r * dims : b + (r - na) * dims, lum.data(), stats.data() + r * kStats);
    };
    std::atomic<std::size_t> next{0};
    auto work = [&](Worker& w) {
        for (std::size_t lo; (lo = next.fetch_add(kBlock)) < npairs;)
            for (std::size_t k = lo; k < std::min(npairs, lo + kBlock); ++k) {
                const auto i = static_cast<std::size_t>(pairs[2 * k]), j = static_cast<std::size_t>(pairs[2 * k + 1]);
                const auto kb = static_cast<std::int64_t>(same ? j : na + j);
                const double* sa = stats.data() + i * kStats;
                const double* sb = stats.data() + static_cast<std::size_t>(kb) * kStats;
                if (!gates_pass(p, sa, sb)) {
                    out[k] = -1.0;
                    continue;
                }
                const float* ra = a + i * dims;
                const float* rb = b + j * dims;
                const double* A = w.cache.get(static_cast<std::int64_t>(i), ra, sa, nullptr);
                const double* B = w.cache.get(kb, rb, sb, A);
                out[k] = score_pair(L, p, A, B, ra + nn, rb + nn, w.s);
            }
    };
    run_threads(nt, [&](std::size_t) {
        std::vector<double> lum(nn);
        stat_rows(lum);
    });
    run_threads(nt, [&](std::size_t t) { work(workers[t]); });
}

}  // namespace clipdedup
