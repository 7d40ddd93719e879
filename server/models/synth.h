// Writes synthetic checkpoints in Hugging Face layout (config.json + safetensors, sharded with a
// model.safetensors.index.json when asked), with seeded random weights: the same options always
// give the same bytes. `make run`'s demo model, the tests and the benchmarks use it, so nothing
// is ever downloaded. Stateless and thread-safe.
#ifndef METALOAD_SERVER_MODELS_SYNTH_H_
#define METALOAD_SERVER_MODELS_SYNTH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace metaload::models {

struct SynthOptions {
  // Architecture to synthesize: a name or variant of a row of the architecture table that has
  // synth presets (SynthArchitectureNames() in architectures.h). Single-file layouts (sd1) get
  // no config.json.
  std::string architecture = "mlp";
  // Size preset, one of the row's synth_presets; "tiny" (every row has it) is kilobytes to a
  // few tens of megabytes. Larger ones: mlp "small" (~10 MB), "medium" (~200 MB at float32);
  // gpt2 "medium" (GPT-2 medium's shapes, ~1.4 GB at float32); llama "medium" (~1.3 GB); sd1
  // "full" (the v1 shapes and key set, 1.07 G parameters: 4.3 GB at float32).
  std::string preset = "tiny";
  // Stored dtype of floating-point tensors: "float32", "float16", "bfloat16", "float8_e4m3fn"
  // or "float8_e5m2" (float8: the tensors of two or more dimensions; the others float16).
  std::string dtype = "float32";
  // Number of safetensors shards; more than 1 also writes model.safetensors.index.json.
  int shards = 1;
  // Seed of the weights.
  uint64_t seed = 0;
};

struct SynthResult {
  std::vector<std::string> files;  // written files, relative to the output directory
  int64_t tensor_count = 0;
  int64_t parameter_count = 0;
  int64_t data_bytes = 0;  // bytes of tensor data over all shards
};

// Creates `out_dir` (and parents) if missing and writes the checkpoint into it, replacing files
// of the same names. INVALID_ARGUMENT for an unknown architecture, preset, dtype or shard count.
absl::StatusOr<SynthResult> Synthesize(const SynthOptions& options, const std::string& out_dir);

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_SYNTH_H_
