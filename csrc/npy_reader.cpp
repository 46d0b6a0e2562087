#include "npy_reader.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>

namespace clipdedup {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr std::size_t kMagicLen = 6;
// Headers written by numpy are padded to 64 bytes; 4 KiB covers any sane one.
constexpr std::size_t kHeaderProbe = 4096;

// Value of `key` in a numpy header dict, e.g. "'<f4'" or "(512,)"; empty if absent.
std::string dict_value(const std::string& dict, const std::string& key) {
    const std::string quoted = "'" + key + "'";
    std::size_t pos = dict.find(quoted);
    if (pos == std::string::npos) return {};
    pos = dict.find(':', pos + quoted.size());
    if (pos == std::string::npos) return {};
    ++pos;
    while (pos < dict.size() && dict[pos] == ' ') ++pos;
    if (pos >= dict.size()) return {};
    std::size_t end;
    if (dict[pos] == '(') {
        end = dict.find(')', pos);
        if (end == std::string::npos) return {};
        ++end;
    } else if (dict[pos] == '\'') {
        end = dict.find('\'', pos + 1);
        if (end == std::string::npos) return {};
        ++end;
    } else {
        end = dict.find_first_of(",}", pos);
        if (end == std::string::npos) return {};
    }
    return dict.substr(pos, end - pos);
}

// Parses "(512,)", "(1, 512)" into dimensions; false on anything else.
bool parse_shape(const std::string& s, std::vector<std::size_t>* dims) {
    dims->clear();
    if (s.size() < 2 || s.front() != '(' || s.back() != ')') return false;
    std::size_t i = 1;
    while (i < s.size() - 1) {
        while (i < s.size() - 1 && (s[i] == ' ' || s[i] == ',')) ++i;
        if (i >= s.size() - 1) break;
        if (s[i] < '0' || s[i] > '9') return false;
        std::size_t v = 0;
        while (i < s.size() - 1 && s[i] >= '0' && s[i] <= '9') {
            v = v * 10 + static_cast<std::size_t>(s[i] - '0');
            if (v > (std::size_t(1) << 40)) return false;
            ++i;
        }
        dims->push_back(v);
    }
    return true;
}

std::string errno_reason(const char* what) {
    return std::string(what) + ": " + std::strerror(errno);
}

struct Fd {
    int fd;
    explicit Fd(int f) : fd(f) {}
    ~Fd() {
        if (fd >= 0) ::close(fd);
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
};

// Reads up to n bytes at offset; returns bytes read or -1.
ssize_t pread_full(int fd, char* buf, std::size_t n, off_t offset) {
    std::size_t done = 0;
    while (done < n) {
        ssize_t r = ::pread(fd, buf + done, n - done, offset + static_cast<off_t>(done));
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) break;
        done += static_cast<std::size_t>(r);
    }
    return static_cast<ssize_t>(done);
}

}  // namespace

std::string parse_npy_header(const char* bytes, std::size_t n, NpyHeader* out) {
    if (n < 10 || std::memcmp(bytes, kMagic, kMagicLen) != 0) return "not an .npy file (bad magic)";
    const unsigned major = static_cast<unsigned char>(bytes[6]);
    std::size_t header_len, start;
    if (major == 1) {
        header_len = static_cast<unsigned char>(bytes[8]) |
                     (static_cast<std::size_t>(static_cast<unsigned char>(bytes[9])) << 8);
        start = 10;
    } else if (major == 2 || major == 3) {
        if (n < 12) return "truncated .npy header";
        header_len = 0;
        for (int k = 3; k >= 0; --k)
            header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + k]);
        start = 12;
    } else {
        return "unsupported .npy version " + std::to_string(major);
    }
    if (start + header_len > n) return "truncated .npy header";
    const std::string dict(bytes + start, header_len);
    const std::string descr = dict_value(dict, "descr");
    if (descr != "'<f4'")
        return "dtype " + (descr.empty() ? std::string("missing") : descr) + ", expected '<f4'";
    const std::string fortran = dict_value(dict, "fortran_order");
    if (fortran != "False" && fortran != "True") return "bad fortran_order in .npy header";
    std::vector<std::size_t> dims;
    if (!parse_shape(dict_value(dict, "shape"), &dims)) return "bad shape in .npy header";
    // A vector has the same bytes in C and Fortran order, so only its shape matters.
    std::size_t dim;
    if (dims.size() == 1) {
        dim = dims[0];
    } else if (dims.size() == 2 && dims[0] == 1) {
        dim = dims[1];
    } else {
        std::string shape = "(";
        for (std::size_t k = 0; k < dims.size(); ++k) shape += (k ? ", " : "") + std::to_string(dims[k]);
        return "shape " + shape + "), expected one vector (D,)";
    }
    if (dim == 0) return "empty vector";
    out->dim = dim;
    out->data_offset = start + header_len;
    return {};
}

