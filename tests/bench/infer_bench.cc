// Benchmark (a program, not a test): what gRPC adds to a forward pass. For each synthetic MLP
// (metaload synth presets tiny, small, medium; batch 1, float32), the p50 of the same forward
// measured in the same run two ways, rounds interleaved so that machine noise hits both:
//
//   in-process  ModuleModel::Run on a tensor, in this process (what a Python or LibTorch
//               program that loaded the model itself would pay)
//   gRPC        `metaload bench infer --concurrency=1` against a real metaloadd on loopback:
//               request encoding, HTTP/2, the daemon's decode, infer pool, forward and encode
//
// and their ratio (the target: <= 1.3 x).
//
// Then what storing weights in a smaller dtype costs at forward time, in-process: the medium MLP
// (batch 64) and the SD1 tiny UNet (batch 1, 32x32 latents), each loaded five ways and run in
// interleaved rounds: float32; float16 and bfloat16 storage computing in float32 (the cpu's
// default: every layer casts its weights at forward time); bfloat16 storage and compute (what a
// request gets with compute_dtype bfloat16; its precision depends on the CPU's instruction set);
// float8_e4m3fn storage of the matmul weights, decoded to float32 at forward time.
// Printed: p50, the ratio to float32 (target for float16 storage: <= 1.3 x) and the resident
// bytes saved.
//
// Usage: infer_bench --daemon=PATH --cli=PATH [--dir=DIR] [--rounds=N] [--requests=N]
//                    [--storage_only=true] (only the second table)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/core/checkpoint.h"
#include "server/models/registry.h"
#include "server/models/synth.h"
#include "tests/test_util.h"

namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

std::string Flag(int argc, char** argv, const std::string& name, const std::string& fallback) {
  const std::string prefix = "--" + name + "=";
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]).rfind(prefix, 0) == 0)
      return std::string(argv[i]).substr(prefix.size());
  }
  return fallback;
}

struct Loaded {
  std::unique_ptr<metaload::core::CheckpointSource> source;
  std::unique_ptr<metaload::models::Model> model;
};

Loaded LoadOrDie(const std::string& path, const std::string& dtype,
                 std::optional<metaload::core::DType> compute) {
  Loaded l;
  auto source = metaload::core::CheckpointSource::Open(path);
  auto model = source.ok()
                   ? metaload::models::BuildModel("", (*source)->index())
                   : absl::StatusOr<std::unique_ptr<metaload::models::Model>>(source.status());
  metaload::core::LoadOptions options;
  absl::StatusOr<metaload::core::DtypePolicy> policy =
      model.ok() ? metaload::models::EffectivePolicy(**model, dtype)
                 : absl::StatusOr<metaload::core::DtypePolicy>(model.status());
  if (policy.ok()) options.policy = *policy;
  absl::Status loaded =
      !policy.ok() ? policy.status() : (*model)->Load(**source, options, {compute, {}}).status();
  if (!loaded.ok()) {
    std::fprintf(stderr, "load %s as %s: %s\n", path.c_str(), dtype.c_str(),
                 loaded.ToString().c_str());
    std::exit(1);
  }
  l.source = *std::move(source);
  l.model = *std::move(model);
  return l;
}

// p50 in microseconds of `n` runs of `entry` after a warm-up of n/10.
double RunP50(const metaload::models::Model& model, const std::string& entry,
              const std::map<std::string, at::Tensor>& inputs, int n) {
  std::vector<double> us;
  for (int i = 0; i < n + std::max(1, n / 10); ++i) {
    const auto t0 = Clock::now();
    auto out = model.Run(entry, inputs);
    const double elapsed = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    if (!out.ok()) {
      std::fprintf(stderr, "%s: %s\n", entry.c_str(), out.status().ToString().c_str());
      std::exit(1);
    }
    if (i >= std::max(1, n / 10)) us.push_back(elapsed);
  }
  return Median(us);
}

