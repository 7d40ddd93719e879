// One deliberately corrupt safetensors file per failure class, each checked for the exact error
// class and a message that names the file (and the tensor, where there is one).
#include "server/core/safetensors_header.h"

#include <gtest/gtest.h>
#include <malloc.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "server/core/process_memory.h"
#include "tests/test_util.h"

namespace metaload::core {
namespace {

constexpr char kFile[] = "models/corrupt.safetensors";

// 8-byte little-endian length, the header text, then `data_bytes` zero bytes.
std::string FileBytes(const std::string& header, uint64_t data_bytes, uint64_t declared_n = ~0ull) {
  uint64_t n = declared_n == ~0ull ? header.size() : declared_n;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += header;
  out.append(data_bytes, '\0');
  return out;
}

const char kGood[] = R"({"__metadata__":{"format":"pt"},)"
                     R"("b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]},)"
                     R"("a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},)"
                     R"("e":{"dtype":"BF16","shape":[0,3],"data_offsets":[24,24]}})";

TEST(SafetensorsHeaderTest, ParsesAValidHeader) {
  absl::StatusOr<SafetensorsHeader> h = ParseSafetensorsBytes(FileBytes(kGood, 24), kFile);
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_EQ(h->tensors.size(), 3u);
  EXPECT_EQ(h->tensors[0].name, "a");
  EXPECT_EQ(h->tensors[0].dtype, DType::kInt64);
  EXPECT_EQ(h->tensors[1].name, "b");
  EXPECT_EQ(h->tensors[1].shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(h->tensors[1].begin, 8u);
  EXPECT_EQ(h->tensors[1].end, 24u);
  EXPECT_EQ(h->tensors[2].name, "e");
  EXPECT_EQ(h->metadata.at("format"), "pt");
  EXPECT_EQ(h->header_bytes, sizeof(kGood) - 1);
  EXPECT_EQ(h->data_offset, 8 + sizeof(kGood) - 1);
  EXPECT_EQ(h->data_bytes, 24u);
}

TEST(SafetensorsHeaderTest, AcceptsPaddingAndAnEmptyFile) {
  EXPECT_TRUE(ParseSafetensorsBytes(FileBytes(std::string(kGood) + "     ", 24), kFile).ok());
  absl::StatusOr<SafetensorsHeader> empty = ParseSafetensorsBytes(FileBytes("{}", 0), kFile);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->tensors.empty());
}

struct CorruptCase {
  const char* failure_class;
  std::string bytes;
  const char* tensor;  // must appear in the message; "" when there is no tensor
  const char* message_contains;
};

std::string Entry(const std::string& name, const std::string& body) {
  return "\"" + name + "\":" + body;
}

