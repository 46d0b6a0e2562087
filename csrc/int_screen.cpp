// The integer screen (see int_screen.hpp and python/clipdedup/match/screen/int_screen.py).
//
// B is packed once per call into panels of 16 columns, each k-pair of a panel holding the 16
// columns' two int16 values side by side ([panel][k/2][16][2]). A microkernel multiplies R <= 6 rows
// of A by one panel: it broadcasts a row's two int16 values of a k-pair as one int32 and multiplies
// them with the panel's pairs (vpmaddwd: two int16 x int16 products summed into int32), so the 16
// dot products of a row build up in two registers with no horizontal sums. Its epilogue compares
// them with ta[r] + tb[q] and returns a 16-bit mask per row; only set bits cost anything further.
// Threads take chunks of rows; each goes over the columns in blocks of 256 (64 KiB of packed B at
// k = 128, kept in L2 while the chunk's rows pass).
#include "int_screen.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CLIPDEDUP_X86 1
#endif

namespace clipdedup {
namespace {

constexpr int RB = 4;                          // rows per microkernel
constexpr int CB = 16;                         // columns per panel
constexpr std::int64_t PANELS_PER_BLOCK = 16;  // columns per block: 256
constexpr std::int64_t ROW_CHUNK = 48;         // rows a thread takes at a time

// masks[r] bit c: row r's dot with panel column c is >= tr[r] + tb[c].
using Micro = void (*)(const std::int16_t* const* rows, const std::int16_t* panel, std::int64_t half,
                       const std::int32_t* tr, const std::int32_t* tb, std::uint32_t* masks);

template <int R>
void micro_generic(const std::int16_t* const* rows, const std::int16_t* panel, std::int64_t half,
                   const std::int32_t* tr, const std::int32_t* tb, std::uint32_t* masks) {
    std::int32_t acc[R][CB] = {};
    for (std::int64_t kk = 0; kk < half; ++kk) {
        const std::int16_t* bk = panel + kk * 2 * CB;
        for (int r = 0; r < R; ++r) {
            const std::int32_t a0 = rows[r][2 * kk], a1 = rows[r][2 * kk + 1];
            for (int c = 0; c < CB; ++c) acc[r][c] += a0 * bk[2 * c] + a1 * bk[2 * c + 1];
        }
    }
    for (int r = 0; r < R; ++r) {
        std::uint32_t m = 0;
        for (int c = 0; c < CB; ++c)
            if (static_cast<std::int64_t>(acc[r][c]) >= static_cast<std::int64_t>(tr[r]) + tb[c]) m |= 1u << c;
        masks[r] = m;
    }
}

#ifdef CLIPDEDUP_X86
// Four rows at a time with eight named accumulators: GCC spills arrays of __m256i in this loop.
// Fewer rows point their missing ones at row 0; the driver ignores their masks.
#define CLIPDEDUP_ROW4(X) X(0) X(1) X(2) X(3)
__attribute__((target("avx2"))) void avx2_rows4(const std::int16_t* const* rows, const std::int16_t* panel,
                                                std::int64_t half, const std::int32_t* tr, const std::int32_t* tb,
                                                std::uint32_t* masks) {
#define CLIPDEDUP_ZERO(r) __m256i lo##r = _mm256_setzero_si256(), hi##r = _mm256_setzero_si256();
    CLIPDEDUP_ROW4(CLIPDEDUP_ZERO)
    const std::int16_t *a0 = rows[0], *a1 = rows[1], *a2 = rows[2], *a3 = rows[3];
    for (std::int64_t kk = 0; kk < half; ++kk) {
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + kk * 2 * CB));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + kk * 2 * CB + CB));
#define CLIPDEDUP_MAC(r)                                                         \
    {                                                                            \
        std::int32_t pair;                                                       \
        std::memcpy(&pair, a##r + 2 * kk, sizeof pair);                          \
        const __m256i a = _mm256_set1_epi32(pair);                               \
        lo##r = _mm256_add_epi32(lo##r, _mm256_madd_epi16(a, b0));               \
        hi##r = _mm256_add_epi32(hi##r, _mm256_madd_epi16(a, b1));               \
    }
        CLIPDEDUP_ROW4(CLIPDEDUP_MAC)
    }
    const __m256i tb0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb));
    const __m256i tb1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + 8));
    // below: the threshold exceeds the dot (the caller keeps every |ta + tb| < 2^31)
