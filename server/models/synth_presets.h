// The synthesizer's presets: for one architecture (or variant) and size preset, the config.json
// to write and every tensor's name, shape and value range. synth.cc writes them; the
// architecture table (architectures.h) names each row's generator and presets, so `metaload
// synth --arch` and the registry test walk the same list. Internal to server/models.
//
// Pure functions of their arguments: LibTorch-free, thread-safe.
#ifndef METALOAD_SERVER_MODELS_SYNTH_PRESETS_H_
#define METALOAD_SERVER_MODELS_SYNTH_PRESETS_H_

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace metaload::models {

struct TensorPlan {
  std::string name;
  std::vector<int64_t> shape;
  double scale;  // values are uniform in [center - scale, center + scale]
  double center = 0;
  bool positions = false;  // int64 0, 1, 2, ... instead (CLIP's position_ids)
};

struct SynthPlan {
  // Written as config.json unless empty (single-file checkpoints are known by their keys).
  nlohmann::ordered_json config;
  std::vector<TensorPlan> tensors;
};

// One generator per table row (defined in synth_presets.cc, declared next to the table in
// architectures.cc, the only place that names them). `name` is the row's name or one of its
// variants; `preset` one of the row's synth_presets (INTERNAL for another: the table and the
// generator disagree).
using SynthGenerator = absl::StatusOr<SynthPlan> (*)(const std::string& name,
                                                     const std::string& preset);

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_SYNTH_PRESETS_H_
