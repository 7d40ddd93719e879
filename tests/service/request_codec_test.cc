// MakeLoadSpec's limits on LoadModelRequest fields (issue 17 item 3): every field a caller can
// grow is bounded, and a request over a bound is INVALID_ARGUMENT naming the field and the
// limit, decided before anything else is parsed or resolved.
#include "server/service/request_codec.h"

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>

#include "absl/strings/str_cat.h"
#include "tests/test_util.h"

namespace metaload::service {
namespace {

class RequestLimitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::canonical(dir_.path()).string();
    std::ofstream(root_ + "/model.safetensors") << "x";
    resolver_ = std::make_unique<PathResolver>(std::vector<std::string>{root_});
  }
  metaload::v1::LoadModelRequest Valid() const {
    metaload::v1::LoadModelRequest r;
    r.set_path("model.safetensors");
    return r;
  }
  testing::TempDir dir_;
  std::string root_;
  std::unique_ptr<PathResolver> resolver_;
};

TEST_F(RequestLimitsTest, AValidRequestPasses) {
  metaload::v1::LoadModelRequest r = Valid();
  for (int i = 0; i < 1024; ++i) (*r.mutable_dtype_overrides())[absl::StrCat("p", i)] = "keep";
  (*r.mutable_compute_dtype_overrides())["forward"] = "float32";
  absl::StatusOr<cache::LoadSpec> spec = MakeLoadSpec(r, *resolver_);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->dtype_overrides.size(), 1024u);
}

// Hostile: one attack per field. Before the limits every over-limit case here was accepted
// (OK), and 100,000 dtype_overrides of 1 KiB kept 1.5 GB per load in the daemon.
TEST_F(RequestLimitsTest, EveryFieldOverItsLimitIsInvalidArgumentNamingIt) {
  struct Case {
    const char* what;
    std::function<void(metaload::v1::LoadModelRequest*)> edit;
    const char* message;  // the field and its limit
  };
  const std::vector<Case> cases = {
      {"1025 dtype_overrides",
       [](auto* r) {
         for (int i = 0; i < 1025; ++i)
           (*r->mutable_dtype_overrides())[absl::StrCat("p", i)] = "keep";
       },
       "dtype_overrides: 1025 entries; at most 1024"},
      {"a 1025-byte dtype_overrides key",
       [](auto* r) { (*r->mutable_dtype_overrides())[std::string(1025, 'k')] = "keep"; },
       "dtype_overrides: a key of 1025 bytes; at most 1024"},
      {"a 33-byte dtype_overrides value",
       [](auto* r) { (*r->mutable_dtype_overrides())["k"] = std::string(33, 'v'); },
       "dtype_overrides['k']: a value of 33 bytes; at most 32"},
      {"dtype_overrides over 64 KiB in all",
       [](auto* r) {
         for (int i = 0; i < 100; ++i) {
           (*r->mutable_dtype_overrides())[absl::StrCat(i, std::string(1000, 'k'))] = "keep";
         }
       },
       "dtype_overrides: 100590 bytes of keys and values; at most 65536"},
      {"65 compute_dtype_overrides",
       [](auto* r) {
         for (int i = 0; i < 65; ++i) {
           (*r->mutable_compute_dtype_overrides())[absl::StrCat("e", i)] = "float32";
         }
       },
       "compute_dtype_overrides: 65 entries; at most 64"},
      {"a 129-byte compute_dtype_overrides key",
       [](auto* r) { (*r->mutable_compute_dtype_overrides())[std::string(129, 'e')] = "float32"; },
       "compute_dtype_overrides: a key of 129 bytes; at most 128"},
      {"a 257-byte model_id", [](auto* r) { r->set_model_id(std::string(257, 'm')); },
       "model_id: 257 bytes; at most 256"},
      {"a 4097-byte path", [](auto* r) { r->set_path(std::string(4097, 'a')); },
       "path: 4097 bytes; at most 4096"},
      {"a 129-byte architecture", [](auto* r) { r->set_architecture(std::string(129, 'a')); },
       "architecture: 129 bytes; at most 128"},
      {"a 65-byte device", [](auto* r) { r->set_device(std::string(65, 'd')); },
       "device: 65 bytes; at most 64"},
      {"a 65-byte dtype", [](auto* r) { r->set_dtype(std::string(65, 'd')); },
       "dtype: 65 bytes; at most 64"},
      {"a 65-byte compute_dtype", [](auto* r) { r->set_compute_dtype(std::string(65, 'd')); },
       "compute_dtype: 65 bytes; at most 64"},
      {"a 4097-byte vae_path", [](auto* r) { r->set_vae_path(std::string(4097, 'v')); },
       "vae_path: 4097 bytes; at most 4096"},
      {"a 1 MiB prediction", [](auto* r) { r->set_prediction(std::string(1 << 20, 'v')); },
       "prediction: 1048576 bytes; at most 64"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    metaload::v1::LoadModelRequest r = Valid();
    c.edit(&r);
    absl::StatusOr<cache::LoadSpec> spec = MakeLoadSpec(r, *resolver_);
    ASSERT_FALSE(spec.ok());
    EXPECT_TRUE(absl::IsInvalidArgument(spec.status())) << spec.status();
    EXPECT_NE(spec.status().message().find(c.message), std::string::npos) << spec.status();
  }
}

// The limits are checked before any work: 100,000 overrides of 1 KiB (the issue's request,
// 100 MB) are refused without building a map of them or resolving the path. Bounded in time
// here (the refusal reads only the sizes): under 50 ms, where parsing them all took seconds.
TEST_F(RequestLimitsTest, TheIssuesFloodIsRefusedBeforeAnyWork) {
  metaload::v1::LoadModelRequest r = Valid();
  r.set_path("does-not-exist.safetensors");  // refused for the overrides, not NOT_FOUND
  for (int i = 0; i < 100000; ++i) {
    (*r.mutable_dtype_overrides())[absl::StrCat(i, std::string(1000, 'k'))] = "keep";
  }
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<cache::LoadSpec> spec = MakeLoadSpec(r, *resolver_);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(absl::IsInvalidArgument(spec.status())) << spec.status();
  EXPECT_NE(spec.status().message().find("dtype_overrides: 100000 entries; at most 1024"),
            std::string::npos)
      << spec.status();
  EXPECT_LT(ms, 50.0);
}

}  // namespace
}  // namespace metaload::service
