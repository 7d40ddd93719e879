// Benchmark (a program, not a test): validating a 10,000-tensor safetensors header and a
// 2,000-entry sharded index, the work every load and every `metaload inspect` does before
// touching tensor data. Prints the median of 21 runs; target: under 10 ms each.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/core/safetensors_header.h"
#include "server/core/safetensors_index.h"

namespace {

using Clock = std::chrono::steady_clock;

// A header shaped like a large real model's: long dotted names, 1-2 dims, F16.
std::string LargeHeader(int tensors, uint64_t* data_bytes) {
  std::string json = "{\"__metadata__\":{\"format\":\"pt\"}";
  uint64_t offset = 0;
  for (int i = 0; i < tensors; ++i) {
    const int layer = i / 10;
    const bool matrix = i % 2 == 0;
    const uint64_t bytes = matrix ? 64 * 32 * 2 : 64 * 2;
    absl::StrAppend(&json, ",\"model.layers.", layer, ".block_", i % 10,
                    matrix ? ".proj.weight" : ".norm.bias",
                    "\":{\"dtype\":\"F16\",\"shape\":", matrix ? "[64,32]" : "[64]",
                    ",\"data_offsets\":[", offset, ",", offset + bytes, "]}");
    offset += bytes;
  }
  json += "}";
  *data_bytes = offset;
  return json;
}

std::string LargeIndex(int entries) {
  std::string json = "{\"metadata\":{\"total_size\":123456789},\"weight_map\":{";
  for (int i = 0; i < entries; ++i) {
    absl::StrAppend(&json, i ? "," : "", "\"model.layers.", i / 9, ".self_attn.proj_", i % 9,
                    ".weight\":\"model-", 1 + i / 400, "-of-00005.safetensors\"");
  }
  json += "}}";
  return json;
}

template <typename Fn>
double MedianMs(Fn fn) {
  std::vector<double> ms;
  for (int i = 0; i < 21; ++i) {
    auto start = Clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main() {
  uint64_t data_bytes = 0;
  const std::string header = LargeHeader(10'000, &data_bytes);
  const std::string index = LargeIndex(2'000);
  bool ok = true;
  const double header_ms = MedianMs(
      [&] { ok &= metaload::core::ParseSafetensorsHeader(header, data_bytes, "bench").ok(); });
  const double index_ms =
      MedianMs([&] { ok &= metaload::core::ParseSafetensorsIndex(index, "bench").ok(); });
  if (!ok) {
    std::fprintf(stderr, "parse_bench: a synthetic input failed to validate\n");
    return 1;
  }
  std::printf("%-44s %10s %10s %8s\n", "parse benchmark (median of 21)", "ms", "target", "ok");
  std::printf(
      "%-44s %10.2f %10s %8s\n",
      absl::StrCat("safetensors header, 10,000 tensors (", header.size() / 1024, " KiB)").c_str(),
      header_ms, "< 10", header_ms < 10 ? "yes" : "NO");
  std::printf(
      "%-44s %10.2f %10s %8s\n",
      absl::StrCat("safetensors index, 2,000 entries (", index.size() / 1024, " KiB)").c_str(),
      index_ms, "< 10", index_ms < 10 ? "yes" : "NO");
  return 0;
}
