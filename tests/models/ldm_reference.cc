#include "tests/models/ldm_reference.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

namespace metaload::models {

const testing::TempDir& LdmReference(const std::string& script,
                                     const std::vector<std::string>& flags) {
  static auto* made = new std::map<std::vector<std::string>, std::unique_ptr<testing::TempDir>>();
  std::vector<std::string> key = flags;
  key.insert(key.begin(), script);
  std::unique_ptr<testing::TempDir>& dir = (*made)[key];
  if (!dir) {
    dir = std::make_unique<testing::TempDir>();
    std::vector<std::string> argv = {METALOAD_PYTHON, METALOAD_SOURCE_DIR "/tests/tools/" + script,
                                     *dir / "sd"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    testing::CommandResult r = testing::RunCommand(argv, *dir / "py");
    EXPECT_EQ(r.exit_code, 0) << r.err;
  }
  return *dir;
}

namespace {

at::Tensor ReadTensor(const std::string& path, const nlohmann::json& spec) {
  std::string bytes = testing::ReadFileOrEmpty(path);
  const at::ScalarType type = spec["dtype"] == "int64" ? at::kLong : at::kFloat;
  return at::from_blob(bytes.data(), spec["shape"].get<std::vector<int64_t>>(), type).clone();
}

}  // namespace

LoadedReference LoadReference(const std::string& path, const std::string& dtype,
                              const ComputeChoice& compute, const std::string& vae_path) {
  LoadedReference l;
  core::CheckpointSource::Options source_options;
  source_options.overlay_path = vae_path;
  source_options.overlay_prefix = "first_stage_model.";
  absl::StatusOr<std::unique_ptr<core::CheckpointSource>> source =
      core::CheckpointSource::Open(path, source_options);
  EXPECT_TRUE(source.ok()) << source.status();
  if (!source.ok()) return l;
  l.source = *std::move(source);
  absl::StatusOr<std::unique_ptr<Model>> model = BuildModel("", l.source->index());
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return l;
  core::LoadOptions options;
  absl::StatusOr<core::DtypePolicy> policy = EffectivePolicy(**model, dtype);
  EXPECT_TRUE(policy.ok()) << policy.status();
  if (!policy.ok()) return l;
  options.policy = *policy;
  absl::StatusOr<core::LoadReport> report = (*model)->Load(*l.source, options, compute);
  EXPECT_TRUE(report.ok()) << report.status();
  if (!report.ok()) return l;
  l.model = *std::move(model);
  l.report = *report;
  return l;
}

double ReferenceError(const Model& model, const std::string& dir, const std::string& name) {
  nlohmann::json cases = nlohmann::json::parse(testing::ReadFileOrEmpty(dir + "/cases.json"));
  const nlohmann::json& c = cases[name];
  // "entry@output": that output of the entry, whose inputs are the entry's.
  const size_t at = name.find('@');
  const std::string entry = name.substr(0, at);
  const std::string output = at == std::string::npos ? "" : name.substr(at + 1);
  std::map<std::string, at::Tensor> feed;
  for (auto it = c["inputs"].begin(); it != c["inputs"].end(); ++it) {
    feed[it.key()] = ReadTensor(dir + "/" + entry + "." + it.key() + ".bin", it.value());
  }
  absl::StatusOr<NamedTensors> out = model.Run(entry, feed);
  EXPECT_TRUE(out.ok()) << entry << ": " << out.status();
  if (!out.ok()) return 1e9;
  at::Tensor expected =
      ReadTensor(dir + "/" + name + ".out.bin", {{"shape", c["output"]}, {"dtype", "float32"}});
  at::Tensor got = out->front().second;
  for (const auto& [out_name, tensor] : *out) {
    if (out_name == output) got = tensor;
  }
  got = got.to(at::kFloat);
  EXPECT_TRUE(got.sizes().equals(expected.sizes())) << entry << ": " << got.sizes();
  if (!got.sizes().equals(expected.sizes())) return 1e9;
  const double max_abs = expected.abs().max().item<double>();
  const double err = (got - expected).abs().max().item<double>() / max_abs;
  std::printf("%s: max abs error / max |output| = %.3g (max |output| %.3g)\n", name.c_str(), err,
              max_abs);
  return err;
}

}  // namespace metaload::models
