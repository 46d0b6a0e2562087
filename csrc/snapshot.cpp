#include "snapshot.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>

namespace clipdedup {
namespace {

constexpr std::uint64_t kMul1 = 0x9E3779B97F4A7C15ULL;
constexpr std::uint64_t kMul2 = 0xC2B2AE3D27D4EB4FULL;
// At most this many bytes per pread: big enough for full-speed copies, small enough to share
// a snapshot's rows among the threads.
constexpr std::size_t kRunBytes = 1 << 20;

inline std::uint64_t rotl(std::uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

inline std::uint64_t load_le64(const unsigned char* p) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);  // x86-64 and aarch64 are little-endian, like the file
    return w;
}

struct Run {
    std::size_t first;  // index of its first pair
    std::size_t count;
};

}  // namespace

std::uint64_t row_hash(const unsigned char* data, std::size_t nbytes) {
    std::uint64_t h[4] = {kMul1 ^ nbytes, kMul2 ^ nbytes, kMul1 + nbytes, kMul2 - nbytes};
    const std::size_t words = nbytes / 8;
    std::size_t i = 0;
    for (; i + 4 <= words; i += 4) {
        for (int l = 0; l < 4; ++l) h[l] = rotl(h[l] ^ load_le64(data + 8 * (i + l)), 31) * kMul1;
    }
    for (; i < words; ++i) h[i & 3] = rotl(h[i & 3] ^ load_le64(data + 8 * i), 31) * kMul1;
    if (nbytes % 8) {
        unsigned char tail[8] = {0};
        std::memcpy(tail, data + 8 * words, nbytes % 8);
        h[words & 3] = rotl(h[words & 3] ^ load_le64(tail), 31) * kMul1;
    }
    std::uint64_t x = nbytes;
    for (int l = 0; l < 4; ++l) x = rotl(x ^ h[l], 27) * kMul2;
    return x ^ (x >> 29);
}

void row_hashes(const float* mat, std::size_t rows, std::size_t dim, std::uint64_t* hashes, int threads) {
    const std::size_t nbytes = dim * sizeof(float);
    const auto* base = reinterpret_cast<const unsigned char*>(mat);
    const std::size_t nt = std::max<std::size_t>(1, std::min<std::size_t>(threads, rows / 256 + 1));
    auto part = [&](std::size_t t) {
        for (std::size_t r = rows * t / nt; r < rows * (t + 1) / nt; ++r) hashes[r] = row_hash(base + r * nbytes, nbytes);
    };
    std::vector<std::thread> pool;
    for (std::size_t t = 1; t < nt; ++t) pool.emplace_back(part, t);
    part(0);
    for (auto& t : pool) t.join();
}

GatherResult gather_rows(const std::string& path, std::uint64_t data_offset, std::size_t dim,
                         const std::int64_t* src, const std::int64_t* dst, const std::uint64_t* expect,
                         std::size_t pairs, float* out, int threads) {
    if (pairs == 0) return GatherResult{};
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        GatherResult res;
        res.fatal = std::string("open: ") + std::strerror(errno);
        return res;
    }
    GatherResult res = gather_rows_fd(fd, data_offset, dim, src, dst, expect, pairs, out, threads);
    ::close(fd);
    return res;
}

GatherResult gather_rows_fd(int fd, std::uint64_t data_offset, std::size_t dim, const std::int64_t* src,
                            const std::int64_t* dst, const std::uint64_t* expect, std::size_t pairs, float* out,
                            int threads) {
    GatherResult res;
    if (pairs == 0) return res;
    const std::size_t row_bytes = dim * sizeof(float);
    const std::size_t max_rows = std::max<std::size_t>(1, kRunBytes / std::max<std::size_t>(1, row_bytes));
    std::vector<Run> runs;
    for (std::size_t k = 0; k < pairs;) {
        std::size_t n = 1;
        while (k + n < pairs && n < max_rows && src[k + n] == src[k] + static_cast<std::int64_t>(n) &&
               dst[k + n] == dst[k] + static_cast<std::int64_t>(n))
            ++n;
        runs.push_back({k, n});
        k += n;
    }
    std::atomic<std::size_t> next{0};
    std::mutex mu;
    auto work = [&]() {
        std::vector<std::size_t> bad;
        for (std::size_t r; (r = next.fetch_add(1)) < runs.size();) {
            const Run run = runs[r];
            auto* dest = reinterpret_cast<unsigned char*>(out + static_cast<std::size_t>(dst[run.first]) * dim);
            const std::size_t want = run.count * row_bytes;
            const auto offset = static_cast<off_t>(data_offset + static_cast<std::uint64_t>(src[run.first]) * row_bytes);
            std::size_t got = 0;
            while (got < want) {
                const ssize_t n = ::pread(fd, dest + got, want - got, offset + static_cast<off_t>(got));
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) break;
                got += static_cast<std::size_t>(n);
            }
            for (std::size_t i = 0; i < run.count; ++i) {
                const std::size_t k = run.first + i;
                if ((i + 1) * row_bytes > got || row_hash(dest + i * row_bytes, row_bytes) != expect[k])
                    bad.push_back(k);
            }
        }
        std::lock_guard<std::mutex> lock(mu);
        res.bad.insert(res.bad.end(), bad.begin(), bad.end());
    };
    const std::size_t nt = std::max<std::size_t>(1, std::min<std::size_t>(threads, runs.size()));
    std::vector<std::thread> pool;
    for (std::size_t t = 1; t < nt; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    std::sort(res.bad.begin(), res.bad.end());
    return res;
}

}  // namespace clipdedup