#define CLIPDEDUP_MASK(r)                                                                               \
    {                                                                                                   \
        const __m256i t = _mm256_set1_epi32(tr[r]);                                                     \
        const __m256i below0 = _mm256_cmpgt_epi32(_mm256_add_epi32(t, tb0), lo##r);                     \
        const __m256i below1 = _mm256_cmpgt_epi32(_mm256_add_epi32(t, tb1), hi##r);                     \
        const auto m0 = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(below0)));    \
        const auto m1 = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(below1)));    \
        masks[r] = ~(m0 | (m1 << 8)) & 0xFFFFu;                                                         \
    }
    CLIPDEDUP_ROW4(CLIPDEDUP_MASK)
#undef CLIPDEDUP_ZERO
#undef CLIPDEDUP_MAC
#undef CLIPDEDUP_MASK
}
#undef CLIPDEDUP_ROW4
#endif

struct Kernels {
    Micro f[RB + 1];  // f[R] takes R rows; a kernel of more rows may serve fewer (padded rows)
};

template <int R>
constexpr Micro generic_of() {
    return &micro_generic<R>;
}

Kernels generic_kernels() {
    return Kernels{{nullptr, generic_of<1>(), generic_of<2>(), generic_of<3>(), generic_of<4>()}};
}

// Bits c of a panel whose column col0 + c lies above row `row` (col > row), for the upper triangle.
std::uint32_t above(std::int64_t row, std::int64_t col0) {
    const std::int64_t d = row - col0;  // columns c <= d are at or below the diagonal
    if (d < 0) return 0xFFFFu;
    if (d >= CB - 1) return 0;
    return (0xFFFFu << (d + 1)) & 0xFFFFu;
}

struct Shared {
    const IntScreenArgs& s;
    const Kernels& ks;
    const std::int16_t* packed;
    const std::int32_t* tb;  // padded to whole panels
    std::int64_t panels, half;
    std::atomic<std::int64_t> next{0}, found{0};
    std::atomic<bool> stop{false};
};

void flush(Shared& sh, std::vector<std::int64_t>& hr, std::vector<std::int64_t>& hq) {
    if (hr.empty()) return;
    const auto cnt = static_cast<std::int64_t>(hr.size());
    const std::int64_t at = sh.found.fetch_add(cnt);
    const std::int64_t fit = std::max<std::int64_t>(0, std::min(cnt, sh.s.cap - at));
    std::copy(hr.begin(), hr.begin() + fit, sh.s.out_r + std::min(at, sh.s.cap));
    std::copy(hq.begin(), hq.begin() + fit, sh.s.out_q + std::min(at, sh.s.cap));
    if (at + cnt > sh.s.cap) sh.stop = true;
    hr.clear();
    hq.clear();
}

