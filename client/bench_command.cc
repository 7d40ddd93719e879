// metaload bench: a bounded load tester against the daemon.
//
//   infer     N concurrent streams of Infer on one model (duration or request count)
//   load-hit  N concurrent streams of LoadModel on an already-loaded model (cache hits)
//   switch    alternate loads among K checkpoints (the web UI's checkpoint switching), one at a
//             time; under a budget that fits one, every switch evicts the previous model
//
// Prints requests/s, p50/p90/p99/max latency and errors by gRPC code; --json for scripts.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_split.h"
#include "client/args.h"
#include "client/commands.h"
#include "metaload/v1/metaload.grpc.pb.h"

namespace metaload::client {

absl::Status ParseInputSpec(const std::string& spec, metaload::v1::Tensor* t);  // rpc_commands.cc

namespace {

using Clock = std::chrono::steady_clock;

struct Sample {
  double ms;
  grpc::StatusCode code;
};

double Percentile(std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  size_t i = static_cast<size_t>(p * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(i, sorted.size() - 1)];
}

}  // namespace

int RunBench(const std::vector<std::string>& argv) {
  std::vector<std::string> inputs, rest;
  for (size_t i = 0; i < argv.size(); ++i) {
    if (argv[i].rfind("--input=", 0) == 0) {
      inputs.push_back(argv[i].substr(8));
    } else {
      rest.push_back(argv[i]);
    }
  }
  absl::StatusOr<Args> args = Args::Parse(rest,
                                          {"address", "token_file", "model", "path", "paths",
                                           "concurrency", "duration", "requests", "timeout"},
                                          {"json"});
  auto usage = [](const std::string& m) {
    std::fprintf(
        stderr,
        "metaload bench: %s\nusage: metaload bench infer --model=ID --input=... | load-hit "
        "--path=P [--model=ID] | switch --paths=A,B[,...]  [--concurrency=N] "
        "[--duration=S | --requests=N] [--address=H:P] [--json]\n",
        m.c_str());
    return 2;
  };
  if (!args.ok()) return usage(std::string(args.status().message()));
  if (args->positionals().size() != 1)
    return usage("needs one scenario: infer, load-hit or switch");
  const std::string scenario = args->positionals()[0];
  absl::StatusOr<long long> concurrency = args->GetInt("concurrency", scenario == "switch" ? 1 : 8);
  absl::StatusOr<long long> duration = args->GetInt("duration", 10);
  absl::StatusOr<long long> requests = args->GetInt("requests", 0);
  if (!concurrency.ok() || !duration.ok() || !requests.ok() || *concurrency < 1 ||
      *concurrency > 1024 || *duration < 1 || *duration > 3600) {
    return usage("--concurrency must be 1..1024 and --duration 1..3600 seconds");
  }
  std::string token;
  if (args->Has("token_file")) {
    std::ifstream f(args->Get("token_file"));
    std::getline(f, token);
  }
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(1 << 30);
  auto channel = grpc::CreateCustomChannel(args->Get("address", "127.0.0.1:50051"),
                                           grpc::InsecureChannelCredentials(), channel_args);
  auto stub = metaload::v1::ModelLoader::NewStub(channel);

  std::function<grpc::Status(int worker, int64_t n)> call;
  metaload::v1::InferRequest infer;
  std::vector<std::string> paths;
  if (scenario == "infer") {
    if (!args->Has("model") || inputs.empty()) return usage("infer needs --model and --input");
    infer.set_model_id(args->Get("model"));
    for (const std::string& spec : inputs) {
      absl::Status s = ParseInputSpec(spec, infer.add_inputs());
      if (!s.ok()) return usage(std::string(s.message()));
    }
    call = [&](int, int64_t) {
      grpc::ClientContext c;
      if (!token.empty()) c.AddMetadata("authorization", "Bearer " + token);
      metaload::v1::InferResponse r;
      return stub->Infer(&c, infer, &r);
    };
  } else if (scenario == "load-hit") {
    if (!args->Has("path")) return usage("load-hit needs --path");
    call = [&](int, int64_t) {
      grpc::ClientContext c;
      if (!token.empty()) c.AddMetadata("authorization", "Bearer " + token);
      metaload::v1::LoadModelRequest q;
      q.set_path(args->Get("path"));
      q.set_model_id(args->Get("model"));
      metaload::v1::LoadModelResponse r;
      return stub->LoadModel(&c, q, &r);
    };
  } else if (scenario == "switch") {
    paths = absl::StrSplit(args->Get("paths"), ',', absl::SkipEmpty());
    if (paths.size() < 2) return usage("switch needs --paths=A,B[,...]");
    call = [&](int, int64_t n) {
      grpc::ClientContext c;
      if (!token.empty()) c.AddMetadata("authorization", "Bearer " + token);
      metaload::v1::LoadModelRequest q;
      q.set_path(paths[static_cast<size_t>(n) % paths.size()]);
      metaload::v1::LoadModelResponse r;
      return stub->LoadModel(&c, q, &r);
    };
  } else {
    return usage("unknown scenario '" + scenario + "'");
  }

  const auto deadline = Clock::now() + std::chrono::seconds(*duration);
  std::atomic<int64_t> issued{0};
  std::mutex mu;
  std::vector<Sample> samples;
  const auto start = Clock::now();
  std::vector<std::thread> workers;
  for (int w = 0; w < *concurrency; ++w) {
    workers.emplace_back([&, w] {
      std::vector<Sample> mine;
      while (Clock::now() < deadline) {
        const int64_t n = issued.fetch_add(1);
        if (*requests > 0 && n >= *requests) break;
        const auto t0 = Clock::now();
        grpc::Status s = call(w, n);
        mine.push_back(
            {std::chrono::duration<double, std::milli>(Clock::now() - t0).count(), s.error_code()});
      }
      std::lock_guard<std::mutex> lock(mu);
      samples.insert(samples.end(), mine.begin(), mine.end());
    });
  }
  for (auto& t : workers) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  std::vector<double> ok_ms;
  std::map<std::string, int64_t> errors;
  for (const Sample& s : samples) {
    if (s.code == grpc::StatusCode::OK) {
      ok_ms.push_back(s.ms);
    } else {
      ++errors[absl::StatusCodeToString(static_cast<absl::StatusCode>(s.code))];
    }
  }
  std::sort(ok_ms.begin(), ok_ms.end());
  nlohmann::ordered_json out = {
      {"scenario", scenario},
      {"concurrency", *concurrency},
      {"seconds", seconds},
      {"requests", samples.size()},
      {"ok", ok_ms.size()},
      {"requests_per_second", seconds > 0 ? samples.size() / seconds : 0.0},
      {"latency_ms",
       {{"p50", Percentile(ok_ms, 0.50)},
        {"p90", Percentile(ok_ms, 0.90)},
        {"p99", Percentile(ok_ms, 0.99)},
        {"max", ok_ms.empty() ? 0.0 : ok_ms.back()}}},
      {"errors", errors}};
  if (args->Has("json")) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("%s: %zu requests in %.2f s (%.1f/s), concurrency %lld\n", scenario.c_str(),
                samples.size(), seconds, out["requests_per_second"].get<double>(), *concurrency);
    std::printf("latency ms: p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n", Percentile(ok_ms, 0.5),
                Percentile(ok_ms, 0.9), Percentile(ok_ms, 0.99),
                ok_ms.empty() ? 0.0 : ok_ms.back());
    for (const auto& [code, n] : errors)
      std::printf("errors %s: %lld\n", code.c_str(), static_cast<long long>(n));
  }
  return errors.empty() ? 0 : 1;
}

}  // namespace metaload::client
