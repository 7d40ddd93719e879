// Soak: load and unload a ~170 MB model through the real daemon, over and over, while other
// threads keep calling Infer on it; then compare the daemon's resident memory, open file
// descriptors and threads after warm-up with the same figures at the end.
//
//   soak [--cycles=500] [--warmup=N] [--infer_threads=2] [--max_growth_percent=P]
//
// `make soak` runs 500 cycles and prints the figures; CI runs 50 with --max_growth_percent=5.
// Open fds must stay flat; threads may grow by a few (gRPC sizes its pool under load), not per
// cycle. Exits 1 when a limit is exceeded or an RPC fails with anything but NOT_FOUND (an Infer
// that arrives between an unload and the next load).
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "metaload/v1/metaload.grpc.pb.h"
#include "server/core/process_memory.h"
#include "tests/e2e/daemon_process.h"
#include "tests/test_util.h"

namespace metaload {
namespace {

struct Sample {
  int64_t rss_bytes = 0;
  int64_t fds = 0;
  int64_t threads = 0;
};

Sample SampleProcess(pid_t pid) {
  Sample s;
  const std::string proc = "/proc/" + std::to_string(pid);
  absl::StatusOr<core::ProcessMemory> m =
      core::ParseProcStatus(testing::ReadFileOrEmpty(proc + "/status"));
  if (m.ok()) {
    s.rss_bytes = m->rss_bytes;
    s.threads = m->threads;
  }
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator(proc + "/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    ++s.fds;
  }
  return s;
}

constexpr int kThreadSlack = 8;

double MiB(int64_t bytes) { return static_cast<double>(bytes) / (1 << 20); }

int Usage(const char* why) {
  std::fprintf(stderr,
               "soak: %s\nusage: soak [--cycles=N] [--warmup=N] [--infer_threads=N] "
               "[--max_growth_percent=P]\n",
               why);
  return 2;
}

int Main(int argc, char** argv) {
  int cycles = 500, warmup = -1, infer_threads = 2;
  double max_growth = -1;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    auto value = [&arg](absl::string_view flag) {
      if (!absl::StartsWith(arg, flag)) return false;
      arg.remove_prefix(flag.size());
      return true;
    };
    bool ok = true;
    if (value("--cycles=")) {
      ok = absl::SimpleAtoi(arg, &cycles) && cycles > 0;
    } else if (value("--warmup=")) {
      ok = absl::SimpleAtoi(arg, &warmup) && warmup > 0;
    } else if (value("--infer_threads=")) {
      ok = absl::SimpleAtoi(arg, &infer_threads) && infer_threads >= 0;
    } else if (value("--max_growth_percent=")) {
      ok = absl::SimpleAtod(arg, &max_growth) && max_growth >= 0;
    } else {
      return Usage("unknown argument");
    }
    if (!ok) return Usage("bad value");
  }
  if (warmup < 0) warmup = std::max(10, cycles / 10);
  if (warmup >= cycles) return Usage("--warmup must be below --cycles");

  testing::TempDir dir;
  testing::CommandResult synth = testing::RunCommand(
      {METALOAD_CLI_PATH, "synth", "--arch=mlp", "--preset=medium", dir / "medium"}, dir / "synth");
  if (synth.exit_code != 0) {
    std::fprintf(stderr, "soak: synth failed: %s\n", synth.err.c_str());
    return 1;
  }
  DaemonProcess daemon(dir, {"--log_level=info"});
  if (daemon.grpc_port() <= 0) {
    std::fprintf(stderr, "soak: metaloadd did not start:\n%s\n", daemon.process().Stderr().c_str());
    return 1;
  }
  const pid_t pid = daemon.process().pid();
  auto channel = daemon.Channel();
  auto stub = v1::ModelLoader::NewStub(channel);

  // Infer traffic until `stop`; while `paused`, the threads park (counted in `parked`).
  std::atomic<bool> stop{false}, paused{false};
  std::atomic<int> parked{0};
  std::atomic<int64_t> infer_ok{0}, infer_not_found{0};
  std::mutex errors_mu;
  std::map<std::string, int64_t> errors;
  auto record_error = [&](const std::string& what, const grpc::Status& s) {
    std::lock_guard<std::mutex> lock(errors_mu);
    if (errors[what + " " + std::to_string(s.error_code())]++ == 0) {
      std::fprintf(stderr, "soak: %s failed: %d %s\n", what.c_str(), s.error_code(),
                   s.error_message().c_str());
    }
  };
  std::vector<std::thread> traffic;
  for (int t = 0; t < infer_threads; ++t) {
    traffic.emplace_back([&] {
      auto own = v1::ModelLoader::NewStub(channel);
      v1::InferRequest request;
      request.set_model_id("soak");
      v1::Tensor* input = request.add_inputs();
      input->set_name("input");
      input->set_datatype("FP32");
      input->add_shape(1);
      input->add_shape(1024);
      input->set_raw_data(std::string(1024 * sizeof(float), '\0'));
      while (!stop.load()) {
        if (paused.load()) {
          ++parked;
          while (paused.load() && !stop.load()) std::this_thread::sleep_for(5ms);
          --parked;
          continue;
        }
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + 60s);
        v1::InferResponse response;
        grpc::Status s = own->Infer(&context, request, &response);
        if (s.ok()) {
          ++infer_ok;
        } else if (s.error_code() == grpc::StatusCode::NOT_FOUND) {
          ++infer_not_found;
          std::this_thread::sleep_for(1ms);
        } else {
          record_error("Infer", s);
        }
      }
    });
  }
  // Parks the Infer threads and lets the daemon settle, so a measurement sees no model in use.
  auto measure = [&] {
    paused.store(true);
    while (parked.load() < infer_threads) std::this_thread::sleep_for(5ms);
    std::this_thread::sleep_for(300ms);
    Sample s = SampleProcess(pid);
    paused.store(false);
    return s;
  };

