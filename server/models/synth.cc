#include "server/models/synth.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "server/core/dtype.h"
#include "server/core/float8.h"
#include "server/core/half.h"
#include "server/core/safetensors_writer.h"
#include "server/models/architectures.h"
#include "server/models/synth_presets.h"

namespace metaload::models {
namespace {

namespace fs = std::filesystem;

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The value of element `i` of tensor number `tensor`: a pure function of its coordinates.
float ValueAt(uint64_t seed, uint64_t tensor, uint64_t i, double scale) {
  uint64_t bits = SplitMix64(SplitMix64(seed ^ (tensor << 40)) + i);
  double unit = static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
  return static_cast<float>((2.0 * unit - 1.0) * scale);
}

}  // namespace

absl::StatusOr<SynthResult> Synthesize(const SynthOptions& options, const std::string& out_dir) {
  const ArchitectureInfo* arch = FindArchitecture(options.architecture);
  if (arch == nullptr || arch->synth == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("synth: unknown architecture '", options.architecture, "' (",
                     absl::StrJoin(SynthArchitectureNames(), ", "), ")"));
  }
  const std::vector<std::string>& presets = arch->synth_presets;
  if (std::find(presets.begin(), presets.end(), options.preset) == presets.end()) {
    return absl::InvalidArgumentError(absl::StrCat("synth: unknown preset '", options.preset,
                                                   "' for ", arch->name, " (",
                                                   absl::StrJoin(presets, ", "), ")"));
  }
  std::optional<core::DType> st_dtype = core::DTypeFromName(options.dtype);
  if (!st_dtype || !core::IsFloatingPoint(*st_dtype) || *st_dtype == core::DType::kFloat64) {
    return absl::InvalidArgumentError(
        absl::StrCat("synth: dtype must be float32, float16, bfloat16, float8_e4m3fn or "
                     "float8_e5m2, not '",
                     options.dtype, "'"));
  }
  absl::StatusOr<SynthPlan> made = arch->synth(options.architecture, options.preset);
  if (!made.ok()) return made.status();
  std::vector<TensorPlan> plan = std::move(made->tensors);
  nlohmann::ordered_json config = std::move(made->config);
  // No config.json: a single-file checkpoint, recognised by its keys.
  const bool single_file = config.empty();
  if (single_file && options.shards != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("synth: ", arch->name, " checkpoints are single files (shards 1)"));
  }
  config["torch_dtype"] = options.dtype;
  if (options.shards < 1 || options.shards > static_cast<int>(plan.size())) {
    return absl::InvalidArgumentError(absl::StrCat("synth: shards must be between 1 and ",
                                                   plan.size(), " for this model, not ",
                                                   options.shards));
  }

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("synth: create ", out_dir, ": ", ec.message()));

  const uint64_t seed = options.seed;
  SynthResult result;
  std::vector<core::SafetensorsWriter> writers(static_cast<size_t>(options.shards));
  std::vector<std::string> shard_names;
  for (int s = 0; s < options.shards; ++s) {
    shard_names.push_back(options.shards == 1 ? "model.safetensors"
                                              : absl::StrFormat("model-%05d-of-%05d.safetensors",
                                                                s + 1, options.shards));
    writers[static_cast<size_t>(s)].SetMetadata("format", "pt");
  }
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  for (size_t t = 0; t < plan.size(); ++t) {
    const TensorPlan& p = plan[t];
    // Contiguous runs of tensors per shard, like Hugging Face's sharding.
    size_t shard = t * static_cast<size_t>(options.shards) / plan.size();
    int64_t numel = 1;
    for (int64_t d : p.shape) numel *= d;
    result.parameter_count += numel;
    ++result.tensor_count;
    weight_map[p.name] = shard_names[shard];
    const double scale = p.scale;
    const float center = static_cast<float>(p.center);
    const bool positions = p.positions;
    // float8: tensors of two or more dimensions only; biases, norm scales and schedules float16.
    const core::DType dtype = positions ? core::DType::kInt64
                              : core::IsFloat8(*st_dtype) && p.shape.size() < 2
                                  ? core::DType::kFloat16
                                  : *st_dtype;
    auto fill = [seed, t, scale, center, dtype](char* dst, int64_t offset, int64_t nbytes) {
      if (dtype == core::DType::kInt64) {
        for (int64_t b = 0; b < nbytes; b += 8) {
          int64_t v = (offset + b) / 8;
          std::memcpy(dst + b, &v, 8);
        }
      } else if (core::IsFloat8(dtype)) {
        for (int64_t b = 0; b < nbytes; ++b) {
          float v = center + ValueAt(seed, t, static_cast<uint64_t>(offset + b), scale);
          dst[b] = static_cast<char>(core::FloatToFloat8Bits(v, dtype));
        }
      } else if (dtype == core::DType::kFloat32) {
        for (int64_t b = 0; b < nbytes; b += 4) {
          float v = center + ValueAt(seed, t, static_cast<uint64_t>((offset + b) / 4), scale);
          std::memcpy(dst + b, &v, 4);
        }
      } else {
        for (int64_t b = 0; b < nbytes; b += 2) {
          float v = center + ValueAt(seed, t, static_cast<uint64_t>((offset + b) / 2), scale);
          uint16_t bits = dtype == core::DType::kFloat16 ? core::FloatToHalfBits(v)
                                                         : core::FloatToBFloat16Bits(v);
          std::memcpy(dst + b, &bits, 2);
        }
      }
    };
    absl::Status added = writers[shard].Add(p.name, dtype, p.shape, fill);
    if (!added.ok()) return added;
  }

  for (int s = 0; s < options.shards; ++s) {
    core::SafetensorsWriter& w = writers[static_cast<size_t>(s)];
    absl::Status written = w.Write((fs::path(out_dir) / shard_names[s]).string());
    if (!written.ok()) return written;
    result.data_bytes += w.data_bytes();
    result.files.push_back(shard_names[s]);
  }

  auto write_json = [&](const std::string& name, const nlohmann::ordered_json& j) -> absl::Status {
    std::string path = (fs::path(out_dir) / name).string();
    std::ofstream f(path, std::ios::trunc);
    f << j.dump(2) << "\n";
    f.close();
    if (!f) return absl::InternalError(absl::StrCat("synth: write ", path));
    result.files.push_back(name);
    return absl::OkStatus();
  };
  if (options.shards > 1) {
    nlohmann::ordered_json index = {{"metadata", {{"total_size", result.data_bytes}}},
                                    {"weight_map", weight_map}};
    absl::Status s = write_json("model.safetensors.index.json", index);
    if (!s.ok()) return s;
  }
  if (single_file) return result;
  absl::Status s = write_json("config.json", config);
  if (!s.ok()) return s;
  return result;
}

}  // namespace metaload::models
