// Every architecture, loaded through the real loader, against an independent Python
// implementation (tests/tools/ref_models.py) on random weights under the Hugging Face key names.
// Tolerances: fp32 max abs error <= 1e-4 x max |logit|; bf16 weights against the float32
// reference <= 5e-2 x. Weights stored in float16 or bfloat16 compute in float32 on a CPU: against
// the reference of the same rounded weights (ref_models.py --round) they are held to 1e-5 x.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "server/core/checkpoint.h"
#include "server/models/registry.h"
#include "tests/test_util.h"

namespace metaload::models {
namespace {

struct Case {
  const char* name;
  const char* arch;
  std::vector<std::string> flags;
  const char* dtype;  // "" = as stored (float32)
  double tolerance;   // relative to max |expected|
  std::map<std::string, std::string> overrides = {};
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class ArchitectureTest : public ::testing::TestWithParam<Case> {};

at::Tensor FromJson(const nlohmann::json& j, at::ScalarType type) {
  std::vector<int64_t> shape;
  const nlohmann::json* cur = &j;
  while (cur->is_array()) {
    shape.push_back(static_cast<int64_t>(cur->size()));
    cur = &(*cur)[0];
  }
  std::vector<double> flat;
  std::function<void(const nlohmann::json&)> walk = [&](const nlohmann::json& v) {
    if (v.is_array()) {
      for (const auto& e : v) walk(e);
    } else {
      flat.push_back(v.get<double>());
    }
  };
  walk(j);
  return at::tensor(flat, at::kDouble).reshape(shape).to(type);
}

TEST_P(ArchitectureTest, MatchesPythonReference) {
  const Case& c = GetParam();
  testing::TempDir dir;
  std::vector<std::string> argv = {
      METALOAD_PYTHON, METALOAD_SOURCE_DIR "/tests/tools/ref_models.py", c.arch, dir / "model"};
  argv.insert(argv.end(), c.flags.begin(), c.flags.end());
  testing::CommandResult r = testing::RunCommand(argv, dir / "py");
  ASSERT_EQ(r.exit_code, 0) << r.err;

  absl::StatusOr<std::unique_ptr<core::CheckpointSource>> source =
      core::CheckpointSource::Open(dir / "model");
  ASSERT_TRUE(source.ok()) << source.status();
  absl::StatusOr<std::unique_ptr<Model>> model = BuildModel("", (*source)->index());
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->architecture(), c.arch);
  core::LoadOptions options;
  absl::StatusOr<core::DtypePolicy> policy = EffectivePolicy(**model, c.dtype, c.overrides);
  ASSERT_TRUE(policy.ok()) << policy.status();
  options.policy = *policy;
  absl::StatusOr<core::LoadReport> report = (*model)->Load(**source, options, {});
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->missing_keys.empty());
  EXPECT_TRUE(report->unexpected_keys.empty());
  EXPECT_EQ((*model)->ParameterCount(), (*source)->index().parameter_count());

  nlohmann::json inputs =
      nlohmann::json::parse(testing::ReadFileOrEmpty(dir / "model/inputs.json"));
  std::map<std::string, at::Tensor> feed;
  for (auto it = inputs.begin(); it != inputs.end(); ++it) {
    feed[it.key()] = FromJson(it.value(), it.key() == "input" ? at::kFloat : at::kLong);
  }
  absl::StatusOr<NamedTensors> out = (*model)->Run("", feed);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 1u);

  nlohmann::json meta =
      nlohmann::json::parse(testing::ReadFileOrEmpty(dir / "model/expected.json"));
  std::string bytes = testing::ReadFileOrEmpty(dir / "model/expected.bin");
  at::Tensor expected =
      at::from_blob(bytes.data(), meta["shape"].get<std::vector<int64_t>>(), at::kFloat).clone();
  // On a CPU every storage dtype computes in float32.
  EXPECT_EQ(out->front().second.scalar_type(), at::kFloat);
  at::Tensor got = out->front().second.to(at::kFloat);
  ASSERT_TRUE(got.sizes().equals(expected.sizes())) << got.sizes() << " vs " << expected.sizes();
  const double max_abs = expected.abs().max().item<double>();
  const double err = (got - expected).abs().max().item<double>();
  RecordProperty("max_abs_error", std::to_string(err));
  std::printf("%s: max abs error %.3g (%.3g of max |output| %.3g)\n", c.name, err, err / max_abs,
              max_abs);
  EXPECT_LE(err, c.tolerance * max_abs) << c.name;
}

