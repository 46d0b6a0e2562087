// Reader of the original tool's .npz files (np.savez / np.savez_compressed, one array
// "clip_embedding"): the zip's central directory names the member, zlib inflates it, and the
// inner .npy goes through the same header checks as a plain .npy file.
#include "npz_reader.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>

#include "npy_reader.hpp"

#ifdef CLIPDEDUP_HAVE_ZLIB
#include <zlib.h>
#endif

namespace clipdedup {

#ifdef CLIPDEDUP_HAVE_ZLIB
bool npz_supported() { return true; }
#else
bool npz_supported() { return false; }
#endif

namespace {

// An embedding archive is a few KiB; anything this big is not one.
constexpr std::size_t kMaxNpzBytes = 64 << 20;

std::uint32_t le16(const unsigned char* p) { return p[0] | (p[1] << 8); }
std::uint32_t le32(const unsigned char* p) {
    return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
           (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}

std::string read_file(const std::string& path, std::vector<unsigned char>* buf) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return std::string("open: ") + std::strerror(errno);
    struct stat st;
    std::string err;
    if (::fstat(fd, &st) != 0) {
        err = std::string("stat: ") + std::strerror(errno);
    } else if (!S_ISREG(st.st_mode)) {
        err = "not a regular file";
    } else if (static_cast<std::size_t>(st.st_size) > kMaxNpzBytes) {
        err = "too large for an embedding archive";
    } else {
        buf->resize(static_cast<std::size_t>(st.st_size));
        std::size_t got = 0;
        while (got < buf->size()) {
            const ssize_t n = ::pread(fd, buf->data() + got, buf->size() - got, static_cast<off_t>(got));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            got += static_cast<std::size_t>(n);
        }
        if (got != buf->size()) err = "short read";
    }
    ::close(fd);
    return err;
}

struct Member {
    std::uint32_t method, crc, csize, usize, local_offset;
};

// Finds `name` in the central directory of the zip held in buf.
std::string find_member(const std::vector<unsigned char>& buf, const std::string& name, Member* m) {
    const std::size_t n = buf.size();
    if (n < 22) return "not a zip archive";
    std::size_t eocd = std::string::npos;
    for (std::size_t i = n - 22 + 1; i-- > 0 && n - i <= 22 + 65535;) {
        if (le32(&buf[i]) == 0x06054b50) {
            eocd = i;
            break;
        }
    }
    if (eocd == std::string::npos) return "not a zip archive";
    const std::size_t entries = le16(&buf[eocd + 10]);
    std::size_t p = le32(&buf[eocd + 16]);
    for (std::size_t k = 0; k < entries; ++k) {
        if (p + 46 > n || le32(&buf[p]) != 0x02014b50) return "damaged zip directory";
        const std::size_t nlen = le16(&buf[p + 28]), xlen = le16(&buf[p + 30]), clen = le16(&buf[p + 32]);
        if (p + 46 + nlen > n) return "damaged zip directory";
        if (nlen == name.size() && std::memcmp(&buf[p + 46], name.data(), nlen) == 0) {
            if (le16(&buf[p + 8]) & 1) return "encrypted zip member";
            *m = {le16(&buf[p + 10]), le32(&buf[p + 16]), le32(&buf[p + 20]), le32(&buf[p + 24]),
                  le32(&buf[p + 42])};
            if (m->csize == 0xFFFFFFFFu || m->usize == 0xFFFFFFFFu || m->local_offset == 0xFFFFFFFFu)
                return "zip64 member sizes";
            return {};
        }
        p += 46 + nlen + xlen + clen;
    }
    return "no key 'clip_embedding'";
}

std::string read_npz_one(const std::string& path, float* row, std::size_t dim, std::vector<unsigned char>* buf,
                         std::vector<unsigned char>* inner) {
#ifndef CLIPDEDUP_HAVE_ZLIB
    (void)path, (void)row, (void)dim, (void)buf, (void)inner;
    return "built without zlib";
#else
    std::string err = read_file(path, buf);
    if (!err.empty()) return err;
    Member m;
    err = find_member(*buf, "clip_embedding.npy", &m);
    if (!err.empty()) return err;
    const std::size_t lh = m.local_offset;
    if (lh + 30 > buf->size() || le32(&(*buf)[lh]) != 0x04034b50) return "damaged zip member header";
    const std::size_t data = lh + 30 + le16(&(*buf)[lh + 26]) + le16(&(*buf)[lh + 28]);
    if (data + m.csize > buf->size()) return "truncated zip member";
    inner->resize(m.usize);
    if (m.method == 0) {
        if (m.csize != m.usize) return "damaged stored zip member";
        std::memcpy(inner->data(), buf->data() + data, m.usize);
    } else if (m.method == 8) {
        z_stream z{};
        if (inflateInit2(&z, -MAX_WBITS) != Z_OK) return "zlib init failed";
        z.next_in = buf->data() + data;
        z.avail_in = m.csize;
        z.next_out = inner->data();
        z.avail_out = m.usize;
        const int rc = inflate(&z, Z_FINISH);
        const bool full = rc == Z_STREAM_END && z.total_out == m.usize;
        inflateEnd(&z);
        if (!full) return "damaged deflate data";
    } else {
        return "zip method " + std::to_string(m.method);
    }
    if (crc32(0L, inner->data(), static_cast<uInt>(inner->size())) != m.crc) return "zip CRC mismatch";
    NpyHeader h;
    err = parse_npy_header(reinterpret_cast<const char*>(inner->data()), inner->size(), &h);
    if (!err.empty()) return err;
    if (h.dim != dim) return "dim " + std::to_string(h.dim) + ", DB holds dim " + std::to_string(dim);
    if (h.data_offset + dim * sizeof(float) != inner->size()) return "bad array size in .npz";
    std::memcpy(row, inner->data() + h.data_offset, dim * sizeof(float));
    return {};
#endif
}

}  // namespace

std::vector<RowError> read_npz_rows(const std::vector<std::string>& paths, float* out, std::size_t dim,
                                    int threads, const std::int64_t* rows) {
    const std::size_t n = paths.size();
    std::atomic<std::size_t> next{0};
    std::mutex mu;
    std::vector<RowError> errors;
    auto work = [&]() {
        std::vector<unsigned char> buf, inner;
        std::vector<RowError> local;
        for (std::size_t i; (i = next.fetch_add(1)) < n;) {
            const std::size_t r = rows ? static_cast<std::size_t>(rows[i]) : i;
            std::string err = read_npz_one(paths[i], out + r * dim, dim, &buf, &inner);
            if (!err.empty()) local.push_back({i, std::move(err)});
        }
        std::lock_guard<std::mutex> lock(mu);
        for (auto& e : local) errors.push_back(std::move(e));
    };
    const std::size_t nt = std::max<std::size_t>(1, std::min<std::size_t>(threads, n));
    std::vector<std::thread> pool;
    for (std::size_t t = 1; t < nt; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    std::sort(errors.begin(), errors.end(), [](const RowError& a, const RowError& b) { return a.index < b.index; });
    return errors;
}

}  // namespace clipdedup