std::vector<CorruptCase> CorruptCases() {
  const std::string ok_a = Entry("a", R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})");
  return {
      {"file shorter than the length prefix", std::string("\x02\x00\x00", 3), "", "too short"},
      {"header length over 100,000,000", FileBytes("{}", 0, 100'000'001), "", "exceeds the limit"},
      {"header length past the end of the file", FileBytes("{}", 0, 64), "", "runs past the end"},
      {"header is not JSON", FileBytes("{\"a\": nope}", 0), "", "not valid JSON"},
      {"header is truncated JSON", FileBytes("{\"a\":{\"dtype\":", 0), "", "not valid JSON"},
      {"header is not an object", FileBytes("[1,2]", 0), "", "not a JSON object"},
      {"duplicate tensor names", FileBytes("{" + ok_a + "," + ok_a + "}", 8), "",
       "duplicate key 'a'"},
      {"duplicate field inside an entry",
       FileBytes(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8), "",
       "duplicate key 'dtype'"},
      {"entry is not an object", FileBytes(R"({"a":[1,2]})", 0), "a", "not an object"},
      {"entry without dtype", FileBytes(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8), "a",
       "missing dtype"},
      {"entry without shape", FileBytes(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8), "a",
       "missing shape"},
      {"entry without data_offsets", FileBytes(R"({"a":{"dtype":"F32","shape":[2]}})", 8), "a",
       "missing data_offsets"},
      {"entry with an extra field",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8), "a",
       "unexpected field(s) x"},
      {"unknown dtype", FileBytes(R"({"a":{"dtype":"F8","shape":[2],"data_offsets":[0,2]}})", 2),
       "a", "unknown dtype 'F8'"},
      {"dtype not a string", FileBytes(R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8),
       "a", "dtype is not a string"},
      {"negative dimension",
       FileBytes(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "a",
       "negative dimension -2"},
      {"fractional dimension",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8), "a",
       "not an integer"},
      {"shape not an array",
       FileBytes(R"({"a":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", 8), "a",
       "shape is not an array"},
      {"element count overflows int64",
       FileBytes(R"({"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8),
       "a", "element count overflows"},
      {"byte count overflows int64",
       FileBytes(R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}})", 8),
       "a", "byte size overflows"},
      {"byte count differs from numel x itemsize",
       FileBytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "a", "needs 12"},
      {"offsets past the data section",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 8), "a",
       "run past the data section"},
      {"offsets that end before they begin",
       FileBytes(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8), "a",
       "end before they begin"},
      {"offsets not two integers",
       FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,16]}})", 16), "a",
       "not two non-negative integers"},
      {"overlapping tensors",
       FileBytes("{" + ok_a + "," +
                     Entry("b", R"({"dtype":"F32","shape":[2],"data_offsets":[4,12]})") + "}",
                 12),
       "b", "overlaps"},
      {"gap between tensors",
       FileBytes("{" + ok_a + "," +
                     Entry("b", R"({"dtype":"F32","shape":[2],"data_offsets":[12,20]})") + "}",
                 20),
       "b", "gap"},
      {"bytes after the last tensor", FileBytes("{" + ok_a + "}", 12), "",
       "cover 8 bytes of a 12-byte data section"},
      {"metadata value not a string", FileBytes(R"({"__metadata__":{"k":1}})", 0), "",
       "value of 'k' is not a string"},
      {"metadata not an object", FileBytes(R"({"__metadata__":"x"})", 0), "",
       "__metadata__ is not an object"},
      {"nesting deeper than a header", FileBytes(R"({"a":{"b":{"c":[[1]]}}})", 0), "",
       "nested deeper"},
      {"empty tensor name",
       FileBytes(R"({"":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})", 0), "", "empty name"},
      {"invalid UTF-8 in a name",
       FileBytes("{\"\xff\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0), "",
       "not valid JSON"},
  };
}

TEST(SafetensorsHeaderTest, EveryCorruptionClassIsDataLossNamingFileAndTensor) {
  std::vector<CorruptCase> cases = CorruptCases();
  EXPECT_GE(cases.size(), 20u);
  for (const CorruptCase& c : cases) {
    absl::StatusOr<SafetensorsHeader> h = ParseSafetensorsBytes(c.bytes, kFile);
    ASSERT_FALSE(h.ok()) << c.failure_class;
    EXPECT_TRUE(absl::IsDataLoss(h.status())) << c.failure_class << ": " << h.status();
    const std::string message(h.status().message());
    EXPECT_NE(message.find(kFile), std::string::npos) << c.failure_class << ": " << message;
    if (*c.tensor) {
      EXPECT_NE(message.find("tensor '" + std::string(c.tensor) + "'"), std::string::npos)
          << c.failure_class << ": " << message;
    }
    EXPECT_NE(message.find(c.message_contains), std::string::npos)
        << c.failure_class << ": " << message;
  }
}

