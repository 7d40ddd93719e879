#include "server/models/synth.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/core/dtype.h"
#include "server/core/half.h"
#include "server/core/safetensors_writer.h"

namespace metaload::models {
namespace {

namespace fs = std::filesystem;

struct TensorPlan {
  std::string name;
  std::vector<int64_t> shape;
  double scale;  // values are uniform in [-scale, scale]
};

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

absl::StatusOr<std::vector<int64_t>> MlpSizes(const std::string& preset) {
  if (preset == "tiny") return std::vector<int64_t>{16, 32, 32, 8};
  if (preset == "small") return std::vector<int64_t>{256, 1024, 1024, 256};
  if (preset == "medium") return std::vector<int64_t>{1024, 4096, 4096, 4096, 1024};
  return absl::InvalidArgumentError(
      absl::StrCat("synth: unknown preset '", preset, "' for mlp (tiny, small, medium)"));
}

}  // namespace

absl::StatusOr<SynthResult> Synthesize(const SynthOptions& options, const std::string& out_dir) {
  if (options.architecture != "mlp") {
    return absl::InvalidArgumentError(
        absl::StrCat("synth: unknown architecture '", options.architecture, "' (mlp)"));
  }
  std::optional<core::DType> st_dtype = core::DTypeFromName(options.dtype);
  if (!st_dtype ||
      (options.dtype != "float32" && options.dtype != "float16" && options.dtype != "bfloat16")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "synth: dtype must be float32, float16 or bfloat16, not '", options.dtype, "'"));
  }
  absl::StatusOr<std::vector<int64_t>> sizes = MlpSizes(options.preset);
  if (!sizes.ok()) return sizes.status();

  std::vector<TensorPlan> plan;
  for (size_t i = 0; i + 1 < sizes->size(); ++i) {
    int64_t in = (*sizes)[i], out = (*sizes)[i + 1];
    double scale = 1.0 / std::sqrt(static_cast<double>(in));
    plan.push_back({absl::StrCat("layers.", i, ".weight"), {out, in}, scale});
    plan.push_back({absl::StrCat("layers.", i, ".bias"), {out}, scale});
  }
  if (options.shards < 1 || options.shards > static_cast<int>(plan.size())) {
    return absl::InvalidArgumentError(absl::StrCat("synth: shards must be between 1 and ",
                                                   plan.size(), " for this model, not ",
                                                   options.shards));
  }

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("synth: create ", out_dir, ": ", ec.message()));

  const std::string dtype = options.dtype;
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
    auto fill = [seed, t, scale, dtype](char* dst, int64_t offset, int64_t nbytes) {
      if (dtype == "float32") {
        for (int64_t b = 0; b < nbytes; b += 4) {
          float v = ValueAt(seed, t, static_cast<uint64_t>((offset + b) / 4), scale);
          std::memcpy(dst + b, &v, 4);
        }
      } else {
        for (int64_t b = 0; b < nbytes; b += 2) {
          float v = ValueAt(seed, t, static_cast<uint64_t>((offset + b) / 2), scale);
          uint16_t bits =
              dtype == "float16" ? core::FloatToHalfBits(v) : core::FloatToBFloat16Bits(v);
          std::memcpy(dst + b, &bits, 2);
        }
      }
    };
    absl::Status added = writers[shard].Add(p.name, *st_dtype, p.shape, fill);
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
  nlohmann::ordered_json config = {{"model_type", "mlp"},
                                   {"architectures", {"MLP"}},
                                   {"layer_sizes", *sizes},
                                   {"activation", "gelu"},
                                   {"torch_dtype", dtype}};
  absl::Status s = write_json("config.json", config);
  if (!s.ok()) return s;
  return result;
}

}  // namespace metaload::models
