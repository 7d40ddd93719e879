#include "server/core/zip_directory.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace metaload::core {
namespace {

constexpr uint32_t kEocdSignature = 0x06054b50;
constexpr uint32_t kZip64EocdSignature = 0x06064b50;
constexpr uint32_t kZip64LocatorSignature = 0x07064b50;
constexpr uint32_t kCentralSignature = 0x02014b50;
constexpr uint32_t kLocalSignature = 0x04034b50;
constexpr uint64_t kEocdSize = 22;
constexpr uint64_t kMaxComment = 0xffff;
// A central directory entry is at least 46 bytes; this bounds the entry count by the file size.
constexpr uint64_t kCentralEntryMin = 46;
constexpr uint64_t kMaxDirectoryBytes = 256 << 20;

uint64_t Le(absl::string_view b, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[at + i]);
  return v;
}

absl::Status Corrupt(absl::string_view file, absl::string_view what) {
  return absl::DataLossError(absl::StrCat(file, ": zip: ", what));
}

}  // namespace

absl::StatusOr<std::vector<ZipEntry>> ReadZipDirectory(const ZipReadFn& read, uint64_t file_size,
                                                       absl::string_view file) {
  if (file_size < kEocdSize) return Corrupt(file, "too short for a zip archive");
  const uint64_t tail_size = std::min<uint64_t>(file_size, kEocdSize + kMaxComment);
  std::string tail;
  if (!read(file_size - tail_size, tail_size, &tail)) return Corrupt(file, "short read");
  // The EOCD is the last record; search backwards over a possible comment.
  int64_t eocd = -1;
  for (int64_t i = static_cast<int64_t>(tail.size() - kEocdSize); i >= 0; --i) {
    if (Le(tail, static_cast<size_t>(i), 4) == kEocdSignature &&
        static_cast<uint64_t>(i) + kEocdSize + Le(tail, static_cast<size_t>(i) + 20, 2) ==
            tail.size()) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) return Corrupt(file, "no end-of-central-directory record");
  const size_t e = static_cast<size_t>(eocd);
  uint64_t entries = Le(tail, e + 10, 2);
  uint64_t dir_size = Le(tail, e + 12, 4);
  uint64_t dir_offset = Le(tail, e + 16, 4);
  const uint64_t eocd_abs = file_size - tail_size + static_cast<uint64_t>(eocd);

  if (entries == 0xffff || dir_size == 0xffffffff || dir_offset == 0xffffffff) {
    // ZIP64: a 20-byte locator precedes the EOCD and points at the ZIP64 EOCD record.
    if (eocd_abs < 20) return Corrupt(file, "ZIP64 locator missing");
    std::string locator;
    if (!read(eocd_abs - 20, 20, &locator) || Le(locator, 0, 4) != kZip64LocatorSignature) {
      return Corrupt(file, "ZIP64 locator missing");
    }
    const uint64_t z64 = Le(locator, 8, 8);
    std::string record;
    if (z64 > file_size || file_size - z64 < 56 || !read(z64, 56, &record) ||
        Le(record, 0, 4) != kZip64EocdSignature) {
      return Corrupt(file, "bad ZIP64 end-of-central-directory record");
    }
    entries = Le(record, 32, 8);
    dir_size = Le(record, 40, 8);
    dir_offset = Le(record, 48, 8);
  }
  if (dir_offset > file_size || dir_size > file_size - dir_offset) {
    return Corrupt(file, "central directory lies outside the file");
  }
  if (dir_size > kMaxDirectoryBytes || entries > dir_size / kCentralEntryMin) {
    return Corrupt(file, absl::StrCat("implausible central directory (", entries, " entries in ",
                                      dir_size, " bytes)"));
  }
  std::string dir;
  if (!read(dir_offset, dir_size, &dir)) return Corrupt(file, "short read of central directory");

  std::vector<ZipEntry> out;
  absl::flat_hash_set<std::string> names;
  out.reserve(entries);
  size_t p = 0;
  for (uint64_t n = 0; n < entries; ++n) {
    if (dir.size() - p < kCentralEntryMin || Le(dir, p, 4) != kCentralSignature) {
      return Corrupt(file, absl::StrCat("bad central directory entry ", n));
    }
    ZipEntry entry;
    entry.method = static_cast<uint16_t>(Le(dir, p + 10, 2));
    entry.size = Le(dir, p + 20, 4);
    entry.uncompressed_size = Le(dir, p + 24, 4);
    const uint64_t name_len = Le(dir, p + 28, 2);
    const uint64_t extra_len = Le(dir, p + 30, 2);
    const uint64_t comment_len = Le(dir, p + 32, 2);
    uint64_t local = Le(dir, p + 42, 4);
    if (dir.size() - p - kCentralEntryMin < name_len + extra_len + comment_len) {
      return Corrupt(file, absl::StrCat("central directory entry ", n, " runs past the directory"));
    }
    entry.name = dir.substr(p + kCentralEntryMin, name_len);
    // ZIP64 extended information: the fields that overflowed, in this order.
    size_t x = p + kCentralEntryMin + name_len;
    const size_t x_end = x + extra_len;
    while (x_end - x >= 4) {
      const uint64_t id = Le(dir, x, 2), len = Le(dir, x + 2, 2);
      if (x_end - x - 4 < len)
        return Corrupt(file, absl::StrCat("entry '", entry.name, "': bad extra field"));
      if (id == 0x0001) {
        size_t f = x + 4;
        auto take = [&](uint64_t* field) -> bool {
          if (*field != 0xffffffff) return true;
          if (x + 4 + len - f < 8) return false;
          *field = Le(dir, f, 8);
          f += 8;
          return true;
        };
        if (!take(&entry.uncompressed_size) || !take(&entry.size) || !take(&local)) {
          return Corrupt(file, absl::StrCat("entry '", entry.name, "': bad ZIP64 extra field"));
        }
      }
      x += 4 + len;
    }
    p += kCentralEntryMin + name_len + extra_len + comment_len;

    std::string header;
    if (local > file_size || file_size - local < 30 || !read(local, 30, &header) ||
        Le(header, 0, 4) != kLocalSignature) {
      return Corrupt(file, absl::StrCat("entry '", entry.name, "': bad local header"));
    }
    const uint64_t data = local + 30 + Le(header, 26, 2) + Le(header, 28, 2);
    if (data > file_size || entry.size > file_size - data) {
      return Corrupt(file, absl::StrCat("entry '", entry.name, "': data runs past the end of the ",
                                        file_size, "-byte file"));
    }
    if (entry.method == 0 && entry.size != entry.uncompressed_size) {
      return Corrupt(file, absl::StrCat("entry '", entry.name, "': stored sizes disagree"));
    }
    entry.data_offset = data;
    // torch reads the first of two same-named entries, a map would keep the last: refuse both.
    if (!names.insert(entry.name).second) {
      return Corrupt(file, absl::StrCat("entry '", entry.name, "' appears twice"));
    }
    out.push_back(std::move(entry));
  }
  return out;
}

absl::StatusOr<std::vector<ZipEntry>> ReadZipDirectoryFromBytes(absl::string_view bytes,
                                                                absl::string_view file) {
  auto read = [bytes](uint64_t offset, uint64_t length, std::string* out) {
    if (offset > bytes.size() || length > bytes.size() - offset) return false;
    out->assign(bytes.data() + offset, length);
    return true;
  };
  return ReadZipDirectory(read, bytes.size(), file);
}

}  // namespace metaload::core