TEST(SafetensorsHeaderTest, ReadsOnlyTheHeaderFromDisk) {
  testing::TempDir dir;
  const std::string path = dir / "m.safetensors";
  std::ofstream(path, std::ios::binary) << FileBytes(kGood, 24);
  absl::StatusOr<SafetensorsHeader> h = ReadSafetensorsHeader(path);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->tensors.size(), 3u);

  std::ofstream(path, std::ios::binary | std::ios::trunc) << FileBytes(kGood, 20);  // truncated
  absl::Status truncated = ReadSafetensorsHeader(path).status();
  EXPECT_TRUE(absl::IsDataLoss(truncated)) << truncated;
  EXPECT_NE(truncated.message().find(path), std::string::npos);

  absl::Status missing = ReadSafetensorsHeader(dir / "nope.safetensors").status();
  EXPECT_TRUE(absl::IsNotFound(missing)) << missing;
}

// A legal-looking header of `tensors` one-element F32 entries, as a whole file in memory.
std::string ManyTensorFile(size_t tensors, bool leave_a_gap) {
  std::string json = "{\"__metadata__\":{\"format\":\"pt\"}";
  uint64_t at = 0;
  for (size_t i = 0; i < tensors; ++i) {
    if (leave_a_gap && i + 1 == tensors) at += 4;  // found only after every entry is parsed
    json += ",\"model.layers." + std::to_string(i) +
            ".weight\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" + std::to_string(at) +
            "," + std::to_string(at + 4) + "]}";
    at += 4;
  }
  json += "}";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((json.size() >> (8 * i)) & 0xff);
  return file + json + std::string(at, '\0');
}

int64_t Rss() {
  absl::StatusOr<ProcessMemory> m = ReadProcessMemory();
  return m.ok() ? m->rss_bytes : 0;
}

// Until 2026-12 the JSON parser was thread_local and kept its buffers (~2.3 bytes per header
// byte: ~220 MB per load thread after a 96 MB header). Now it lives for one parse; the bound is
// safetensors_header.h's kSafetensorsHeaderMemoryPerByte.
TEST(SafetensorsHeaderMemoryTest, LargeHeaderPeakIsBoundedAndNothingStaysAfter) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "shadow memory and quarantine are not the parser's";
#endif
  for (bool gap : {false, true}) {
    const std::string file = ManyTensorFile(300000, gap);
    const int64_t header_bytes = static_cast<int64_t>(file.size()) - 8 - 300000 * 4 - (gap ? 4 : 0);
    // The valid one is read from disk (the daemon's path: simdjson parses the read buffer in
    // place), the failing one from memory (simdjson copies it first).
    const std::string path = ::testing::TempDir() + "/big.safetensors";
    if (!gap) std::ofstream(path, std::ios::binary) << file;
    const int64_t baseline = Rss();
    ASSERT_TRUE(ResetPeakRss());
    int64_t peak = 0;
    {
      absl::StatusOr<SafetensorsHeader> header =
          gap ? ParseSafetensorsBytes(file, "big.safetensors") : ReadSafetensorsHeader(path);
      EXPECT_EQ(header.ok(), !gap) << header.status();
      if (header.ok()) EXPECT_EQ(header->tensors.size(), 300000u);
      absl::StatusOr<ProcessMemory> after = ReadProcessMemory();
      ASSERT_TRUE(after.ok());
      peak = after->peak_rss_bytes - baseline;
    }
    // What malloc keeps in its bins from the freed result is the allocator's, not the parser's:
    // hand it back before measuring what is still held (a parser that keeps its buffers, as the
    // thread_local one did, keeps them through this).
    ::malloc_trim(0);
    const int64_t left = Rss() - baseline;
    std::printf(
        "[ measured ] %s header of %lld bytes: peak %.1f MiB above baseline (%.2f per "
        "byte), %.1f MiB left after\n",
        gap ? "failing" : "valid", static_cast<long long>(header_bytes),
        static_cast<double>(peak) / (1 << 20),
        static_cast<double>(peak) / static_cast<double>(header_bytes),
        static_cast<double>(left) / (1 << 20));
    EXPECT_LE(peak,
              static_cast<int64_t>(kSafetensorsHeaderMemoryPerByte) * header_bytes + (8 << 20));
    EXPECT_LE(left, header_bytes / 4 + (8 << 20));
  }
}

}  // namespace
}  // namespace metaload::core
