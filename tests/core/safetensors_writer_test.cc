#include "server/core/safetensors_writer.h"

#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace metaload::core {
namespace {

SafetensorsWriter::FillFn Iota(int item_size) {
  // Element k of the tensor holds k, in the tensor's own type; only float32 and int64 here.
  return [item_size](char* dst, int64_t offset, int64_t nbytes) {
    for (int64_t b = 0; b < nbytes; b += item_size) {
      int64_t k = (offset + b) / item_size;
      if (item_size == 4) {
        float v = static_cast<float>(k);
        std::memcpy(dst + b, &v, 4);
      } else {
        std::memcpy(dst + b, &k, 8);
      }
    }
  };
}

TEST(SafetensorsWriterTest, PythonReadsWhatWeWrite) {
  testing::TempDir dir;
  SafetensorsWriter w;
  ASSERT_TRUE(w.Add("small.f32", DType::kFloat32, {3}, Iota(4)).ok());
  ASSERT_TRUE(w.Add("big.i64", DType::kInt64, {2, 3}, Iota(8)).ok());
  ASSERT_TRUE(w.Add("empty", DType::kFloat32, {0, 4}, Iota(4)).ok());
  w.SetMetadata("format", "pt");
  EXPECT_EQ(w.data_bytes(), 3 * 4 + 6 * 8);
  ASSERT_TRUE(w.Write(dir / "m.safetensors").ok());

  testing::CommandResult r =
      testing::RunCommand({METALOAD_PYTHON, METALOAD_SOURCE_DIR "/tests/tools/safetensors_ref.py",
                           "dump", dir / "m.safetensors"},
                          dir / "py");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["header_bytes"].get<int>() % 8, 0);
  EXPECT_EQ(j["metadata"]["format"], "pt");
  EXPECT_EQ(j["tensors"]["small.f32"]["dtype"], "float32");
  EXPECT_EQ(j["tensors"]["small.f32"]["shape"], nlohmann::json({3}));
  EXPECT_DOUBLE_EQ(j["tensors"]["small.f32"]["sum"].get<double>(), 0 + 1 + 2);
  EXPECT_EQ(j["tensors"]["big.i64"]["dtype"], "int64");
  EXPECT_EQ(j["tensors"]["big.i64"]["shape"], nlohmann::json({2, 3}));
  EXPECT_DOUBLE_EQ(j["tensors"]["big.i64"]["sum"].get<double>(), 15);
  EXPECT_EQ(j["tensors"]["empty"]["shape"], nlohmann::json({0, 4}));
}

TEST(SafetensorsWriterTest, AlignsEveryTensorToItsElementSize) {
  testing::TempDir dir;
  SafetensorsWriter w;
  ASSERT_TRUE(w.Add("a.u8", DType::kUInt8, {3}, [](char* d, int64_t, int64_t n) {
                 std::memset(d, 7, n);
               }).ok());
  ASSERT_TRUE(w.Add("b.f64", DType::kFloat64, {5}, [](char* d, int64_t, int64_t n) {
                 std::memset(d, 0, n);
               }).ok());
  ASSERT_TRUE(w.Add("c.f16", DType::kFloat16, {3}, [](char* d, int64_t, int64_t n) {
                 std::memset(d, 0, n);
               }).ok());
  ASSERT_TRUE(w.Write(dir / "m.safetensors").ok());
  std::string bytes = testing::ReadFileOrEmpty(dir / "m.safetensors");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  ASSERT_EQ((8 + n) % 8, 0u);
  nlohmann::json header = nlohmann::json::parse(bytes.substr(8, n));
  EXPECT_EQ(header["b.f64"]["data_offsets"], nlohmann::json({0, 40}));
  EXPECT_EQ(header["c.f16"]["data_offsets"], nlohmann::json({40, 46}));
  EXPECT_EQ(header["a.u8"]["data_offsets"], nlohmann::json({46, 49}));
  EXPECT_EQ(bytes.size(), 8 + n + 49);
  EXPECT_EQ(bytes.back(), 7);
}

TEST(SafetensorsWriterTest, RejectsBadDeclarations) {
  SafetensorsWriter w;
  auto fill = [](char*, int64_t, int64_t) {};
  ASSERT_TRUE(w.Add("x", DType::kFloat32, {2}, fill).ok());
  absl::Status dup = w.Add("x", DType::kFloat32, {2}, fill);
  EXPECT_TRUE(absl::IsInvalidArgument(dup));
  EXPECT_NE(dup.message().find("x"), std::string::npos);
  EXPECT_TRUE(absl::IsInvalidArgument(w.Add("z", DType::kFloat32, {-1}, fill)));
  EXPECT_TRUE(absl::IsInvalidArgument(w.Add("__metadata__", DType::kFloat32, {1}, fill)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      w.Add("huge", DType::kFloat64, {int64_t{1} << 40, int64_t{1} << 40}, fill)));
  EXPECT_EQ(w.tensor_count(), 1u);
}

TEST(SafetensorsWriterTest, FailedWriteLeavesNoFile) {
  testing::TempDir dir;
  SafetensorsWriter w;
  ASSERT_TRUE(w.Add("x", DType::kFloat32, {2}, [](char* d, int64_t, int64_t n) {
                 std::memset(d, 0, n);
               }).ok());
  absl::Status s = w.Write(dir / "missing-dir/m.safetensors");
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("missing-dir"), std::string::npos);
}

}  // namespace
}  // namespace metaload::core