void chunk(Shared& sh, std::int64_t r0, std::int64_t r1, std::vector<std::int64_t>& hr,
           std::vector<std::int64_t>& hq) {
    const IntScreenArgs& s = sh.s;
    const std::int16_t* rows[RB];
    std::int32_t tr[RB];
    std::uint32_t masks[RB];
    // with `upper`, panels wholly at or below the diagonal of the chunk's first row are skipped
    std::int64_t first = 0;
    if (s.upper) first = std::clamp<std::int64_t>((s.row_base + r0 - s.col_base + 1) / CB, 0, sh.panels);
    for (std::int64_t pb = first; pb < sh.panels; pb += PANELS_PER_BLOCK) {
        const std::int64_t pe = std::min(sh.panels, pb + PANELS_PER_BLOCK);
        for (std::int64_t rr = r0; rr < r1; rr += RB) {
            const int R = static_cast<int>(std::min<std::int64_t>(RB, r1 - rr));
            for (int i = 0; i < RB; ++i) {
                rows[i] = s.a + (rr + (i < R ? i : 0)) * s.k;
                tr[i] = s.ta[rr + (i < R ? i : 0)];
            }
            std::int64_t p0 = pb;
            if (s.upper) p0 = std::max(p0, std::min(sh.panels, (s.row_base + rr - s.col_base + 1) / CB));
            for (std::int64_t p = p0; p < pe; ++p) {
                sh.ks.f[R](rows, sh.packed + p * sh.half * 2 * CB, sh.half, tr, sh.tb + p * CB, masks);
                const std::int64_t q0 = p * CB;
                const std::uint32_t valid = s.m - q0 >= CB ? 0xFFFFu : (1u << (s.m - q0)) - 1;
                for (int i = 0; i < R; ++i) {
                    std::uint32_t m = masks[i] & valid;
                    if (s.upper) m &= above(s.row_base + rr + i, s.col_base + q0);
                    while (m) {
                        const int c = __builtin_ctz(m);
                        m &= m - 1;
                        hr.push_back(rr + i);
                        hq.push_back(q0 + c);
                    }
                }
            }
        }
    }
}

void worker(Shared& sh) {
    std::vector<std::int64_t> hr, hq;
    const std::int64_t chunks = (sh.s.n + ROW_CHUNK - 1) / ROW_CHUNK;
    while (!sh.stop) {
        const std::int64_t c = sh.next.fetch_add(1);
        if (c >= chunks) break;
        chunk(sh, c * ROW_CHUNK, std::min(sh.s.n, (c + 1) * ROW_CHUNK), hr, hq);
        flush(sh, hr, hq);
    }
}

}  // namespace

std::vector<std::string> int_screen_isas() {
    std::vector<std::string> v;
#ifdef CLIPDEDUP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) v.emplace_back("avx2");
#endif
    v.emplace_back("generic");
    return v;
}

std::int64_t int16_screen(const IntScreenArgs& s, const std::string& isa, int threads) {
    const auto isas = int_screen_isas();
    if (std::find(isas.begin(), isas.end(), isa) == isas.end()) return -1;
    Kernels ks = generic_kernels();
#ifdef CLIPDEDUP_X86
    if (isa == "avx2") ks = Kernels{{nullptr, avx2_rows4, avx2_rows4, avx2_rows4, avx2_rows4}};
#endif
    if (s.n == 0 || s.m == 0) return 0;
    const std::int64_t half = s.k / 2, panels = (s.m + CB - 1) / CB;
    std::vector<std::int16_t> packed(static_cast<std::size_t>(panels * half * 2 * CB), 0);
    for (std::int64_t q = 0; q < s.m; ++q) {
        const std::int16_t* src = s.b + q * s.k;
        std::int16_t* dst = packed.data() + (q / CB) * half * 2 * CB + (q % CB) * 2;
        for (std::int64_t kk = 0; kk < half; ++kk) {
            dst[kk * 2 * CB] = src[2 * kk];
            dst[kk * 2 * CB + 1] = src[2 * kk + 1];
        }
    }
    std::vector<std::int32_t> tb(static_cast<std::size_t>(panels * CB), 0);
    std::copy(s.tb, s.tb + s.m, tb.begin());
    Shared sh{s, ks, packed.data(), tb.data(), panels, half};
    const std::int64_t chunks = (s.n + ROW_CHUNK - 1) / ROW_CHUNK;
    const int nt = static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(threads, chunks)));
    std::vector<std::thread> pool;
    for (int t = 1; t < nt; ++t) pool.emplace_back(worker, std::ref(sh));
    worker(sh);
    for (auto& t : pool) t.join();
    return sh.found.load();
}

}  // namespace clipdedup
