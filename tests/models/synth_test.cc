#include "server/models/synth.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "server/core/checkpoint.h"
#include "server/models/architecture_detector.h"
#include "server/models/registry.h"
#include "tests/test_util.h"

namespace metaload::models {
namespace {

// The independent Python check: recomputes every weight from the seed and compares bits.
testing::CommandResult CheckWithPython(const std::string& dir, uint64_t seed,
                                       const std::string& log) {
  return testing::RunCommand(
      {METALOAD_PYTHON, METALOAD_SOURCE_DIR "/tests/tools/safetensors_ref.py", "check-synth", dir,
       std::to_string(seed)},
      log);
}

TEST(SynthTest, TinyMlpMatchesPythonReference) {
  testing::TempDir dir;
  SynthOptions options;
  absl::StatusOr<SynthResult> r = Synthesize(options, dir / "mlp");
  ASSERT_TRUE(r.ok()) << r.status();
  // 16 -> 32 -> 32 -> 8 with biases.
  EXPECT_EQ(r->tensor_count, 6);
  EXPECT_EQ(r->parameter_count, 16 * 32 + 32 + 32 * 32 + 32 + 32 * 8 + 8);
  EXPECT_EQ(r->data_bytes, r->parameter_count * 4);
  EXPECT_EQ(r->files, (std::vector<std::string>{"model.safetensors", "config.json"}));
  testing::CommandResult py = CheckWithPython(dir / "mlp", 0, dir / "py");
  ASSERT_EQ(py.exit_code, 0) << py.err;
  nlohmann::json j = nlohmann::json::parse(py.out);
  EXPECT_EQ(j["tensors"], 6);
  EXPECT_EQ(j["checked_values"], r->parameter_count);
}

TEST(SynthTest, ShardedHalfPrecisionMatchesPythonReference) {
  for (const char* dtype : {"float16", "bfloat16"}) {
    testing::TempDir dir;
    SynthOptions options;
    options.dtype = dtype;
    options.shards = 3;
    options.seed = 42;
    absl::StatusOr<SynthResult> r = Synthesize(options, dir / "mlp");
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->data_bytes, r->parameter_count * 2);
    EXPECT_EQ(r->files.size(), 5u);  // 3 shards, the index, config.json
    testing::CommandResult py = CheckWithPython(dir / "mlp", 42, dir / "py");
    ASSERT_EQ(py.exit_code, 0) << dtype << ": " << py.err;
    EXPECT_EQ(nlohmann::json::parse(py.out)["dtype"], dtype);
    // The Python check must fail for the wrong seed: it really compares values.
    EXPECT_EQ(CheckWithPython(dir / "mlp", 43, dir / "py43").exit_code, 1);
  }
}

TEST(SynthTest, SameOptionsSameBytes) {
  testing::TempDir dir;
  SynthOptions options;
  ASSERT_TRUE(Synthesize(options, dir / "a").ok());
  ASSERT_TRUE(Synthesize(options, dir / "b").ok());
  options.seed = 1;
  ASSERT_TRUE(Synthesize(options, dir / "c").ok());
  std::string a = testing::ReadFileOrEmpty(dir / "a/model.safetensors");
  EXPECT_FALSE(a.empty());
  EXPECT_EQ(a, testing::ReadFileOrEmpty(dir / "b/model.safetensors"));
  EXPECT_NE(a, testing::ReadFileOrEmpty(dir / "c/model.safetensors"));
}

TEST(SynthTest, RejectsUnknownOptionsByName) {
  testing::TempDir dir;
  SynthOptions options;
  options.preset = "huge";
  absl::Status s = Synthesize(options, dir.path()).status();
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("huge"), std::string::npos);
  options = SynthOptions();
  options.architecture = "resnet";
  EXPECT_TRUE(absl::IsInvalidArgument(Synthesize(options, dir.path()).status()));
  options = SynthOptions();
  options.dtype = "int8";
  EXPECT_TRUE(absl::IsInvalidArgument(Synthesize(options, dir.path()).status()));
  options = SynthOptions();
  options.shards = 7;
  EXPECT_TRUE(absl::IsInvalidArgument(Synthesize(options, dir.path()).status()));
}

}  // namespace
}  // namespace metaload::models

namespace metaload::models {
namespace {

// Every synthesized family is recognised, loads through the registry and runs.
TEST(SynthTest, EveryArchitectureLoadsAndRuns) {
  for (const char* arch : {"mlp", "gpt2", "llama"}) {
    testing::TempDir dir;
    SynthOptions options;
    options.architecture = arch;
    options.shards = 2;
    absl::StatusOr<SynthResult> r = Synthesize(options, dir / "m");
    ASSERT_TRUE(r.ok()) << arch << ": " << r.status();
    auto source = core::CheckpointSource::Open(dir / "m");
    ASSERT_TRUE(source.ok()) << source.status();
    EXPECT_EQ(DetectArchitecture((*source)->index()).name, arch);
    EXPECT_EQ((*source)->index().total_bytes(), static_cast<uint64_t>(r->data_bytes));
    auto model = BuildModel("", (*source)->index());
    ASSERT_TRUE(model.ok()) << model.status();
    auto report = (*model)->Load(**source, {});
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_TRUE(report->unexpected_keys.empty()) << arch;
    std::map<std::string, at::Tensor> feed;
    if (std::string(arch) == "mlp") {
      feed["input"] = at::ones({2, 16});
    } else {
      feed["input_ids"] = at::arange(6, at::kLong).view({1, 6});
    }
    auto out = (*model)->Run("", feed);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_TRUE(out->front().second.isfinite().all().item<bool>()) << arch;
  }
}

}  // namespace
}  // namespace metaload::models
