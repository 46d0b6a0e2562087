// Multithreaded directory walker: relative path, mtime, ctime, size and inode of the files under a root.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace clipdedup {

struct ScanOptions {
    std::string root;
    // Lowercase ASCII suffixes with their dot (".jpg"); empty with all_files = true: every regular file.
    std::vector<std::string> suffixes;
    bool all_files = false;
    std::vector<std::string> exclude;  // directories not to enter (matched by device and inode)
    bool follow_symlinks = false;
    // A directory reached through a followed symlink is entered only on the root's file system,
    // unless cross_devices.
    bool cross_devices = false;
    std::vector<std::uint64_t> system_devices;  // st_dev of /proc, /sys, /dev: never entered
    int threads = 1;
    // Entries seen so far, added to as the walk goes (relaxed atomic adds), for a progress display;
    // may be null.
    std::int64_t* progress = nullptr;
};

struct ScanRecord {
    std::string rel;  // '/'-separated, relative to the root, raw bytes of the names
    std::int64_t mtime_ns;
    std::int64_t ctime_ns;
    std::int64_t size;
    std::uint64_t ino;
    // The suffix holds non-ASCII bytes: Python's str.lower() decides whether it matches.
    bool suffix_unsure;
};

struct ScanError {
    std::string rel;  // of the directory or file, relative to the root ("" for the root)
    std::string reason;
};

struct ScanOutput {
    std::vector<ScanRecord> records;  // sorted by rel (bytewise)
    std::vector<ScanError> errors;    // sorted by rel
};

// Walks opt.root. Symlinks are skipped unless opt.follow_symlinks; a directory that is its own
// ancestor (a symlink or bind-mount loop) is reported and not entered, so the walk always ends.
// A directory on a system device, or (unless cross_devices) one on another file system that was
// reached through a followed symlink, is reported and not entered.
// Nothing throws for file-system trouble: it becomes a ScanError.
ScanOutput scan_tree(const ScanOptions& opt);

// Suffix test of one file name (bytes), the way Python's os.path.splitext(name)[1].lower() sees it
// for ASCII suffixes. Returns 1 for a match, 0 for none, -1 when the suffix holds non-ASCII bytes.
int match_suffix(const char* name, std::size_t len, const std::vector<std::string>& suffixes);

}  // namespace clipdedup