INSTANTIATE_TEST_SUITE_P(
    Families, ArchitectureTest,
    ::testing::Values(
        Case{"mlp", "mlp", {}, "", 1e-4}, Case{"gpt2", "gpt2", {}, "", 1e-4},
        Case{"gpt2_unprefixed_sharded", "gpt2", {"--unprefixed", "--shards", "3"}, "", 1e-4},
        Case{"gpt2_bf16", "gpt2", {}, "bfloat16", 5e-2}, Case{"llama", "llama", {}, "", 1e-4},
        Case{"llama_tied_sharded", "llama", {"--tied", "--shards", "2"}, "", 1e-4},
        Case{"llama_bf16", "llama", {}, "bfloat16", 5e-2},
        Case{"mlp_fp16_rounded_reference", "mlp", {"--round", "float16"}, "float16", 1e-5},
        Case{"gpt2_fp16_rounded_reference", "gpt2", {"--round", "float16"}, "float16", 1e-5},
        Case{"llama_bf16_rounded_reference", "llama", {"--round", "bfloat16"}, "bfloat16", 1e-5},
        Case{"llama_tied_fp16_rounded_reference",
             "llama",
             {"--tied", "--round", "float16"},
             "float16",
             1e-5},
        // float8 storage: the matmul weights rounded by float8_ref.py, computed in float32.
        Case{"mlp_fp8_e4m3_rounded_reference",
             "mlp",
             {"--round", "float8_e4m3fn"},
             "float8_e4m3fn",
             1e-5},
        Case{"gpt2_fp8_e5m2_rounded_reference",
             "gpt2",
             {"--round", "float8_e5m2"},
             "float8_e5m2",
             1e-5},
        Case{"llama_fp8_e4m3_rounded_reference",
             "llama",
             {"--round", "float8_e4m3fn"},
             "float8_e4m3fn",
             1e-5},
        // The README's mixed policy: bfloat16 with the token embeddings kept in float32.
        Case{"gpt2_bf16_wte_kept",
             "gpt2",
             {"--round", "bfloat16", "--keep", "transformer.wte."},
             "bfloat16",
             1e-5,
             {{"transformer.wte.", "keep"}}}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

TEST(TorchScriptTest, ScriptedInPythonRunsTheSame) {
  testing::TempDir dir;
  const std::string script =
      "import sys, torch\n"
      "class M(torch.nn.Module):\n"
      "    def __init__(self):\n"
      "        super().__init__()\n"
      "        self.lin = torch.nn.Linear(4, 3)\n"
      "    def forward(self, x, scale):\n"
      "        return torch.tanh(self.lin(x)) * scale\n"
      "torch.manual_seed(0)\n"
      "m = torch.jit.script(M())\n"
      "m.save(sys.argv[1] + '/scripted.pt')\n"
      "x = torch.arange(8, dtype=torch.float32).view(2, 4) / 8\n"
      "open(sys.argv[1] + '/out.bin', 'wb').write(m(x, "
      "torch.tensor(2.0)).detach().numpy().tobytes())\n";
  std::ofstream(dir / "make.py") << script;  // torch.jit.script needs the source in a file
  testing::CommandResult r =
      testing::RunCommand({METALOAD_PYTHON, dir / "make.py", dir.path()}, dir / "py");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  absl::StatusOr<std::unique_ptr<core::CheckpointSource>> source =
      core::CheckpointSource::Open(dir / "scripted.pt");
  ASSERT_TRUE(source.ok()) << source.status();
  absl::StatusOr<std::unique_ptr<Model>> model = BuildModel("", (*source)->index());
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_TRUE((*model)->Load(**source, {}, {}).ok());
  std::vector<EntrySpec> entries = (*model)->Entries();
  ASSERT_EQ(entries.size(), 1u);
  ASSERT_EQ(entries[0].inputs.size(), 2u);
  EXPECT_EQ(entries[0].inputs[0].name, "x");
  EXPECT_EQ(entries[0].inputs[1].name, "scale");
  EXPECT_EQ((*model)->ParameterCount(), 4 * 3 + 3);
  absl::StatusOr<NamedTensors> out = (*model)->Run(
      "forward",
      {{"x", at::arange(8, at::kFloat).view({2, 4}) / 8}, {"scale", at::scalar_tensor(2.0)}});
  ASSERT_TRUE(out.ok()) << out.status();
  std::string bytes = testing::ReadFileOrEmpty(dir / "out.bin");
  at::Tensor expected = at::from_blob(bytes.data(), {2, 3}, at::kFloat).clone();
  EXPECT_TRUE(at::allclose(out->front().second, expected, 1e-6, 1e-6));
  EXPECT_FALSE((*model)->Run("forward", {{"x", at::zeros({2, 4})}}).ok());  // missing "scale"

  // "keep" is the file's dtypes; a dtype converts the whole module; per-prefix overrides cannot
  // be honoured and are refused, not dropped.
  auto load = [&](const std::string& dtype, std::map<std::string, std::string> overrides) {
    absl::StatusOr<std::unique_ptr<Model>> m = BuildModel("", (*source)->index());
    EXPECT_TRUE(m.ok());
    core::LoadOptions options;
    absl::StatusOr<core::DtypePolicy> policy = EffectivePolicy(**m, dtype, overrides);
    if (policy.ok()) options.policy = *policy;
    absl::Status s = policy.ok() ? (*m)->Load(**source, options, {}).status() : policy.status();
    return std::make_pair(s, std::move(*m));
  };
  auto [kept, kept_model] = load("keep", {});
  EXPECT_TRUE(kept.ok()) << kept;
  auto [f64, f64_model] = load("float64", {});
  ASSERT_TRUE(f64.ok()) << f64;
  absl::StatusOr<NamedTensors> wide =
      f64_model->Run("forward", {{"x", at::arange(8, at::kDouble).view({2, 4}) / 8},
                                 {"scale", at::scalar_tensor(2.0, at::kDouble)}});
  ASSERT_TRUE(wide.ok()) << wide.status();
  EXPECT_EQ(wide->front().second.scalar_type(), at::kDouble);
  EXPECT_TRUE(at::allclose(wide->front().second.to(at::kFloat), expected, 1e-6, 1e-6));
  auto [overridden, refused_model] = load("", {{"lin.", "float16"}});
  EXPECT_TRUE(absl::IsInvalidArgument(overridden)) << overridden;
  EXPECT_NE(overridden.message().find("dtype_overrides"), std::string::npos) << overridden;
  EXPECT_TRUE(absl::IsInvalidArgument(load("float8_e4m3fn", {}).first));
  EXPECT_TRUE(absl::IsInvalidArgument(load("int8", {}).first));
}

TEST(RegistryTest, UnknownAndUnsupportedCheckpointsAreNamed) {
  core::CheckpointIndex index;
  index.path = "models/x";
  core::TensorInfo t;
  t.name = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight";
  index.tensors.push_back(t);
  index.by_name[t.name] = 0;
  absl::Status sd3 = BuildModel("", index).status();
  EXPECT_TRUE(absl::IsFailedPrecondition(sd3));
  EXPECT_NE(sd3.message().find("detected sd3; not supported yet"), std::string::npos) << sd3;
  index.tensors[0].name = "foo.bar";
  index.by_name = {{"foo.bar", 0}};
  absl::Status unknown = BuildModel("", index).status();
  EXPECT_NE(unknown.message().find("cannot tell the architecture"), std::string::npos) << unknown;
  EXPECT_NE(unknown.message().find("foo.bar"), std::string::npos) << unknown;
  EXPECT_TRUE(absl::IsFailedPrecondition(BuildModel("resnet", index).status()));
}

}  // namespace
}  // namespace metaload::models
