#include "scanner.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

namespace clipdedup {
namespace {

// getdents64's record; glibc exposes no declaration of it.
struct LinuxDirent64 {
    std::uint64_t d_ino;
    std::int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

// One buffer per call rather than readdir's 32 KiB: big photo directories list in fewer syscalls.
constexpr std::size_t kDentsBuffer = 1 << 16;

struct DevIno {
    dev_t dev;
    ino_t ino;
    bool operator==(const DevIno& o) const { return dev == o.dev && ino == o.ino; }
};

// The chain of directories above a queued one, for loop detection; shared by siblings.
struct Ancestor {
    DevIno id;
    std::shared_ptr<const Ancestor> parent;
};

struct Pending {
    std::string rel;
    std::shared_ptr<const Ancestor> parent;  // null for the root
    bool via_link = false;                   // a followed symlink lies on the way here
};

std::int64_t ns(const struct timespec& t) {
    return static_cast<std::int64_t>(t.tv_sec) * 1000000000LL + t.tv_nsec;
}

std::string join(const std::string& dir, const char* name) {
    if (dir.empty()) return name;
    std::string r;
    r.reserve(dir.size() + 1 + std::strlen(name));
    r += dir;
    r += '/';
    r += name;
    return r;
}

class Walker {
   public:
    explicit Walker(const ScanOptions& opt) : opt_(opt) {
        for (const auto& p : opt.exclude) {
            struct stat st;
            if (::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) excluded_.push_back({st.st_dev, st.st_ino});
        }
    }

