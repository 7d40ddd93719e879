// Stable Diffusion XL: small base, refiner and inpainting checkpoints with sgm's key names,
// written by an independent Python implementation (tests/tools/ref_sdxl.py), loaded through the
// real loader; every entry and output against the Python outputs with sd1_test.cc's tolerances,
// the web UI's dtypes, what ModelInfo says, and inputs that do not fit.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "server/core/checkpoint.h"
#include "server/models/registry.h"
#include "tests/models/ldm_reference.h"
#include "tests/test_util.h"

namespace metaload::models {
namespace {

struct Case {
  const char* name;
  std::vector<std::string> flags;
  const char* dtype;
  double tolerance;
  const char* architecture;
  std::vector<std::string> cases;  // what ref_sdxl.py wrote, entries and entry@output
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

const std::vector<std::string> kBase = {
    "unet", "text_encoder", "text_encoder_2", "text_encoder_2@pooled", "vae_decode", "vae_encode"};
const std::vector<std::string> kRefiner = {"unet", "text_encoder_2", "text_encoder_2@pooled",
                                           "vae_decode", "vae_encode"};

class SdxlReferenceTest : public ::testing::TestWithParam<Case> {};

TEST_P(SdxlReferenceTest, EveryEntryMatchesPython) {
  const Case& c = GetParam();
  const std::string dir = LdmReference("ref_sdxl.py", c.flags) / "sd";
  LoadedReference l = LoadReference(dir + "/model.safetensors", c.dtype);
  ASSERT_NE(l.model, nullptr);
  EXPECT_EQ(l.model->architecture(), c.architecture);
  EXPECT_TRUE(l.report.missing_keys.empty());
  EXPECT_TRUE(l.report.unexpected_keys.empty());
  for (const std::string& name : c.cases) {
    EXPECT_LE(ReferenceError(*l.model, dir, name), c.tolerance) << c.name << " " << name;
  }
  std::vector<std::string> entries;
  for (const EntrySpec& e : l.model->Entries()) entries.push_back(e.name);
  std::vector<std::string> expected;
  for (const std::string& name : c.cases) {
    if (name.find('@') == std::string::npos) expected.push_back(name);
  }
  if (expected.size() > 1) EXPECT_EQ(entries, expected);  // the inpainting case runs the UNet
  std::optional<DiffusionInfo> diffusion = l.model->Diffusion();
  ASSERT_TRUE(diffusion.has_value());
  EXPECT_EQ(diffusion->prediction, "epsilon");
  EXPECT_DOUBLE_EQ(diffusion->vae_scale_factor, 0.13025);
}

INSTANTIATE_TEST_SUITE_P(
    Checkpoints, SdxlReferenceTest,
    ::testing::Values(
        Case{"base_fp32", {}, "float32", 1e-4, "sdxl", kBase},
        Case{"base_bf16", {}, "bfloat16", 5e-2, "sdxl", kBase},
        // The web UI's dtypes: UNet and text encoders float16, the VAE float32.
        Case{"base_webui_policy_rounded_reference",
             {"--round", "float16", "--keep", "first_stage_model."},
             "",
             1e-4,
             "sdxl",
             kBase},
        Case{"refiner_fp32", {"--refiner"}, "float32", 1e-4, "sdxl-refiner", kRefiner},
        Case{"refiner_bf16", {"--refiner"}, "bfloat16", 5e-2, "sdxl-refiner", kRefiner},
        Case{"inpainting_bf16",
             {"--in-channels", "9"},
             "bfloat16",
             5e-2,
             "sdxl-inpainting",
             {"unet"}},
        Case{"inpainting_fp32",
             {"--in-channels", "9"},
             "float32",
             1e-4,
             "sdxl-inpainting",
             {"unet"}}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

// The web UI's policy when a load names no dtype: everything float16 but the VAE, float32 (SDXL's
// overflows in float16); the entries say so.
TEST(SdxlTest, DefaultDtypesKeepTheVaeInFloat32) {
  const std::string dir = LdmReference("ref_sdxl.py", {}) / "sd";
  LoadedReference l = LoadReference(dir + "/model.safetensors", "");
  ASSERT_NE(l.model, nullptr);
  for (const EntrySpec& e : l.model->LoadedEntries()) {
    const bool vae = e.name.rfind("vae_", 0) == 0;
    EXPECT_EQ(e.storage_dtype, vae ? core::DType::kFloat32 : core::DType::kFloat16) << e.name;
  }
  uint64_t expected = 0;
  for (const core::TensorInfo& t : l.source->index().tensors) {
    const bool full = t.dtype == core::DType::kInt64 || t.name.rfind("first_stage_model.", 0) == 0;
    expected += static_cast<uint64_t>(t.numel()) * (full ? core::DTypeSize(t.dtype) : 2);
  }
  EXPECT_EQ(l.model->ResidentBytes(), expected);
}

TEST(SdxlTest, APredictionKeyAndBadInputsAreRead) {
  const std::string dir = LdmReference("ref_sdxl.py", {"--v-pred"}) / "sd";
  LoadedReference l = LoadReference(dir + "/model.safetensors", "float32");
  ASSERT_NE(l.model, nullptr);
  EXPECT_EQ(l.model->Diffusion()->prediction, "v");
  EXPECT_EQ(l.model->Diffusion()->prediction_source, "keys: v_pred");
  EXPECT_EQ(l.report.unexpected_keys, std::vector<std::string>{"v_pred"});
  auto message = [&](std::map<std::string, at::Tensor> in) {
    absl::Status s = l.model->Run("unet", in).status();
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    return std::string(s.message());
  };
  const at::Tensor x = at::zeros({1, 4, 8, 8}), t = at::zeros({1}, at::kLong);
  const at::Tensor context = at::zeros({1, 77, 256});
  EXPECT_NE(message({{"x", x}, {"timesteps", t}, {"context", context}}).find("y"),
            std::string::npos);
  EXPECT_NE(message({{"x", x}, {"timesteps", t}, {"context", context}, {"y", at::zeros({2, 1664})}})
                .find("batch sizes differ"),
            std::string::npos);
  EXPECT_NE(message({{"x", x}, {"timesteps", t}, {"context", context}, {"y", at::zeros({1, 16})}})
                .find("y"),
            std::string::npos);
  absl::Status ids =
      l.model->Run("text_encoder_2", {{"input_ids", at::full({1, 3}, 1000, at::kLong)}}).status();
  EXPECT_TRUE(absl::IsInvalidArgument(ids)) << ids;
  EXPECT_NE(ids.message().find("text_encoder_2: input_ids must be in [0, 1000)"), std::string::npos)
      << ids;
}

}  // namespace
}  // namespace metaload::models
