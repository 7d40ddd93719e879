// Stable Diffusion 2.x: small checkpoints with the real LDM and open_clip key names, written by
// an independent Python implementation (tests/tools/ref_sd2.py), loaded through the real
// loader; all four entries against the Python outputs with sd1_test.cc's tolerances (fp32 and
// the rounded references <= 1e-4 x max |output|, bf16 against float32 <= 5e-2 x). Then what the
// keys cannot tell (the prediction, OpenCLIP's full depth) and the families that are named but
// not built.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/core/checkpoint.h"
#include "server/models/ldm_keys.h"
#include "server/models/registry.h"
#include "tests/models/ldm_reference.h"
#include "tests/test_util.h"

namespace metaload::models {
namespace {

const char* const kEntries[] = {"unet", "text_encoder", "vae_decode", "vae_encode"};

struct Case {
  const char* name;
  std::vector<std::string> flags;
  const char* dtype;
  double tolerance;
  const char* architecture;
  const char* prediction;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class Sd2ReferenceTest : public ::testing::TestWithParam<Case> {};

TEST_P(Sd2ReferenceTest, EveryEntryMatchesPython) {
  const Case& c = GetParam();
  const std::string dir = LdmReference("ref_sd2.py", c.flags) / "sd";
  LoadedReference l = LoadReference(dir + "/model.safetensors", c.dtype);
  ASSERT_NE(l.model, nullptr);
  EXPECT_EQ(l.model->architecture(), c.architecture);
  EXPECT_TRUE(l.report.missing_keys.empty());
  EXPECT_TRUE(l.report.unexpected_keys.empty());  // text_projection and logit_scale are held
  for (const char* entry : kEntries) {
    EXPECT_LE(ReferenceError(*l.model, dir, entry), c.tolerance) << c.name << " " << entry;
  }
  std::optional<DiffusionInfo> diffusion = l.model->Diffusion();
  ASSERT_TRUE(diffusion.has_value());
  EXPECT_EQ(diffusion->prediction, c.prediction) << diffusion->prediction_source;
  EXPECT_DOUBLE_EQ(diffusion->vae_scale_factor, 0.18215);
  EXPECT_EQ(l.model->Entries().front().outputs.front().name, "model_output");
}

INSTANTIATE_TEST_SUITE_P(
    Checkpoints, Sd2ReferenceTest,
    ::testing::Values(
        Case{"fp32_512_base", {}, "float32", 1e-4, "sd2", "epsilon"},
        Case{"fp32_768_v", {"--v"}, "float32", 1e-4, "sd2", "v"},
        Case{"bf16", {}, "bfloat16", 5e-2, "sd2", "epsilon"},
        Case{"bf16_768_v", {"--v"}, "bfloat16", 5e-2, "sd2", "v"},
        Case{"inpainting_bf16",
             {"--in-channels", "9"},
             "bfloat16",
             5e-2,
             "sd2-inpainting",
             "epsilon"},
        // The web UI's policy (no dtype named): UNet and text encoder float16.
        Case{"webui_policy_rounded_reference",
             {"--round", "float16", "--keep", "first_stage_model."},
             "",
             1e-4,
             "sd2",
             "epsilon"},
        // Shared SD2 files are mostly float16, loaded as stored; the statistic
        // survives the rounding.
        Case{"fp16_file_kept_v",
             {"--v", "--round", "float16", "--store", "float16"},
             "keep",
             1e-4,
             "sd2",
             "v"},
        Case{"inpainting", {"--in-channels", "9"}, "float32", 1e-4, "sd2-inpainting", "epsilon"}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

TEST(Sd2Test, ThePredictionSaysHowItWasTold) {
  LoadedReference eps =
      LoadReference(LdmReference("ref_sd2.py", {}) / "sd/model.safetensors", "float32");
  LoadedReference v =
      LoadReference(LdmReference("ref_sd2.py", {"--v"}) / "sd/model.safetensors", "float32");
  LoadedReference inpaint = LoadReference(
      LdmReference("ref_sd2.py", {"--in-channels", "9"}) / "sd/model.safetensors", "float32");
  ASSERT_TRUE(eps.model && v.model && inpaint.model);
  const std::string key =
      "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias";
  EXPECT_NE(eps.model->Diffusion()->prediction_source.find("weights: std of " + key),
            std::string::npos)
      << eps.model->Diffusion()->prediction_source;
  EXPECT_NE(eps.model->Diffusion()->prediction_source.find("<= 0.09"), std::string::npos);
  EXPECT_NE(v.model->Diffusion()->prediction_source.find("> 0.09"), std::string::npos);
  EXPECT_EQ(inpaint.model->Diffusion()->prediction_source,
            "architecture: SD2 inpainting predicts the noise");
}

// An index of names and shapes only, for what detection and the key readers decide.
class FakeIndex {
 public:
  FakeIndex& Add(const std::string& name, std::vector<int64_t> shape) {
    core::TensorInfo t;
    t.name = name;
    t.shape = std::move(shape);
    index_.by_name[name] = index_.tensors.size();
    index_.tensors.push_back(t);
    return *this;
  }
  const core::CheckpointIndex& index() {
    index_.path = "models/x.safetensors";
    return index_;
  }

 private:
  core::CheckpointIndex index_;
};

FakeIndex OpenClip(int64_t width, int64_t layers) {
  FakeIndex f;
  const std::string p = "cond_stage_model.model.";
  f.Add(p + "token_embedding.weight", {49408, width}).Add(p + "positional_embedding", {77, width});
  for (int64_t i = 0; i < layers; ++i) {
    f.Add(absl::StrCat(p, "transformer.resblocks.", i, ".mlp.c_fc.weight"), {4 * width, width});
  }
  return f;
}

// ViT-H/14 has 24 layers: a file with 23 left out the last one and runs them all; with 24 the
// penultimate is the 23rd. A width open_clip has no config for counts the file's resblocks.
TEST(Sd2Test, OpenClipPenultimateCountsTheFullDepth) {
  auto output_layer = [](FakeIndex f) {
    absl::StatusOr<OpenClipConfig> c = ReadOpenClip({f.index(), "sd2"}, "cond_stage_model.model.");
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? c->output_layer : -1;
  };
  EXPECT_EQ(output_layer(OpenClip(1024, 24)), 23);
  EXPECT_EQ(output_layer(OpenClip(1024, 23)), 23);
  EXPECT_EQ(output_layer(OpenClip(1280, 31)), 31);  // bigG: 32
  EXPECT_EQ(output_layer(OpenClip(128, 3)), 2);
  FakeIndex one = OpenClip(128, 1);
  absl::Status s = ReadOpenClip({one.index(), "sd2"}, "cond_stage_model.model.").status();
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  EXPECT_NE(s.message().find("two resblocks"), std::string::npos) << s;
  EXPECT_EQ(OpenClip(1024, 24).index().tensors.size(), 26u);
}

// A size of zero (safetensors allows it) or beyond any real network is refused naming the key,
// before anything divides by it: once a SIGFPE that took the daemon down.
TEST(Sd2Test, SizesOfZeroOrHugeAreRefused) {
  const std::string unet = "model.diffusion_model.";
  for (int64_t bad : {int64_t{0}, int64_t{1} << 40}) {
    FakeIndex f = OpenClip(1024, 24);
    f.Add(unet + "input_blocks.0.0.weight", {bad, 4, 3, 3})
        .Add(unet + "out.2.weight", {4, 320, 3, 3});
    absl::Status s = BuildModel("", f.index()).status();
    EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
    EXPECT_NE(s.message().find(absl::StrCat("input_blocks.0.0.weight has a dimension of ", bad)),
              std::string::npos)
        << s;
  }
  FakeIndex vae = OpenClip(1024, 24);
  vae.Add("first_stage_model.encoder.conv_in.weight", {0, 3, 3, 3});
  absl::StatusOr<VaeConfig> c = ReadVae({vae.index(), "sd2"}, "first_stage_model.");
  EXPECT_TRUE(absl::IsFailedPrecondition(c.status())) << c.status();
}

// Every diffusion family metaload does not build is named, never loaded as another (SDXL's
// markers, conditioner.embedders., make an SDXL load: sdxl_test.cc).
TEST(Sd2Test, OtherDiffusionFamiliesAreNamed) {
  const std::string unet = "model.diffusion_model.";
  struct Family {
    const char* name;
    FakeIndex index;
  };
  std::vector<Family> families;
  families.push_back(
      {"sd2-depth", OpenClip(1024, 24)
                        .Add(unet + "input_blocks.0.0.weight", {320, 5, 3, 3})
                        .Add("depth_model.model.pretrained.act_postprocess1.0", {1})});
  families.push_back(
      {"sd3", FakeIndex()
                  .Add(unet + "joint_blocks.0.x_block.attn.qkv.weight", {4608, 1536})
                  .Add("first_stage_model.decoder.conv_in.weight", {512, 16, 3, 3})});
  families.push_back(
      {"flux", FakeIndex().Add("double_blocks.0.img_attn.qkv.weight", {9216, 3072})});
  families.push_back(
      {"flux", FakeIndex().Add(unet + "double_blocks.0.img_attn.qkv.weight", {9216, 3072})});
  families.push_back({"stable-cascade", FakeIndex().Add("clf.1.weight", {16, 2048, 1, 1})});
  for (Family& f : families) {
    absl::Status s = BuildModel("", f.index.index()).status();
    EXPECT_TRUE(absl::IsFailedPrecondition(s)) << f.name << ": " << s;
    EXPECT_NE(s.message().find(absl::StrCat("detected ", f.name, "; not supported yet")),
              std::string::npos)
        << s;
  }
  // Asked for sd1 on an SD2 file: the first missing key is named.
  FakeIndex sd2 = OpenClip(1024, 24);
  sd2.Add(unet + "input_blocks.0.0.weight", {320, 4, 3, 3});
  absl::Status forced = BuildModel("sd1", sd2.index()).status();
  EXPECT_TRUE(absl::IsFailedPrecondition(forced));
  EXPECT_NE(forced.message().find("lacks model.diffusion_model.out.2.weight"), std::string::npos)
      << forced;
}

}  // namespace
}  // namespace metaload::models
