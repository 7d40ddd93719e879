// metaload bench: a bounded load tester against the daemon.
//
//   infer     N concurrent streams of Infer on one model (duration or request count)
//   load-hit  N concurrent streams of LoadModel on an already-loaded model (cache hits)
//   switch    alternate loads among K checkpoints (the web UI's checkpoint switching), one at a
//             time; under a budget that fits one, every switch evicts the previous model. With
//             --model=ID every load replaces the model under that one id (replace=true), as a
//             web UI switching its one checkpoint does; the latency is then the switch's
//
// Calls go out on gRPC's callback API from one channel, so 64 streams cost 64 calls in flight,
// not 64 client threads competing with the daemon for the same cores.
//
// Closed loop (the default): each stream sends its next request when its last one returns, so
// at saturation the latency is mostly queueing (mean = streams / throughput). Open loop
// (--rate=R): requests are due at R per second whatever the daemon does, at most N in flight;
// a request that has to wait for a free stream counts that wait, measured from when it was due
// (no coordinated omission).
//
// Prints requests/s, p50/p90/p99/max latency and errors by gRPC code; --json for scripts.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
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

// One request in flight: the storage its asynchronous call needs until it completes.
struct Call {
  grpc::ClientContext context;
  metaload::v1::LoadModelRequest load;
  metaload::v1::LoadModelResponse load_response;
  metaload::v1::InferResponse infer_response;
  Clock::time_point due;
};

// Starts request number n on `call`; `done` runs on a gRPC thread when it completes.
using StartFn = std::function<void(int64_t n, Call* call, std::function<void(grpc::Status)> done)>;

// Keeps up to `streams` calls in flight until the deadline or the request count, closed loop or
// at a fixed rate, and collects one sample per completed call.
class Driver {
 public:
  Driver(StartFn start, int streams, int64_t max_requests, Clock::duration duration, double rate,
         Clock::duration call_timeout)
      : start_fn_(std::move(start)),
        streams_(streams),
        max_requests_(max_requests),
        duration_(duration),
        rate_(rate),
        call_timeout_(call_timeout) {}

  std::vector<Sample> Run() {
    begin_ = Clock::now();
    if (rate_ > 0) {
      Pace();
    } else {
      for (int i = 0; i < streams_; ++i) {
        std::unique_lock<std::mutex> lock(mu_);
        if (!WithinRun(Clock::now(), issued_)) break;
        IssueLocked(Clock::now(), &lock);
      }
    }
    std::unique_lock<std::mutex> lock(mu_);
    idle_.wait(lock, [&] { return in_flight_ == 0 && backlog_.empty(); });
    return std::move(samples_);
  }

 private:
  // Whether request number `n`, sent (closed loop) or due (open loop) at `t`, is within the run.
  bool WithinRun(Clock::time_point t, int64_t n) const {
    return t < begin_ + duration_ && (max_requests_ <= 0 || n < max_requests_);
  }

  // Starts one call due at `due`; drops the lock around gRPC.
  void IssueLocked(Clock::time_point due, std::unique_lock<std::mutex>* lock) {
    const int64_t n = issued_++;
    ++in_flight_;
    lock->unlock();
    auto* call = new Call;
    call->due = due;
    call->context.set_deadline(std::chrono::system_clock::now() + call_timeout_);
    start_fn_(n, call, [this, call](grpc::Status status) { Completed(call, status); });
    lock->lock();
  }

  // Open loop: request k is due at begin + k / rate; one that finds every stream busy waits in
  // the backlog for the next completion.
  void Pace() {
    const auto period = std::chrono::duration<double>(1.0 / rate_);
    for (int64_t k = 0;; ++k) {
      const auto due = begin_ + std::chrono::duration_cast<Clock::duration>(period * k);
      std::this_thread::sleep_until(due);
      std::unique_lock<std::mutex> lock(mu_);
      if (!WithinRun(due, k)) break;
      if (in_flight_ < streams_) {
        IssueLocked(due, &lock);
      } else {
        backlog_.push_back(due);
      }
    }
  }

