// The integer screen of clipdedup.match.screen.int_screen: exact int16 dot products of two sets of
// rows, kept where they reach a separable per-row threshold. No torch, no allocation Python frees.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace clipdedup {

// The instruction sets of the screen that this build has and this CPU runs, fastest first
// ("avx2" on x86-64 CPUs with AVX2; "generic", plain C++ the compiler vectorizes, always).
std::vector<std::string> int_screen_isas();

struct IntScreenArgs {
    const std::int16_t* a = nullptr;  // (n, k) C order
    std::int64_t n = 0;
    const std::int16_t* b = nullptr;  // (m, k) C order
    std::int64_t m = 0;
    std::int64_t k = 0;  // even
    const std::int32_t* ta = nullptr;  // (n,)
    const std::int32_t* tb = nullptr;  // (m,)
    // upper: only pairs with col_base + q > row_base + r (self-matching, each pair once)
    std::int64_t row_base = 0;
    std::int64_t col_base = 0;
    bool upper = false;
    std::int64_t* out_r = nullptr;  // (cap,)
    std::int64_t* out_q = nullptr;  // (cap,)
    std::int64_t cap = 0;
};

// Every (r, q) with sum_k a[r,k] b[q,k] >= ta[r] + tb[q], in int32 arithmetic: exact when every
// |partial dot| < 2^31 and every |ta[r] + tb[q]| < 2^31 (the caller's scale guarantees both).
// Writes the hits in any order while they fit `cap`; returns how many there are, or stops early
// and returns a number > cap once more than cap were found. Runs `threads` threads; `isa` is one of
// int_screen_isas(). Returns -1 for an unknown or unsupported isa.
std::int64_t int16_screen(const IntScreenArgs& args, const std::string& isa, int threads);

}  // namespace clipdedup