// The storage-vs-compute table (see the file comment).
void StorageCostTable(const std::string& dir, int rounds) {
  struct Way {
    const char* name;
    const char* dtype;
    std::optional<metaload::core::DType> compute;
  };
  const Way ways[] = {{"float32", "float32", std::nullopt},
                      {"float16 -> float32", "float16", std::nullopt},
                      {"bfloat16 -> float32", "bfloat16", std::nullopt},
                      {"bfloat16 -> bfloat16", "bfloat16", metaload::core::DType::kBFloat16},
                      {"float8_e4m3fn -> float32", "float8_e4m3fn", std::nullopt}};
  struct Net {
    std::string name, path, entry;
    std::map<std::string, at::Tensor> inputs;
  };
  std::vector<Net> nets;
  nets.push_back(
      {"mlp medium, batch 64", dir + "/mlp-medium", "forward", {{"input", at::randn({64, 1024})}}});
  nets.push_back({"sd1 tiny unet, 1x4x32x32", dir + "/sd1-tiny/model.safetensors", "unet", {}});
  {
    Loaded probe = LoadOrDie(nets[1].path, "float32", std::nullopt);
    const metaload::models::EntrySpec unet = probe.model->Entries()[0];
    nets[1].inputs = {{"x", at::randn({1, unet.inputs[0].shape[1], 32, 32})},
                      {"timesteps", at::full({1}, 500, at::kLong)},
                      {"context", at::randn({1, 77, unet.inputs[2].shape.back()})}};
  }
  std::printf(
      "\nstorage vs compute: in-process forward p50, median of %d interleaved rounds "
      "(float16 storage target: <= 1.3x float32)\n",
      rounds);
  std::printf("%-26s %-26s %12s %9s %14s %s\n", "network", "storage -> compute", "p50 us", "x fp32",
              "resident MiB", "saved");
  for (const Net& net : nets) {
    std::vector<Loaded> models;
    for (const Way& w : ways) models.push_back(LoadOrDie(net.path, w.dtype, w.compute));
    const double estimate_us = RunP50(*models[0].model, net.entry, net.inputs, 3);
    const int n = std::max(5, std::min(200, static_cast<int>(5e5 / estimate_us)));
    std::vector<std::vector<double>> p50(models.size());
    for (int r = 0; r < rounds; ++r) {
      for (size_t i = 0; i < models.size(); ++i) {
        p50[i].push_back(RunP50(*models[i].model, net.entry, net.inputs, n));
      }
    }
    const double base_us = Median(p50[0]);
    const double base_bytes = static_cast<double>(models[0].model->ResidentBytes());
    for (size_t i = 0; i < models.size(); ++i) {
      const double us = Median(p50[i]);
      const double bytes = static_cast<double>(models[i].model->ResidentBytes());
      std::string verdict;
      if (i == 1) verdict = us / base_us <= 1.3 ? "  <= 1.3: yes" : "  <= 1.3: no";
      std::printf("%-26s %-26s %12.1f %9.2f %14.1f %4.0f%%%s\n", i == 0 ? net.name.c_str() : "",
                  ways[i].name, us, us / base_us, bytes / (1 << 20),
                  100.0 * (1.0 - bytes / base_bytes), verdict.c_str());
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string daemon = Flag(argc, argv, "daemon", "");
  const std::string cli = Flag(argc, argv, "cli", "");
  const bool storage_only = Flag(argc, argv, "storage_only", "") == "true";
  if (!storage_only && (daemon.empty() || cli.empty())) {
    std::fprintf(stderr,
                 "usage: infer_bench --daemon=PATH --cli=PATH [--dir=DIR] [--rounds=N] "
                 "[--requests=N]\n");
    return 2;
  }
  int rounds = 5, requests = 2000;
  if (!absl::SimpleAtoi(Flag(argc, argv, "rounds", "5"), &rounds) ||
      !absl::SimpleAtoi(Flag(argc, argv, "requests", "2000"), &requests) || rounds < 1 ||
      requests < 10) {
    std::fprintf(stderr, "infer_bench: --rounds >= 1 and --requests >= 10\n");
    return 2;
  }
  metaload::testing::TempDir scratch;
  const std::string dir = Flag(argc, argv, "dir", scratch.path());
  std::filesystem::create_directories(dir);

  const std::vector<std::string> presets = {"tiny", "small", "medium"};
  // The MLPs of the first table, then the SD1 tiny checkpoint of the second.
  std::vector<std::pair<std::string, std::string>> checkpoints;  // (architecture, preset)
  for (const std::string& preset : presets) checkpoints.push_back({"mlp", preset});
  checkpoints.push_back({"sd1", "tiny"});
  for (const auto& [architecture, preset] : checkpoints) {
    metaload::models::SynthOptions synth;
    synth.architecture = architecture;
    synth.preset = preset;
    auto written = metaload::models::Synthesize(synth, dir + "/" + architecture + "-" + preset);
    if (!written.ok()) {
      std::fprintf(stderr, "synth %s %s: %s\n", architecture.c_str(), preset.c_str(),
                   written.status().ToString().c_str());
      return 1;
    }
  }
  if (storage_only) {
    StorageCostTable(dir, rounds);
    return 0;
  }

  metaload::testing::Subprocess server(
      {daemon, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", "--model_root=" + dir,
       "--port_file=" + dir + "/ports", "--log_level=warning"},
      dir + "/metaloadd");
  int port = 0;
  for (int i = 0; i < 3000 && port == 0; ++i) {
    for (absl::string_view line :
         absl::StrSplit(metaload::testing::ReadFileOrEmpty(dir + "/ports"), '\n')) {
      if (absl::ConsumePrefix(&line, "grpc_port=")) (void)absl::SimpleAtoi(line, &port);
    }
    if (port == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (port == 0) {
    std::fprintf(stderr, "metaloadd did not start: %s\n", server.Stderr().c_str());
    return 1;
  }
  const std::string address = absl::StrCat("--address=127.0.0.1:", port);
  auto run_cli = [&](const std::vector<std::string>& args) {
    std::vector<std::string> argv = {cli};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.push_back(address);
    metaload::testing::CommandResult r = metaload::testing::RunCommand(argv, dir + "/cli");
    if (r.exit_code != 0) {
      std::fprintf(stderr, "metaload %s: %s%s\n", args[0].c_str(), r.out.c_str(), r.err.c_str());
      std::exit(1);
    }
    return r.out;
  };

  std::printf(
      "infer benchmark: MLP forward, batch 1, float32, p50 of up to %d requests (2 s), "
      "median of %d interleaved rounds, %d intra-op thread(s) in both\n",
      requests, rounds, at::get_num_threads());
  std::printf("%-8s %-24s %12s %12s %12s %9s %s\n", "preset", "layers", "parameters", "in-proc us",
              "gRPC us", "gRPC/in", "target");
  for (const std::string& preset : presets) {
    const std::string path = dir + "/mlp-" + preset;
    const Loaded loaded = LoadOrDie(path, "", std::nullopt);
    const metaload::models::Model& model = *loaded.model;
    const int64_t in_features = model.Entries()[0].inputs[0].shape.back();
    at::Tensor input = at::randn({1, in_features});
    std::string values;
    for (int64_t i = 0; i < in_features; ++i)
      absl::StrAppend(&values, i ? "," : "", input[0][i].item<float>());
    run_cli({"load", "mlp-" + preset, "--id=" + preset, "--quiet"});

    // At most about two seconds of forwards per measurement, at least 50 requests.
    const std::map<std::string, at::Tensor> feed = {{"input", input}};
    const double estimate_us = RunP50(model, "forward", feed, 10);
    const int n = std::max(50, std::min(requests, static_cast<int>(2e6 / estimate_us)));
    std::vector<double> local, remote;
    for (int r = 0; r < rounds; ++r) {
      local.push_back(RunP50(model, "forward", feed, n));
      nlohmann::json b = nlohmann::json::parse(
          run_cli({"bench", "infer", "--model=" + preset,
                   absl::StrCat("--input=input=FP32:1x", in_features, ":", values),
                   "--concurrency=1", absl::StrCat("--requests=", n), "--duration=600", "--json"}));
      remote.push_back(b["latency_ms"]["p50"].get<double>() * 1000.0);
    }
    const nlohmann::json config =
        nlohmann::json::parse(metaload::testing::ReadFileOrEmpty(path + "/config.json"));
    std::string layers;
    for (const auto& s : config["layer_sizes"])
      absl::StrAppend(&layers, layers.empty() ? "" : "-", s.get<int>());
    const double in_us = Median(local), rpc_us = Median(remote);
    std::printf("%-8s %-24s %12lld %12.1f %12.1f %9.2f <= 1.3: %s\n", preset.c_str(),
                layers.c_str(), static_cast<long long>(model.ParameterCount()), in_us, rpc_us,
                rpc_us / in_us, rpc_us / in_us <= 1.3 ? "yes" : "no");
  }
  server.Signal(SIGTERM);
  server.Wait(std::chrono::seconds(15));
  StorageCostTable(dir, rounds);
  return 0;
}