  void Completed(Call* call, const grpc::Status& status) {
    const auto now = Clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - call->due).count();
    delete call;
    std::unique_lock<std::mutex> lock(mu_);
    samples_.push_back({ms, status.error_code()});
    --in_flight_;
    if (!backlog_.empty()) {
      const Clock::time_point due = backlog_.front();
      backlog_.pop_front();
      IssueLocked(due, &lock);
    } else if (rate_ <= 0 && WithinRun(now, issued_)) {
      IssueLocked(now, &lock);
    }
    if (in_flight_ == 0 && backlog_.empty()) idle_.notify_all();
  }

  const StartFn start_fn_;
  const int streams_;
  const int64_t max_requests_;
  const Clock::duration duration_;
  const double rate_;
  const Clock::duration call_timeout_;
  Clock::time_point begin_;

  std::mutex mu_;
  std::condition_variable idle_;
  int64_t issued_ = 0;                     // guarded by mu_
  int in_flight_ = 0;                      // guarded by mu_
  std::deque<Clock::time_point> backlog_;  // due times waiting for a stream; guarded by mu_
  std::vector<Sample> samples_;            // guarded by mu_
};

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
  absl::StatusOr<Args> args =
      Args::Parse(rest,
                  {"address", "token_file", "model", "path", "paths", "concurrency", "duration",
                   "requests", "rate", "timeout"},
                  {"json"});
  auto usage = [](const std::string& m) {
    std::fprintf(
        stderr,
        "metaload bench: %s\nusage: metaload bench infer --model=ID --input=... | load-hit "
        "--path=P [--model=ID] | switch --paths=A,B[,...]  [--concurrency=N] "
        "[--duration=S | --requests=N] [--rate=R] [--timeout=S] [--address=H:P] [--json]\n",
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
  absl::StatusOr<long long> rate = args->GetInt("rate", 0);
  absl::StatusOr<long long> timeout = args->GetInt("timeout", 60);
  for (const auto* v : {&concurrency, &duration, &requests, &rate, &timeout}) {
    if (!v->ok()) return usage(std::string(v->status().message()));
  }
  if (*concurrency < 1 || *concurrency > 1024 || *duration < 1 || *duration > 3600) {
    return usage("--concurrency must be 1..1024 and --duration 1..3600 seconds");
  }
  if (*rate < 0 || *rate > 1000000 || *timeout < 1 || *timeout > 3600) {
    return usage("--rate must be 0..1000000 requests/s (0: closed loop) and --timeout 1..3600 s");
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
  const std::string bearer = token.empty() ? "" : "Bearer " + token;

  StartFn start;
  metaload::v1::InferRequest infer;  // shared, read-only, by every Infer call
  std::vector<std::string> paths;
  if (scenario == "infer") {
    if (!args->Has("model") || inputs.empty()) return usage("infer needs --model and --input");
    infer.set_model_id(args->Get("model"));
    for (const std::string& spec : inputs) {
      absl::Status s = ParseInputSpec(spec, infer.add_inputs());
      if (!s.ok()) return usage(std::string(s.message()));
    }
    start = [&](int64_t, Call* c, std::function<void(grpc::Status)> done) {
      if (!bearer.empty()) c->context.AddMetadata("authorization", bearer);
      stub->async()->Infer(&c->context, &infer, &c->infer_response, std::move(done));
    };
  } else if (scenario == "load-hit" || scenario == "switch") {
    if (scenario == "load-hit") {
      if (!args->Has("path")) return usage("load-hit needs --path");
      paths = {args->Get("path")};
    } else {
      paths = absl::StrSplit(args->Get("paths"), ',', absl::SkipEmpty());
      if (paths.size() < 2) return usage("switch needs --paths=A,B[,...]");
    }
    const std::string model_id = args->Get("model");
    start = [&, model_id](int64_t n, Call* c, std::function<void(grpc::Status)> done) {
      if (!bearer.empty()) c->context.AddMetadata("authorization", bearer);
      c->load.set_path(paths[static_cast<size_t>(n) % paths.size()]);
      c->load.set_model_id(model_id);
      c->load.set_replace(scenario == "switch" && !model_id.empty());
      stub->async()->LoadModel(&c->context, &c->load, &c->load_response, std::move(done));
    };
  } else {
    return usage("unknown scenario '" + scenario + "'");
  }

  Driver driver(start, static_cast<int>(*concurrency), *requests, std::chrono::seconds(*duration),
                static_cast<double>(*rate), std::chrono::seconds(*timeout));
  const auto begin = Clock::now();
  std::vector<Sample> samples = driver.Run();
  const double seconds = std::chrono::duration<double>(Clock::now() - begin).count();

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
      {"rate", *rate},
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
    std::printf(
        "%s: %zu requests in %.2f s (%.1f/s), concurrency %lld, %s\n", scenario.c_str(),
        samples.size(), seconds, out["requests_per_second"].get<double>(), *concurrency,
        *rate > 0 ? ("open loop at " + std::to_string(*rate) + "/s").c_str() : "closed loop");
    std::printf("latency ms: p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n", Percentile(ok_ms, 0.5),
                Percentile(ok_ms, 0.9), Percentile(ok_ms, 0.99),
                ok_ms.empty() ? 0.0 : ok_ms.back());
    for (const auto& [code, n] : errors)
      std::printf("errors %s: %lld\n", code.c_str(), static_cast<long long>(n));
    if (*rate == 0 && *concurrency > 1 && !samples.empty()) {
      std::printf(
          "closed loop: %lld streams / %.0f requests/s = %.3f ms mean in flight, most of it "
          "queueing once the daemon is saturated; --rate=R measures latency at a set load\n",
          *concurrency, out["requests_per_second"].get<double>(),
          1000.0 * static_cast<double>(*concurrency) / out["requests_per_second"].get<double>());
    }
  }
  return errors.empty() ? 0 : 1;
}

}  // namespace metaload::client
