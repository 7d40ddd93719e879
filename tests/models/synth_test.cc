#include "server/models/synth.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>
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

// float8: the weights one byte per value (F8_E4M3 / F8_E5M2, float8_ref.py's codec), the
// biases float16; the checkpoint loads as float8 and runs.
TEST(SynthTest, Float8MatchesPythonReferenceAndLoadsAsStored) {
  for (const char* dtype : {"float8_e4m3fn", "float8_e5m2"}) {
    testing::TempDir dir;
    SynthOptions options;
    options.dtype = dtype;
    options.seed = 5;
    absl::StatusOr<SynthResult> r = Synthesize(options, dir / "mlp");
    ASSERT_TRUE(r.ok()) << r.status();
    const int64_t biases = 32 + 32 + 8;
    EXPECT_EQ(r->data_bytes, (r->parameter_count - biases) + 2 * biases);
    testing::CommandResult py = CheckWithPython(dir / "mlp", 5, dir / "py");
    ASSERT_EQ(py.exit_code, 0) << dtype << ": " << py.err;
    EXPECT_EQ(CheckWithPython(dir / "mlp", 6, dir / "py6").exit_code, 1);

    absl::StatusOr<std::unique_ptr<core::CheckpointSource>> source =
        core::CheckpointSource::Open(dir / "mlp");
    ASSERT_TRUE(source.ok()) << source.status();
    EXPECT_EQ((*source)->index().Find("layers.0.weight")->dtype, *core::DTypeFromName(dtype));
    absl::StatusOr<std::unique_ptr<Model>> model = BuildModel("", (*source)->index());
    ASSERT_TRUE(model.ok()) << model.status();
    core::LoadOptions load;
    load.policy = *EffectivePolicy(**model, "");
    const uint64_t admitted = (*model)->EstimateBytes((*source)->index(), load.policy, false).bytes;
    ASSERT_TRUE((*model)->Load(**source, load, {}).ok());
    EXPECT_EQ((*model)->ResidentBytes(), r->data_bytes);
    EXPECT_EQ(admitted, r->data_bytes);  // exact: one byte per float8 value
    const EntrySpec entry = (*model)->LoadedEntries().front();
    EXPECT_EQ(entry.storage_dtype, *core::DTypeFromName(dtype));
    EXPECT_EQ(entry.compute_dtype, core::DType::kFloat32);
    absl::StatusOr<NamedTensors> out = (*model)->Run("", {{"input", at::ones({2, 16})}});
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->front().second.scalar_type(), at::kFloat);
    EXPECT_TRUE(out->front().second.isfinite().all().item<bool>());
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
    auto report = (*model)->Load(**source, {}, {});
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

// Two independent enumerations of SD1's LDM keys agree: the synthesizer's (C++) and the Python
// reference's (ldm's module structure); and the synthetic checkpoint loads and runs every entry.
TEST(SynthTest, Sd1TinyHasTheReferenceKeySetAndRuns) {
  testing::TempDir dir;
  SynthOptions options;
  options.architecture = "sd1";
  absl::StatusOr<SynthResult> r = Synthesize(options, dir / "sd");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->files, (std::vector<std::string>{"model.safetensors"}));
  testing::CommandResult py = testing::RunCommand(
      {METALOAD_PYTHON, METALOAD_SOURCE_DIR "/tests/tools/ref_sd1.py", dir / "ref"}, dir / "py");
  ASSERT_EQ(py.exit_code, 0) << py.err;
  auto ours = core::CheckpointSource::Open(dir / "sd/model.safetensors");
  auto theirs = core::CheckpointSource::Open(dir / "ref/model.safetensors");
  ASSERT_TRUE(ours.ok() && theirs.ok());
  std::map<std::string, std::vector<int64_t>> a, b;
  for (const core::TensorInfo& t : (*ours)->index().tensors) a[t.name] = t.shape;
  for (const core::TensorInfo& t : (*theirs)->index().tensors) b[t.name] = t.shape;
  EXPECT_EQ(a.size(), b.size());
  for (const auto& [name, shape] : b) {
    auto it = a.find(name);
    if (it == a.end()) {
      ADD_FAILURE() << "synth lacks " << name;
    } else {
      EXPECT_EQ(it->second, shape) << name;
    }
  }

  EXPECT_EQ(DetectArchitecture((*ours)->index()).name, "sd1");
  auto model = BuildModel("", (*ours)->index());
  ASSERT_TRUE(model.ok()) << model.status();
  core::LoadOptions load;
  load.policy = *EffectivePolicy(**model, "float32");
  auto report = (*model)->Load(**ours, load, {});
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->unexpected_keys.empty());
  const std::map<std::string, std::map<std::string, at::Tensor>> feeds = {
      {"unet",
       {{"x", at::ones({1, 4, 8, 8})},
        {"timesteps", at::full({1}, 500, at::kLong)},
        {"context", at::ones({1, 77, 128})}}},
      {"text_encoder", {{"input_ids", at::arange(77, at::kLong).view({1, 77})}}},
      {"vae_decode", {{"latents", at::ones({1, 4, 4, 4})}}},
      {"vae_encode", {{"image", at::zeros({1, 3, 32, 32})}}}};
  const std::map<std::string, std::vector<int64_t>> shapes = {{"unet", {1, 4, 8, 8}},
                                                              {"text_encoder", {1, 77, 128}},
                                                              {"vae_decode", {1, 3, 32, 32}},
                                                              {"vae_encode", {1, 4, 4, 4}}};
  for (const auto& [entry, feed] : feeds) {
    auto out = (*model)->Run(entry, feed);
    ASSERT_TRUE(out.ok()) << entry << ": " << out.status();
    const at::Tensor& y = out->front().second;
    EXPECT_EQ(y.sizes().vec(), shapes.at(entry)) << entry;
    EXPECT_TRUE(y.isfinite().all().item<bool>()) << entry;
  }
}

}  // namespace
}  // namespace metaload::models