  const Sample fresh = measure();
  std::printf("soak: daemon started: rss %.1f MiB, %lld fds, %lld threads\n", MiB(fresh.rss_bytes),
              static_cast<long long>(fresh.fds), static_cast<long long>(fresh.threads));
  Sample warm, last;
  const auto start = std::chrono::steady_clock::now();
  auto warm_time = start;
  int64_t loaded_bytes = 0;
  for (int cycle = 1; cycle <= cycles; ++cycle) {
    {
      v1::LoadModelRequest request;
      request.set_path("medium");
      request.set_model_id("soak");
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + 120s);
      v1::LoadModelResponse response;
      grpc::Status s = stub->LoadModel(&context, request, &response);
      if (!s.ok()) {
        record_error("LoadModel", s);
        break;
      }
      loaded_bytes = response.model().resident_bytes();
    }
    std::this_thread::sleep_for(20ms);  // let some Infer calls reach the model
    {
      v1::UnloadModelRequest request;
      request.set_model_id("soak");
      grpc::ClientContext context;
      v1::UnloadModelResponse response;
      grpc::Status s = stub->UnloadModel(&context, request, &response);
      if (!s.ok()) record_error("UnloadModel", s);
    }
    if (cycle == warmup) {
      warm = measure();
      warm_time = std::chrono::steady_clock::now();
      std::printf("soak: warm-up done after %d cycles: rss %.1f MiB, %lld fds, %lld threads\n",
                  cycle, MiB(warm.rss_bytes), static_cast<long long>(warm.fds),
                  static_cast<long long>(warm.threads));
    } else if (cycle % std::max(1, cycles / 10) == 0 || cycle == cycles) {
      last = measure();
      std::printf("soak: cycle %d/%d: rss %.1f MiB, %lld fds, %lld threads, infer ok %lld\n", cycle,
                  cycles, MiB(last.rss_bytes), static_cast<long long>(last.fds),
                  static_cast<long long>(last.threads), static_cast<long long>(infer_ok.load()));
    }
    std::fflush(stdout);
  }
  stop.store(true);
  for (std::thread& t : traffic) t.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - warm_time).count();
  const double growth = warm.rss_bytes > 0
                            ? 100.0 * static_cast<double>(last.rss_bytes - warm.rss_bytes) /
                                  static_cast<double>(warm.rss_bytes)
                            : 0.0;

  std::printf(
      "soak: model %.1f MiB, %d cycles, %.1f cycles/s after warm-up, infer ok %lld, "
      "not found (between cycles) %lld\n",
      MiB(loaded_bytes), cycles, (cycles - warmup) / std::max(seconds, 1e-9),
      static_cast<long long>(infer_ok.load()), static_cast<long long>(infer_not_found.load()));
  std::printf("soak: rss after warm-up %.1f MiB, at the end %.1f MiB, growth %+.2f %%\n",
              MiB(warm.rss_bytes), MiB(last.rss_bytes), growth);
  std::printf("soak: fds %lld -> %lld, threads %lld -> %lld\n", static_cast<long long>(warm.fds),
              static_cast<long long>(last.fds), static_cast<long long>(warm.threads),
              static_cast<long long>(last.threads));

  bool failed = false;
  {
    std::lock_guard<std::mutex> lock(errors_mu);
    for (const auto& [what, n] : errors) {
      std::printf("soak: FAILED: %s x%lld\n", what.c_str(), static_cast<long long>(n));
      failed = true;
    }
  }
  if (infer_threads > 0 && infer_ok.load() == 0) {
    std::printf("soak: FAILED: no Infer call reached a loaded model\n");
    failed = true;
  }
  if (max_growth >= 0) {
    if (growth > max_growth) {
      std::printf("soak: FAILED: rss grew %.2f %% (limit %.2f %%)\n", growth, max_growth);
      failed = true;
    }
    if (last.fds > warm.fds) {
      std::printf("soak: FAILED: open fds grew\n");
      failed = true;
    }
    // gRPC's event engine grows its pool to a bounded size under concurrent calls, at a moment
    // that depends on timing; a leak grows with the cycle count.
    if (last.threads > warm.threads + kThreadSlack) {
      std::printf("soak: FAILED: threads grew by more than %d\n", kThreadSlack);
      failed = true;
    }
  }
  if (daemon.process().Wait(0ms)) {
    std::printf("soak: FAILED: metaloadd exited\n%s\n", daemon.process().Stderr().c_str());
    failed = true;
  }
  std::printf("soak: %s\n", failed ? "FAILED" : "ok");
  return failed ? 1 : 0;
}

}  // namespace
}  // namespace metaload

int main(int argc, char** argv) { return metaload::Main(argc, argv); }