    ScanOutput run() {
        root_fd_ = ::open(opt_.root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        ScanOutput out;
        if (root_fd_ < 0) {
            out.errors.push_back({"", std::string("cannot list directory: ") + std::strerror(errno)});
            return out;
        }
        struct stat rst;
        root_dev_ = ::fstat(root_fd_, &rst) == 0 ? rst.st_dev : 0;
        queue_.push_back({"", nullptr, false});
        const int n = std::max(1, opt_.threads);
        std::vector<std::vector<ScanRecord>> records(n);
        std::vector<std::vector<ScanError>> errors(n);
        std::vector<std::thread> pool;
        for (int t = 1; t < n; ++t) pool.emplace_back([&, t] { work(&records[t], &errors[t]); });
        work(&records[0], &errors[0]);
        for (auto& t : pool) t.join();
        ::close(root_fd_);
        for (int t = 0; t < n; ++t) {
            for (auto& r : records[t]) out.records.push_back(std::move(r));
            for (auto& e : errors[t]) out.errors.push_back(std::move(e));
        }
        std::sort(out.records.begin(), out.records.end(),
                  [](const ScanRecord& a, const ScanRecord& b) { return a.rel < b.rel; });
        std::sort(out.errors.begin(), out.errors.end(), [](const ScanError& a, const ScanError& b) {
            return a.rel != b.rel ? a.rel < b.rel : a.reason < b.reason;
        });
        return out;
    }

   private:
    // Threads take directories from one shared stack until it is empty and no thread can add more.
    void work(std::vector<ScanRecord>* records, std::vector<ScanError>* errors) {
        std::vector<Pending> found;
        std::vector<char> buf(kDentsBuffer);
        for (;;) {
            Pending dir;
            {
                std::unique_lock<std::mutex> lock(mu_);
                cv_.wait(lock, [&] { return !queue_.empty() || busy_ == 0; });
                if (queue_.empty()) return;
                dir = std::move(queue_.back());
                queue_.pop_back();
                ++busy_;
            }
            found.clear();
            list_dir(dir, &buf, records, errors, &found);
            {
                std::lock_guard<std::mutex> lock(mu_);
                for (auto& f : found) queue_.push_back(std::move(f));
                --busy_;
            }
            cv_.notify_all();
        }
    }

    bool is_ancestor(const DevIno& id, const Ancestor* a) const {
        for (; a != nullptr; a = a->parent.get())
            if (a->id == id) return true;
        return false;
    }

    void list_dir(const Pending& dir, std::vector<char>* buf, std::vector<ScanRecord>* records,
                  std::vector<ScanError>* errors, std::vector<Pending>* found) {
        const int flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC | (opt_.follow_symlinks ? 0 : O_NOFOLLOW);
        const int fd = ::openat(root_fd_, dir.rel.empty() ? "." : dir.rel.c_str(), flags);
        if (fd < 0) {
            errors->push_back({dir.rel, std::string("cannot list directory: ") + std::strerror(errno)});
            return;
        }
        struct stat dst;
        if (::fstat(fd, &dst) != 0) {
            errors->push_back({dir.rel, std::string("cannot list directory: ") + std::strerror(errno)});
            ::close(fd);
            return;
        }
        const DevIno self{dst.st_dev, dst.st_ino};
        if (!dir.rel.empty()) {
            if (std::find(excluded_.begin(), excluded_.end(), self) != excluded_.end()) {
                ::close(fd);
                return;
            }
            const auto dev = static_cast<std::uint64_t>(dst.st_dev);
            if (std::find(opt_.system_devices.begin(), opt_.system_devices.end(), dev) !=
                opt_.system_devices.end()) {
                errors->push_back({dir.rel, "a system directory (/proc, /sys or /dev), never entered"});
                ::close(fd);
                return;
            }
            if (dir.via_link && !opt_.cross_devices && dst.st_dev != root_dev_) {
                errors->push_back({dir.rel,
                                   "reached through a symlink, on another file system: not entered "
                                   "(--cross-file-systems enters it)"});
                ::close(fd);
                return;
            }
            if (is_ancestor(self, dir.parent.get())) {
                errors->push_back({dir.rel, "directory loop (it is its own ancestor), not entered"});
                ::close(fd);
                return;
            }
        }
        auto me = std::make_shared<const Ancestor>(Ancestor{self, dir.parent});
        std::int64_t seen = 0;
        for (;;) {
            const long n = ::syscall(SYS_getdents64, fd, buf->data(), buf->size());
            if (n < 0) {
                if (errno == EINTR) continue;
                errors->push_back({dir.rel, std::string("cannot list directory: ") + std::strerror(errno)});
                break;
            }
            if (n == 0) break;
            for (long pos = 0; pos < n;) {
                const auto* e = reinterpret_cast<const LinuxDirent64*>(buf->data() + pos);
                pos += e->d_reclen;
                const char* name = e->d_name;
                if (name[0] == '.' && (name[1] == 0 || (name[1] == '.' && name[2] == 0))) continue;
                entry(fd, dir, name, e->d_type, me, records, errors, found);
                ++seen;
            }
            if (opt_.progress != nullptr) __atomic_fetch_add(opt_.progress, seen, __ATOMIC_RELAXED);
            seen = 0;
        }
        ::close(fd);
    }

    void entry(int fd, const Pending& dir, const char* name, unsigned char type,
               const std::shared_ptr<const Ancestor>& me, std::vector<ScanRecord>* records,
               std::vector<ScanError>* errors, std::vector<Pending>* found) {
        const std::string& rel_dir = dir.rel;
        int match = 1;
        bool is_link = type == DT_LNK;
        switch (type) {
            case DT_DIR:
                found->push_back({join(rel_dir, name), me, dir.via_link});
                return;
            case DT_REG:
                if (!opt_.all_files) {
                    match = match_suffix(name, std::strlen(name), opt_.suffixes);
                    if (match == 0) return;  // no stat for a file that cannot match: most of the saving
                }
                break;
            case DT_LNK:
                if (!opt_.follow_symlinks) return;
                break;
            case DT_UNKNOWN:  // some file systems do not fill d_type: stat tells
                break;
            default:
                return;  // fifo, socket, device
        }
        struct stat st;
        if (type == DT_UNKNOWN && opt_.follow_symlinks) {
            // Whether it is a link decides how far the walk may go below it.
            if (::fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0) is_link = S_ISLNK(st.st_mode);
        }
        const int stat_flags = opt_.follow_symlinks ? 0 : AT_SYMLINK_NOFOLLOW;
        if (::fstatat(fd, name, &st, stat_flags) != 0) {
            errors->push_back({join(rel_dir, name), std::string("cannot stat: ") + std::strerror(errno)});
            return;
        }
        if (S_ISDIR(st.st_mode)) {
            found->push_back({join(rel_dir, name), me, dir.via_link || is_link});
            return;
        }
        if (!S_ISREG(st.st_mode)) return;
        if (type != DT_REG && !opt_.all_files) {
            match = match_suffix(name, std::strlen(name), opt_.suffixes);
            if (match == 0) return;
        }
        records->push_back(
            {join(rel_dir, name), ns(st.st_mtim), ns(st.st_ctim), static_cast<std::int64_t>(st.st_size),
             static_cast<std::uint64_t>(st.st_ino), match < 0});
    }

    const ScanOptions& opt_;
    std::vector<DevIno> excluded_;
    int root_fd_ = -1;
    dev_t root_dev_ = 0;
    std::mutex mu_;
    std::condition_variable cv_;
    std::vector<Pending> queue_;
    int busy_ = 0;
};

}  // namespace

int match_suffix(const char* name, std::size_t len, const std::vector<std::string>& suffixes) {
    std::size_t dot = len;
    for (std::size_t i = len; i-- > 0;) {
        if (name[i] == '.') {
            dot = i;
            break;
        }
    }
    if (dot == len) return 0;
    // splitext: leading dots belong to the name, so ".jpg" and "..jpg" have no suffix.
    std::size_t k = 0;
    while (k < dot && name[k] == '.') ++k;
    if (k == dot) return 0;
    const std::size_t n = len - dot;
    char low[64];
    if (n > sizeof low) return -1;
    for (std::size_t i = 0; i < n; ++i) {
        const auto c = static_cast<unsigned char>(name[dot + i]);
        if (c >= 0x80) return -1;
        low[i] = static_cast<char>(c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c);
    }
    for (const auto& s : suffixes)
        if (s.size() == n && std::memcmp(s.data(), low, n) == 0) return 1;
    return 0;
}

ScanOutput scan_tree(const ScanOptions& opt) { return Walker(opt).run(); }

}  // namespace clipdedup
