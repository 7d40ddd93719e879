// Walks every row of the architecture table (server/models/architectures.h): what a new
// architecture forgets shows up here, by name. Every name a load may give (each row and each
// variant) has a synth preset, is detected from the synthesized file, builds on meta, loads
// with every key used and runs its default entry to outputs of the promised shape, all finite.
// The one exception is stated where it is made: TorchScript.
#include "server/models/registry.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "server/core/checkpoint.h"
#include "server/models/architecture_detector.h"
#include "server/models/architectures.h"
#include "server/models/meta_module_model.h"
#include "server/models/synth.h"
#include "tests/test_util.h"

namespace metaload::models {
namespace {

TEST(RegistryTest, EveryLoadableRowHasABuilderAndEveryBuilderARow) {
  std::vector<std::string> loadable;
  for (const ArchitectureInfo& row : Architectures()) {
    if (row.loadable) loadable.push_back(row.name);
  }
  std::sort(loadable.begin(), loadable.end());
  EXPECT_EQ(BuiltArchitectures(), loadable);
}

TEST(RegistryTest, NamesAreUniqueAndDescribed) {
  std::set<std::string> seen;
  for (const ArchitectureInfo& row : Architectures()) {
    EXPECT_FALSE(row.description.empty()) << row.name;
    EXPECT_TRUE(seen.insert(row.name).second) << row.name;
    for (const ArchitectureVariant& v : row.variants) {
      EXPECT_FALSE(v.description.empty()) << v.name;
      EXPECT_TRUE(seen.insert(v.name).second) << v.name;
      EXPECT_EQ(FindArchitecture(v.name), &row) << v.name;
    }
    EXPECT_EQ(FindArchitecture(row.name), &row) << row.name;
    EXPECT_EQ(row.synth == nullptr, row.synth_presets.empty()) << row.name;
  }
  EXPECT_EQ(FindArchitecture("resnet"), nullptr);
}

// Every preset a row lists is one its generator knows (planned only; "full" is 4 GB written).
TEST(RegistryTest, EverySynthPresetIsGenerated) {
  for (const std::string& name : SynthArchitectureNames()) {
    const ArchitectureInfo* row = FindArchitecture(name);
    ASSERT_NE(row, nullptr) << name;
    for (const std::string& preset : row->synth_presets) {
      absl::StatusOr<SynthPlan> plan = row->synth(name, preset);
      ASSERT_TRUE(plan.ok()) << name << " " << preset << ": " << plan.status();
      EXPECT_FALSE(plan->tensors.empty()) << name << " " << preset;
    }
  }
}

// Rows that are detected but not built are refused by name, however they are asked for.
TEST(RegistryTest, DetectedOnlyRowsAreNamedNotBuilt) {
  core::CheckpointIndex index;
  index.path = "models/x";
  for (const ArchitectureInfo& row : Architectures()) {
    if (row.loadable) continue;
    absl::Status s = BuildModel(row.name, index).status();
    EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
    EXPECT_NE(s.message().find("detected " + row.name + "; not supported yet"), std::string::npos)
        << s;
    const std::vector<std::string> names = ArchitectureNames();
    EXPECT_EQ(std::find(names.begin(), names.end(), row.name), names.end()) << row.name;
  }
}

// Inputs for `entry`: batch 1, every other free dimension 8 (a multiple of the tiny UNet's
// downscale, within every tiny preset's positions); integers 0 (a valid token id and
// timestep), floats uniform in [-1, 1).
std::map<std::string, at::Tensor> FeedFor(const EntrySpec& entry) {
  std::map<std::string, at::Tensor> feed;
  for (const TensorSpec& in : entry.inputs) {
    if (in.optional) continue;
    std::vector<int64_t> shape = in.shape;
    for (size_t d = 0; d < shape.size(); ++d) {
      if (shape[d] < 0) shape[d] = d == 0 ? 1 : 8;
    }
    feed[in.name] =
        in.dtype == core::DType::kInt64 ? at::zeros(shape, at::kLong) : at::rand(shape) * 2 - 1;
  }
  return feed;
}

// TorchScript: synth writes safetensors, and a TorchScript archive is a program only torch.jit
// writes, so this row has no synth preset; Python's torch.jit writes a small one here instead.
std::string WriteTorchScript(const testing::TempDir& dir) {
  std::ofstream(dir / "make.py") << "import sys, torch\n"
                                    "torch.manual_seed(0)\n"
                                    "m = torch.jit.script(torch.nn.Linear(4, 2))\n"
                                    "m.save(sys.argv[1])\n";
  testing::CommandResult r =
      testing::RunCommand({METALOAD_PYTHON, dir / "make.py", dir / "model.pt"}, dir / "py");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return dir / "model.pt";
}

class EveryArchitectureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(EveryArchitectureTest, IsSynthesizedDetectedBuiltOnMetaLoadedAndRun) {
  const std::string name = GetParam();
  const ArchitectureInfo* row = FindArchitecture(name);
  ASSERT_NE(row, nullptr);
  testing::TempDir dir;
  std::string path;
  if (name == "torchscript") {
    path = WriteTorchScript(dir);
  } else {
    ASSERT_NE(row->synth, nullptr) << name << " has no synth preset (architectures.cc)";
    SynthOptions options;
    options.architecture = name;
    options.preset = row->synth_presets.front();
    absl::StatusOr<SynthResult> written = Synthesize(options, dir / "m");
    ASSERT_TRUE(written.ok()) << written.status();
    path = dir / "m";
    if (written->files == std::vector<std::string>{"model.safetensors"}) {
      path = dir / "m/model.safetensors";  // a single-file layout
    }
  }
  absl::StatusOr<std::unique_ptr<core::CheckpointSource>> source =
      core::CheckpointSource::Open(path);
  ASSERT_TRUE(source.ok()) << source.status();
  EXPECT_EQ(DetectArchitecture((*source)->index()).name, name)
      << "architecture_detector.cc does not recognise it";