std::string read_npy_header(const std::string& path, NpyHeader* out) {
    Fd f(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (f.fd < 0) return errno_reason("open");
    char buf[kHeaderProbe];
    ssize_t got = pread_full(f.fd, buf, sizeof buf, 0);
    if (got < 0) return errno_reason("read");
    return parse_npy_header(buf, static_cast<std::size_t>(got), out);
}

namespace {

std::string read_one(const std::string& path, float* row, std::size_t dim) {
    Fd f(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (f.fd < 0) return errno_reason("open");
    struct stat st;
    if (::fstat(f.fd, &st) != 0) return errno_reason("stat");
    if (!S_ISREG(st.st_mode)) return "not a regular file";
    char buf[kHeaderProbe];
    const std::size_t probe = std::min<std::size_t>(kHeaderProbe, static_cast<std::size_t>(st.st_size));
    ssize_t got = pread_full(f.fd, buf, probe, 0);
    if (got < 0) return errno_reason("read");
    NpyHeader h;
    std::string err = parse_npy_header(buf, static_cast<std::size_t>(got), &h);
    if (!err.empty()) return err;
    if (h.dim != dim) return "dim " + std::to_string(h.dim) + ", DB holds dim " + std::to_string(dim);
    const std::size_t nbytes = dim * sizeof(float);
    const std::size_t expected = h.data_offset + nbytes;
    const auto size = static_cast<std::size_t>(st.st_size);
    if (size < expected)
        return "truncated: " + std::to_string(size) + " bytes, expected " + std::to_string(expected);
    if (size > expected) return "trailing bytes after the vector";
    // Copy through the header probe when it already holds the data (small D).
    if (h.data_offset + nbytes <= static_cast<std::size_t>(got)) {
        std::memcpy(row, buf + h.data_offset, nbytes);
        return {};
    }
    got = pread_full(f.fd, reinterpret_cast<char*>(row), nbytes, static_cast<off_t>(h.data_offset));
    if (got < 0) return errno_reason("read");
    if (static_cast<std::size_t>(got) != nbytes) return "truncated while reading";
    return {};
}

}  // namespace

std::vector<RowError> read_npy_rows(const std::vector<std::string>& paths, float* out,
                                    std::size_t dim, int threads, const std::int64_t* rows) {
    const std::size_t n = paths.size();
    if (n == 0) return {};
    const std::size_t nthreads = std::max<std::size_t>(1, std::min<std::size_t>(threads, n));
    std::atomic<std::size_t> next{0};
    std::mutex mu;
    std::vector<RowError> errors;
    auto work = [&]() {
        std::vector<RowError> local;
        // Chunks keep the counter off the hot path while spreading slow files.
        constexpr std::size_t kChunk = 16;
        for (;;) {
            const std::size_t begin = next.fetch_add(kChunk);
            if (begin >= n) break;
            const std::size_t end = std::min(n, begin + kChunk);
            for (std::size_t i = begin; i < end; ++i) {
                const std::size_t r = rows ? static_cast<std::size_t>(rows[i]) : i;
                std::string err = read_one(paths[i], out + r * dim, dim);
                if (!err.empty()) local.push_back({i, std::move(err)});
            }
        }
        std::lock_guard<std::mutex> lock(mu);
        for (auto& e : local) errors.push_back(std::move(e));
    };
    std::vector<std::thread> pool;
    for (std::size_t t = 1; t < nthreads; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    std::sort(errors.begin(), errors.end(),
              [](const RowError& a, const RowError& b) { return a.index < b.index; });
    return errors;
}

}  // namespace clipdedup
