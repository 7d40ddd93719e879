// Stable Diffusion 1.x: small checkpoints with the real LDM key names, written by an independent
// Python implementation (tests/tools/ref_sd1.py, ldm's and transformers' structure), loaded through
// the real loader; all four entries against the Python outputs. Tolerances as for the other
// architectures: fp32 max abs error <= 1e-4 x max |output|; bf16 weights against the float32
// outputs <= 5e-2 x. Weights stored in float16 or bfloat16 compute in float32 on a CPU, so
// against the Python outputs of the same rounded weights (ref_sd1.py --round) they are held to
// the float32 limit, on every CPU (measured up to 1.2e-5 with ATEN_CPU_CAPABILITY=default, where
// the float32 UNet itself differs from Python by as much).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "server/core/checkpoint.h"
#include "server/models/registry.h"
#include "tests/models/ldm_reference.h"
#include "tests/test_util.h"

namespace metaload::models {
namespace {

const char* const kEntries[] = {"unet", "text_encoder", "vae_decode", "vae_encode"};

const testing::TempDir& Reference(const std::vector<std::string>& flags) {
  return LdmReference("ref_sd1.py", flags);
}

struct Case {
  const char* name;
  std::vector<std::string> flags;
  const char* file;
  const char* dtype;
  double tolerance;
  const char* architecture;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class Sd1ReferenceTest : public ::testing::TestWithParam<Case> {};

TEST_P(Sd1ReferenceTest, EveryEntryMatchesPython) {
  const Case& c = GetParam();
  const std::string dir = Reference(c.flags) / "sd";
  LoadedReference l = LoadReference(dir + "/" + c.file, c.dtype);
  ASSERT_NE(l.model, nullptr);
  EXPECT_EQ(l.model->architecture(), c.architecture);
  EXPECT_TRUE(l.report.missing_keys.empty());
  for (const char* entry : kEntries) {
    // The variants differ in the UNet only.
    const bool variant =
        std::find(c.flags.begin(), c.flags.end(), "--in-channels") != c.flags.end();
    if (variant && std::string(entry) != "unet") continue;
    EXPECT_LE(ReferenceError(*l.model, dir, entry), c.tolerance) << c.name << " " << entry;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Checkpoints, Sd1ReferenceTest,
    ::testing::Values(
        Case{"safetensors_fp32", {}, "model.safetensors", "float32", 1e-4, "sd1"},
        Case{"safetensors_bf16", {}, "model.safetensors", "bfloat16", 5e-2, "sd1"},
        Case{"bf16_storage_rounded_reference",
             {"--round", "bfloat16"},
             "model.safetensors",
             "bfloat16",
             1e-4,
             "sd1"},
        // The web UI's policy (no dtype named): UNet and text encoder stored in float16.
        Case{"webui_policy_rounded_reference",
             {"--round", "float16", "--keep", "first_stage_model."},
             "model.safetensors",
             "",
             1e-4,
             "sd1"},
        // float8 storage of every network's matmul and convolution weights (float8_ref.py).
        Case{"fp8_e4m3_storage_rounded_reference",
             {"--round", "float8_e4m3fn"},
             "model.safetensors",
             "float8_e4m3fn",
             1e-4,
             "sd1"},
        // Most shared SD1 files: every network stored in float16, loaded as stored.
        Case{"fp16_file_kept",
             {"--round", "float16", "--store", "float16"},
             "model.safetensors",
             "keep",
             1e-4,
             "sd1"},
        // The original releases: a .ckpt zip, CLIP keys without text_model., EMA weights kept.
        Case{"ckpt_short_clip_ema",
             {"--ckpt", "--short-clip", "--ema"},
             "model.ckpt",
             "float32",
             1e-4,
             "sd1"},
        Case{"inpainting",
             {"--in-channels", "9"},
             "model.safetensors",
             "float32",
             1e-4,
             "sd1-inpainting"},
        // This random 8-channel UNet amplifies rounding: the Python reference against itself
        // differs by 5.7e-5 between 1 and 2 OpenBLAS threads and by 1.05e-4 between OpenBLAS and
        // the reference BLAS, so 1e-4 would test the BLAS, not metaload (measured 8.1e-5).
        Case{"instruct_pix2pix",
             {"--in-channels", "8"},
             "model.safetensors",
             "float32",
             3e-4,
             "sd1-instruct-pix2pix"}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

// Every UNet size comes from the keys: SD1-layout UNets with 1, 2 and 3 res blocks per level
// (ref_sd1.py's UNET["res_blocks"], set from here) load with every key used and match Python.
// Before the fix only 2 loaded ("UNet levels with different numbers of res blocks").
class Sd1ResBlocksTest : public ::testing::TestWithParam<int> {};

TEST_P(Sd1ResBlocksTest, UnetMatchesPython) {
  testing::TempDir dir;
  const std::string script = absl::StrCat(
      "import sys; sys.path.insert(0, sys.argv[1]); import ref_sd1; "
      "ref_sd1.UNET['res_blocks'] = ",
      GetParam(), "; sys.argv = ['ref_sd1.py', sys.argv[2]]; ref_sd1.main()");
  testing::CommandResult r = testing::RunCommand(
      {METALOAD_PYTHON, "-c", script, METALOAD_SOURCE_DIR "/tests/tools", dir / "sd"}, dir / "py");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  LoadedReference l = LoadReference(dir / "sd/model.safetensors", "float32");
  ASSERT_NE(l.model, nullptr);
  EXPECT_TRUE(l.report.missing_keys.empty());
  EXPECT_TRUE(l.report.unexpected_keys.empty());
  // The file has what was asked: one input block per res block and level (4 levels), 3
  // downsamplers and the stem, so blocks 0 .. 4R+3.
  const std::string last = absl::StrCat("model.diffusion_model.input_blocks.", 4 * GetParam() + 3);
  EXPECT_NE(l.source->index().Find(last + ".0.in_layers.0.weight"), nullptr);
  EXPECT_EQ(l.source->index().Find(absl::StrCat("model.diffusion_model.input_blocks.",
                                                4 * GetParam() + 4, ".0.in_layers.0.weight")),
            nullptr);
  EXPECT_LE(ReferenceError(*l.model, dir / "sd", "unet"), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(PerLevel, Sd1ResBlocksTest, ::testing::Values(1, 2, 3));

TEST(Sd1Test, KeysOutsideTheNetworksAreReportedNotErrors) {
  const std::string dir = Reference({"--ckpt", "--short-clip", "--ema"}) / "sd";
  LoadedReference l = LoadReference(dir + "/model.ckpt", "float32");
  ASSERT_NE(l.model, nullptr);
  std::vector<std::string> unexpected = l.report.unexpected_keys;
  std::sort(unexpected.begin(), unexpected.end());
  EXPECT_EQ(unexpected,
            (std::vector<std::string>{"model_ema.decay", "model_ema.diffusion_modelout2weight",
                                      "model_ema.num_updates"}));
  // Everything else, schedule buffers and CLIP's position_ids included, is held by the model.
  uint64_t held = 0;
  for (const core::TensorInfo& t : l.source->index().tensors) {
    if (t.name.rfind("model_ema.", 0) != 0) held += t.nbytes;
  }
  EXPECT_EQ(l.model->ResidentBytes(), held);
}

// The web UI's policy when a load names no dtype: UNet and text encoder float16, the VAE and
// alphas_cumprod as stored; "keep" keeps everything.
TEST(Sd1Test, DefaultDtypesAreTheWebUis) {
  const std::string dir = Reference({}) / "sd";
  const core::CheckpointIndex* index = nullptr;
  LoadedReference def = LoadReference(dir + "/model.safetensors", "");
  ASSERT_NE(def.model, nullptr);
  index = &def.source->index();
  uint64_t expected = 0;
  for (const core::TensorInfo& t : index->tensors) {
    const bool as_stored = t.dtype == core::DType::kInt64 ||
                           t.name.rfind("first_stage_model.", 0) == 0 ||
                           t.name.rfind("alphas_cumprod", 0) == 0;
    expected += static_cast<uint64_t>(t.numel()) * (as_stored ? core::DTypeSize(t.dtype) : 2);
  }
  EXPECT_EQ(def.model->ResidentBytes(), expected);
  // The VAE ran in float32, as stored: same values as the reference.
  EXPECT_LE(ReferenceError(*def.model, dir, "vae_decode"), 1e-4);
  // The float16 UNet runs on a CPU, in float32 (webui_policy_rounded_reference checks values).
  absl::StatusOr<NamedTensors> unet =
      def.model->Run("unet", {{"x", at::zeros({1, 4, 8, 8})},
                              {"timesteps", at::zeros({1}, at::kLong)},
                              {"context", at::zeros({1, 77, 128})}});
  ASSERT_TRUE(unet.ok()) << unet.status();
  EXPECT_EQ(unet->front().second.scalar_type(), at::kFloat);

  LoadedReference keep = LoadReference(dir + "/model.safetensors", "keep");
  ASSERT_NE(keep.model, nullptr);
  uint64_t stored = 0;
  for (const core::TensorInfo& t : index->tensors) stored += t.nbytes;
  EXPECT_EQ(keep.model->ResidentBytes(), stored);
  EXPECT_EQ(keep.report.converted, 0);
}

// A UNet stored in float8: admission counts one byte per converted value, exactly what the
// load holds; against the same UNet in float16 it is about half (the rest: biases and norms,
// kept as stored, and embeddings).
TEST(Sd1Test, Float8UNetIsAdmittedAtItsStoredBytes) {
  const std::string dir = Reference({}) / "sd";
  auto admitted = [&](const LoadedReference& l,
                      const std::map<std::string, std::string>& overrides) {
    return l.model
        ->EstimateBytes(l.source->index(), *EffectivePolicy(*l.model, "", overrides), false)
        .bytes;
  };
  const std::map<std::string, std::string> fp8 = {{"model.diffusion_model.", "float8_e4m3fn"}};
  const std::map<std::string, std::string> fp16 = {{"model.diffusion_model.", "float16"}};
  LoadedReference l;
  absl::StatusOr<std::unique_ptr<core::CheckpointSource>> source =
      core::CheckpointSource::Open(dir + "/model.safetensors");
  ASSERT_TRUE(source.ok()) << source.status();
  l.source = *std::move(source);
  absl::StatusOr<std::unique_ptr<Model>> model = BuildModel("", l.source->index());
  ASSERT_TRUE(model.ok()) << model.status();
  l.model = *std::move(model);
  const uint64_t want = admitted(l, fp8);  // before loading: from the skeleton on meta
  core::LoadOptions options;
  options.policy = *EffectivePolicy(*l.model, "", fp8);
  ASSERT_TRUE(l.model->Load(*l.source, options, {}).ok());
  EXPECT_EQ(l.model->ResidentBytes(), want);
  uint64_t rest = 0, unet = 0;  // bytes outside the UNet, as stored; UNet values
  for (const core::TensorInfo& t : l.source->index().tensors) {
    (t.name.rfind("model.diffusion_model.", 0) == 0 ? unet : rest) += t.nbytes;
  }
  const double fp8_unet = static_cast<double>(want - rest);
  const double fp16_unet = static_cast<double>(admitted(l, fp16) - rest);
  std::printf("UNet: %.0f bytes in float8, %.0f in float16 (%.3f)\n", fp8_unet, fp16_unet,
              fp8_unet / fp16_unet);
  EXPECT_EQ(fp16_unet, static_cast<double>(unet) / 2);  // the float32 file's UNet, halved
  EXPECT_LT(fp8_unet / fp16_unet, 0.6);  // tiny shapes: biases and norms weigh more than usual
  EXPECT_GT(fp8_unet / fp16_unet, 0.5);
  EXPECT_EQ(l.model->LoadedEntries().front().storage_dtype, core::DType::kFloat8E4M3);
}

// A network computes in the dtype asked for it; entries that run one network (the VAE's) follow
// it together; what cannot run is refused before loading.
TEST(Sd1Test, ComputeDtypePerNetwork) {
  const std::string dir = Reference({}) / "sd";
  LoadedReference l = LoadReference(dir + "/model.safetensors", "float32",
                                    {std::nullopt, {{"vae_decode", core::DType::kFloat64}}});
  ASSERT_NE(l.model, nullptr);
  std::map<std::string, std::optional<core::DType>> compute;
  for (const EntrySpec& e : l.model->LoadedEntries()) {
    EXPECT_EQ(e.storage_dtype, core::DType::kFloat32) << e.name;
    compute[e.name] = e.compute_dtype;
  }
  EXPECT_EQ(compute["vae_decode"], core::DType::kFloat64);
  EXPECT_EQ(compute["vae_encode"], core::DType::kFloat64);
  EXPECT_EQ(compute["unet"], core::DType::kFloat32);
  EXPECT_EQ(compute["text_encoder"], core::DType::kFloat32);
  EXPECT_LE(ReferenceError(*l.model, dir, "vae_decode"), 1e-4);
  absl::StatusOr<NamedTensors> image =
      l.model->Run("vae_decode", {{"latents", at::zeros({1, 4, 8, 8})}});
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->front().second.scalar_type(), at::kDouble);

  auto refused = [&](const ComputeChoice& compute) {
    auto source = core::CheckpointSource::Open(dir + "/model.safetensors");
    auto model = BuildModel("", (*source)->index());
    return (*model)->Load(**source, {}, compute).status();
  };
  absl::Status unknown = refused({std::nullopt, {{"vae", core::DType::kFloat32}}});
  EXPECT_TRUE(absl::IsInvalidArgument(unknown)) << unknown;
  EXPECT_NE(unknown.message().find("no entry 'vae' (unet, text_encoder, vae_decode, vae_encode)"),
            std::string::npos)
      << unknown;
  absl::Status split =
      refused({std::nullopt,
               {{"vae_decode", core::DType::kFloat64}, {"vae_encode", core::DType::kFloat32}}});
  EXPECT_TRUE(absl::IsInvalidArgument(split)) << split;
  EXPECT_NE(split.message().find("run one network"), std::string::npos) << split;
  absl::Status half = refused({std::nullopt, {{"unet", core::DType::kFloat16}}});
  EXPECT_TRUE(absl::IsFailedPrecondition(half)) << half;
}

TEST(Sd1Test, BadInputsNameWhatIsWrong) {
  const std::string dir = Reference({}) / "sd";
  LoadedReference l = LoadReference(dir + "/model.safetensors", "float32");
  ASSERT_NE(l.model, nullptr);
  auto message = [&](const std::string& entry, std::map<std::string, at::Tensor> in) {
    absl::Status s = l.model->Run(entry, in).status();
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    return std::string(s.message());
  };
  EXPECT_NE(message("unet", {{"x", at::zeros({1, 4, 6, 6})},
                             {"timesteps", at::zeros({1}, at::kLong)},
                             {"context", at::zeros({1, 77, 128})}})
                .find("multiples of 8"),
            std::string::npos);
  EXPECT_NE(message("unet", {{"x", at::zeros({2, 4, 8, 8})},
                             {"timesteps", at::zeros({1}, at::kLong)},
                             {"context", at::zeros({2, 77, 128})}})
                .find("batch sizes differ"),
            std::string::npos);
  EXPECT_NE(message("unet", {{"x", at::zeros({1, 4, 8, 8})},
                             {"timesteps", at::zeros({1}, at::kLong)},
                             {"context", at::zeros({1, 77, 64})}})
                .find("context"),
            std::string::npos);
  EXPECT_NE(message("text_encoder", {{"input_ids", at::full({1, 77}, 1000, at::kLong)}})
                .find("[0, 1000)"),
            std::string::npos);
  EXPECT_NE(message("text_encoder", {{"input_ids", at::zeros({1, 78}, at::kLong)}}).find("77"),
            std::string::npos);
  EXPECT_NE(message("vae_decode", {{"latents", at::zeros({1, 3, 8, 8})}}).find("latents"),
            std::string::npos);
}

// The web UI's VAE swap: the VAE from another file (ref_sd2.py's, other weights of the same
// shapes), with its keys prefixed (.safetensors) or bare with a training key (.ckpt): the VAE
// entries give that file's outputs, the UNet and text encoder the checkpoint's.
TEST(Sd1Test, TheVaeComesFromAnotherFile) {
  const std::string sd1 = Reference({}) / "sd";
  const std::string other = LdmReference("ref_sd2.py", {"--vae-files"}) / "sd";
  for (const char* file : {"vae.safetensors", "vae.ckpt"}) {
    LoadedReference l =
        LoadReference(sd1 + "/model.safetensors", "float32", {}, other + "/" + file);
    ASSERT_NE(l.model, nullptr) << file;
    EXPECT_TRUE(l.report.missing_keys.empty());
    EXPECT_EQ(l.source->index().overlay_files, 1u);
    EXPECT_LE(ReferenceError(*l.model, other, "vae_decode"), 1e-4) << file;
    EXPECT_LE(ReferenceError(*l.model, other, "vae_encode"), 1e-4) << file;
    EXPECT_LE(ReferenceError(*l.model, sd1, "unet"), 1e-4) << file;
    EXPECT_LE(ReferenceError(*l.model, sd1, "text_encoder"), 1e-4) << file;
    // Not the checkpoint's own VAE any more.
    EXPECT_GT(ReferenceError(*l.model, sd1, "vae_decode"), 1e-2) << file;
    const std::vector<std::string> unexpected =
        std::string(file) == "vae.ckpt" ? std::vector<std::string>{"first_stage_model.loss.logvar"}
                                        : std::vector<std::string>{};
    EXPECT_EQ(l.report.unexpected_keys, unexpected) << file;
  }
}

// A VAE file that is not one fails naming itself: nothing to take, a checkpoint whose keys
// do not fit, one that is not there.
TEST(Sd1Test, ABadVaeFileIsNamed) {
  const std::string sd1 = Reference({}) / "sd/model.safetensors";
  testing::TempDir dir;
  auto open = [&](const std::string& vae) {
    core::CheckpointSource::Options options;
    options.overlay_path = vae;
    options.overlay_prefix = "first_stage_model.";
    return core::CheckpointSource::Open(sd1, options).status();
  };
  const std::string missing = dir / "none.safetensors";
  absl::Status s = open(missing);
  EXPECT_TRUE(absl::IsNotFound(s)) << s;
  EXPECT_NE(s.message().find(missing), std::string::npos) << s;
  const std::string garbage = dir / "garbage.safetensors";
  std::ofstream(garbage) << std::string(4096, '\xff');
  s = open(garbage);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find(garbage), std::string::npos) << s;
}

}  // namespace
}  // namespace metaload::models