  absl::StatusOr<std::unique_ptr<Model>> model = BuildModel("", (*source)->index());
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->architecture(), name);
  if (name != "torchscript") {  // TorchScript has no module tree: torch::jit::load builds it
    const auto* meta = dynamic_cast<const MetaModuleModel*>(model->get());
    ASSERT_NE(meta, nullptr) << name << " is not a MetaModuleModel (meta_module_model.h)";
    EXPECT_TRUE(meta->AllOnMeta()) << name << " allocated a tensor outside the meta guard";
  }

  absl::StatusOr<core::LoadReport> report = (*model)->Load(**source, {}, {});
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->missing_keys.empty()) << name;
  EXPECT_TRUE(report->unexpected_keys.empty()) << name;

  const EntrySpec entry = (*model)->Entries().front();
  std::map<std::string, at::Tensor> feed =
      name == "torchscript"
          ? std::map<std::string, at::Tensor>{{entry.inputs.at(0).name, at::rand({1, 4})}}
          : FeedFor(entry);
  absl::StatusOr<NamedTensors> out = (*model)->Run("", feed);
  ASSERT_TRUE(out.ok()) << name << " " << entry.name << ": " << out.status();
  ASSERT_EQ(out->size(), entry.outputs.size()) << name;
  for (size_t i = 0; i < out->size(); ++i) {
    const TensorSpec& spec = entry.outputs[i];
    const at::Tensor& y = (*out)[i].second;
    EXPECT_EQ((*out)[i].first, spec.name) << name;
    EXPECT_EQ(y.size(0), 1) << name << " " << spec.name;
    EXPECT_TRUE(y.isfinite().all().item<bool>()) << name << " " << spec.name;
    if (spec.shape.empty()) continue;  // TorchScript: the schema does not say
    ASSERT_EQ(y.dim(), static_cast<int64_t>(spec.shape.size())) << name << " " << spec.name;
    for (size_t d = 0; d < spec.shape.size(); ++d) {
      if (spec.shape[d] >= 0) {
        EXPECT_EQ(y.size(d), spec.shape[d]) << name << " dim " << d;
      }
    }
  }
  if (name == "torchscript") {  // Linear(4, 2) on one row
    EXPECT_EQ(out->front().second.sizes().vec(), (std::vector<int64_t>{1, 2}));
  }
}

INSTANTIATE_TEST_SUITE_P(Table, EveryArchitectureTest, ::testing::ValuesIn(ArchitectureNames()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string id = info.param;
                           std::replace(id.begin(), id.end(), '-', '_');
                           return id;
                         });

}  // namespace
}  // namespace metaload::models
