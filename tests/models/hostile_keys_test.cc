// Hostile checkpoints against the Stable Diffusion readers and builders: every tensor name and
// shape of the tiny synth presets, mutated at random with a fixed seed (dimensions of 0, 1, off
// by one, 2^21 or 2^40, a rank changed, a key dropped), detected and built on meta, then sized.
// A build may refuse (FAILED_PRECONDITION) or throw (the daemon catches exceptions); it may not
// divide by zero, overflow or read out of bounds: ASan and UBSan run this suite in `make test`.
// A zero dimension once divided by zero in ReadUnet (SIGFPE) and took the daemon down.
#include <gtest/gtest.h>

#include <cstdint>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "server/core/checkpoint.h"
#include "server/models/architectures.h"
#include "server/models/registry.h"

namespace metaload::models {
namespace {

core::CheckpointIndex IndexOf(const std::vector<TensorPlan>& plans) {
  core::CheckpointIndex index;
  index.path = "hostile.safetensors";
  for (const TensorPlan& p : plans) {
    core::TensorInfo t;
    t.name = p.name;
    t.dtype = p.positions ? core::DType::kInt64 : core::DType::kFloat32;
    t.shape = p.shape;
    if (index.by_name.count(t.name) != 0) continue;
    index.by_name[t.name] = index.tensors.size();
    index.tensors.push_back(t);
  }
  return index;
}

struct Counts {
  int built = 0, refused = 0, thrown = 0;
};

// Detected, built on meta and sized, as a load's Prepare does.
void Build(const core::CheckpointIndex& index, Counts* counts) {
  try {
    absl::StatusOr<std::unique_ptr<Model>> model = BuildModel("", index);
    if (!model.ok()) {
      ++counts->refused;
      EXPECT_FALSE(model.status().message().empty());
      return;
    }
    absl::StatusOr<core::DtypePolicy> policy = EffectivePolicy(**model, "");
    ASSERT_TRUE(policy.ok()) << policy.status();
    (*model)->EstimateBytes(index, *policy, /*allow_missing_keys=*/true);
    ++counts->built;
  } catch (const std::exception&) {
    ++counts->thrown;  // as the daemon's exception boundary would report it
  }
}

TEST(HostileKeysTest, MutatedStableDiffusionShapesNeverCrashTheBuilders) {
  const int64_t sizes[] = {0, 1, 2, 3, 31, 63, 64, 65, int64_t{1} << 21, int64_t{1} << 40};
  Counts counts;
  for (const char* arch : {"sd1", "sd2", "sdxl", "sdxl-refiner"}) {
    const ArchitectureInfo* row = FindArchitecture(arch);
    ASSERT_NE(row, nullptr) << arch;
    absl::StatusOr<SynthPlan> plan = row->synth(arch, "tiny");
    ASSERT_TRUE(plan.ok()) << plan.status();
    // Every tensor once, one dimension set to one of the sizes in turn.
    for (size_t i = 0; i < plan->tensors.size(); ++i) {
      std::vector<TensorPlan> tensors = plan->tensors;
      std::vector<int64_t>& shape = tensors[i].shape;
      if (shape.empty()) continue;
      shape[i % shape.size()] = sizes[i % (sizeof(sizes) / sizeof(sizes[0]))];
      Build(IndexOf(tensors), &counts);
    }
    // And random combinations.
    std::mt19937_64 rng(20261202);
    for (int round = 0; round < 200; ++round) {
      std::vector<TensorPlan> tensors;
      for (TensorPlan t : plan->tensors) {
        const uint64_t r = rng() % 1000;
        if (r < 3) continue;  // dropped
        if (r < 12 && !t.shape.empty()) {
          t.shape[rng() % t.shape.size()] = sizes[rng() % (sizeof(sizes) / sizeof(sizes[0]))];
        } else if (r < 14) {
          if (rng() % 2 == 0 || t.shape.empty()) {
            t.shape.push_back(1);
          } else {
            t.shape.pop_back();
          }
        }
        tensors.push_back(std::move(t));
      }
      Build(IndexOf(tensors), &counts);
    }
  }
  std::printf("mutated checkpoints: %d built, %d refused, %d threw\n", counts.built, counts.refused,
              counts.thrown);
  EXPECT_GT(counts.refused, 0);  // the mutations reach the checks
  EXPECT_GT(counts.built, 0);    // and some survive them (a tensor the model does not read)
}

}  // namespace
}  // namespace metaload::models
