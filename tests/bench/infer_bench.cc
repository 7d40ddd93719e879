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
// Usage: infer_bench --daemon=PATH --cli=PATH [--dir=DIR] [--rounds=N] [--requests=N]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
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

// p50 of `n` forwards of `model`'s entry on `input`, in microseconds, after a warm-up.
double InProcessP50(const metaload::models::Model& model, const at::Tensor& input, int n) {
  std::vector<double> us;
  for (int i = 0; i < n + n / 10; ++i) {
    const auto t0 = Clock::now();
    auto out = model.Run("forward", {{"input", input}});
    const double elapsed = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    if (!out.ok()) {
      std::fprintf(stderr, "in-process forward: %s\n", out.status().ToString().c_str());
      std::exit(1);
    }
    if (i >= n / 10) us.push_back(elapsed);
  }
  return Median(us);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string daemon = Flag(argc, argv, "daemon", "");
  const std::string cli = Flag(argc, argv, "cli", "");
  if (daemon.empty() || cli.empty()) {
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
  for (const std::string& preset : presets) {
    metaload::models::SynthOptions synth;
    synth.architecture = "mlp";
    synth.preset = preset;
    auto written = metaload::models::Synthesize(synth, dir + "/mlp-" + preset);
    if (!written.ok()) {
      std::fprintf(stderr, "synth %s: %s\n", preset.c_str(), written.status().ToString().c_str());
      return 1;
    }
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
    auto source = metaload::core::CheckpointSource::Open(path);
    auto model = source.ok()
                     ? metaload::models::BuildModel("mlp", (*source)->index())
                     : absl::StatusOr<std::unique_ptr<metaload::models::Model>>(source.status());
    if (!model.ok() || !(*model)->Load(**source, {}).ok()) {
      std::fprintf(stderr, "load %s failed\n", path.c_str());
      return 1;
    }
    const int64_t in_features = (*model)->Entries()[0].inputs[0].shape.back();
    at::Tensor input = at::randn({1, in_features});
    std::string values;
    for (int64_t i = 0; i < in_features; ++i)
      absl::StrAppend(&values, i ? "," : "", input[0][i].item<float>());
    run_cli({"load", "mlp-" + preset, "--id=" + preset, "--quiet"});

    // At most about two seconds of forwards per measurement, at least 50 requests.
    const double estimate_us = InProcessP50(**model, input, 10);
    const int n = std::max(50, std::min(requests, static_cast<int>(2e6 / estimate_us)));
    std::vector<double> local, remote;
    for (int r = 0; r < rounds; ++r) {
      local.push_back(InProcessP50(**model, input, n));
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
                layers.c_str(), static_cast<long long>((*model)->ParameterCount()), in_us, rpc_us,
                rpc_us / in_us, rpc_us / in_us <= 1.3 ? "yes" : "no");
  }
  server.Signal(SIGTERM);
  server.Wait(std::chrono::seconds(15));
  return 0;
}
