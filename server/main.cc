// metaloadd: the metaload daemon. Parses flags, starts the Daemon, waits for SIGTERM or SIGINT,
// drains for --shutdown_grace and exits 0 (3 when something could not be interrupted by the
// grace plus 5 s: service::kDrainTimeoutExitCode). SIGHUP is logged and ignored (a closed terminal
// or a reload habit must not stop a server mid-load; there is nothing to reload).
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/core/byte_size.h"
#include "server/core/log.h"
#include "server/service/daemon.h"

#ifndef METALOAD_VERSION
#define METALOAD_VERSION "dev"
#endif

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "gRPC listen address host:port (port 0: pick a free port; see --port_file), or "
          "unix:PATH for a Unix socket (same-host clients; access by the directory's permissions)");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9464",
          "Prometheus listen address host:port; metrics are served at /metrics");
ABSL_FLAG(std::vector<std::string>, model_root, {},
          "Directory that request paths are resolved against (repeatable, or comma-separated)");
ABSL_FLAG(std::string, port_file, "",
          "When set, receives 'grpc_port=N' and 'metrics_port=M' lines once both are bound");
ABSL_FLAG(absl::Duration, shutdown_grace, absl::Seconds(10),
          "On SIGTERM/SIGINT, how long in-flight calls may still run. Loads still running are "
          "then cancelled; if something cannot be interrupted (TorchScript code, a forward), "
          "metaloadd exits anyway 5 s later with status 3, logging what was still running");
ABSL_FLAG(absl::Duration, load_stall_timeout, absl::Minutes(10),
          "When every load thread has run one load for longer than this, health turns "
          "NOT_SERVING (a liveness probe can restart the daemon) until a thread is free; "
          "0 disables");
ABSL_FLAG(std::string, tls_cert, "", "PEM server certificate (with --tls_key: serve TLS)");
ABSL_FLAG(std::string, tls_key, "", "PEM server private key");
ABSL_FLAG(std::string, tls_client_ca, "", "PEM CA for client certificates (mutual TLS)");
ABSL_FLAG(int, max_message_bytes, 256 << 20,
          "Largest gRPC message accepted or sent, in bytes; an Infer whose reply (from the "
          "entry's output shapes) would be larger is RESOURCE_EXHAUSTED before computing");
ABSL_FLAG(int64_t, max_infer_input_bytes, 0,
          "Largest sum of one Infer's input tensor bytes; 0: only --max_message_bytes");
ABSL_FLAG(int64_t, max_infer_batch, 0, "Largest first dimension of an Infer input; 0: none");
ABSL_FLAG(std::string, log_level, "info", "debug, info, warning or error");
ABSL_FLAG(std::string, memory_budget, "",
          "Per-device memory for models, e.g. cpu=8GiB,cuda:0=70GiB, used as given. cpu "
          "default: 80% of MemAvailable at start, and at each load at most what the models hold "
          "plus 80% of MemAvailable then; each CUDA device: its free memory at start minus "
          "1 GiB (a tenth under 10 GiB)");
ABSL_FLAG(
    std::string, auth_token_file, "",
    "File holding a token; every RPC but health must then carry 'authorization: Bearer <token>'");
ABSL_FLAG(std::string, host_arena, "budget",
          "Host memory kept faulted between CPU loads, so a load after an unload or a switch "
          "fills memory at copy speed: 'budget' (as much as the cpu budget leaves), a size "
          "(e.g. 8GiB) or 0 (none)");
ABSL_FLAG(absl::Duration, arena_idle_release, absl::Seconds(60),
          "Kept host memory unused this long goes back to the kernel (0: only when the budget "
          "needs it)");
ABSL_FLAG(int, load_threads, 2, "Loads running at once");
ABSL_FLAG(int, infer_threads, 2, "Infer calls running at once");
ABSL_FLAG(int, intra_op_threads, 0, "Threads one forward pass may use (0: LibTorch's default)");
ABSL_FLAG(std::string, state_dir, "", "Directory for persistent state (checkpoint sha256 cache)");
ABSL_FLAG(std::string, preload, "", "JSON list of LoadModel requests to load at start");
ABSL_FLAG(bool, allow_torchscript, false,
          "Load TorchScript archives (refused by default). TorchScript is a program: loading one "
          "runs the file's code, with the daemon's rights. Only for model roots whose every file "
          "you trust");
ABSL_FLAG(absl::Duration, keepalive_time, absl::Minutes(2),
          "Ping idle clients this often (0 disables keepalive)");
ABSL_FLAG(absl::Duration, keepalive_timeout, absl::Seconds(20),
          "Drop a client whose ping goes unanswered this long");

namespace {

using metaload::core::LogError;
using metaload::core::LogInfo;

// Written to a temporary file and renamed, so a reader never sees half of it.
bool WritePortFile(const std::string& path, int grpc_port, int metrics_port) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << "grpc_port=" << grpc_port << "\nmetrics_port=" << metrics_port << "\n";
    if (!f) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

// "0.0.0.0:50051" -> "127.0.0.1:50051", for the hint printed to the user.
std::string DialableAddress(const std::string& listen, int port) {
  if (listen.rfind("unix:", 0) == 0) return listen;  // a Unix socket has no port
  std::string host = listen.substr(0, listen.rfind(':'));
  if (host.empty() || host == "0.0.0.0" || host == "[::]") host = "127.0.0.1";
  return absl::StrCat(host, ":", port);
}

// absl flags keep only the last value of a repeated flag; --model_root is documented as
// repeatable, so its occurrences are merged into one comma-separated value first.
std::vector<char*> MergeRepeatedModelRoots(int argc, char** argv, std::string* merged) {
  std::vector<char*> out;
  std::vector<std::string> roots;
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") {
      for (; i < argc; ++i) out.push_back(argv[i]);
      break;
    }
    for (const char* prefix : {"--model_root=", "-model_root="}) {
      if (arg.rfind(prefix, 0) == 0) {
        roots.push_back(arg.substr(std::string(prefix).size()));
        arg.clear();
        break;
      }
    }
    if (arg.empty()) continue;
    if ((arg == "--model_root" || arg == "-model_root") && i + 1 < argc) {
      roots.push_back(argv[++i]);
      continue;
    }
    out.push_back(argv[i]);
  }
  if (!roots.empty()) {
    *merged = "--model_root=";
    for (size_t i = 0; i < roots.size(); ++i) *merged += (i ? "," : "") + roots[i];
    out.insert(out.begin() + 1, merged->data());
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  // Every allocation of 4 MiB or more (model tensors) gets its own mapping, returned to the
  // kernel when freed; glibc would otherwise raise the threshold after the first free and keep
  // unloaded models' memory in its heap.
  mallopt(M_MMAP_THRESHOLD, 4 << 20);
  // Debian builds Abseil without NDEBUG, so every absl::Mutex operation (gRPC takes several per
  // call) would also update a process-wide lock graph under one global lock: 7% of the daemon's
  // CPU on cache hits, measured. metaload's own locks are std::mutex; TSan checks them in CI.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  absl::SetProgramUsageMessage(
      "metaloadd: loads PyTorch checkpoints onto CPU/GPU on request and serves them over gRPC.\n"
      "Usage: metaloadd --model_root=DIR [--listen=HOST:PORT] [--metrics_listen=HOST:PORT] ...");
  std::string merged_roots;
  std::vector<char*> args = MergeRepeatedModelRoots(argc, argv, &merged_roots);
  absl::ParseCommandLine(static_cast<int>(args.size()), args.data());

  metaload::core::LogLevel level;
  if (!metaload::core::ParseLogLevel(absl::GetFlag(FLAGS_log_level), &level)) {
    std::fprintf(stderr, "metaloadd: --log_level must be debug, info, warning or error\n");
    return 2;
  }
  metaload::core::SetMinLogLevel(level);

  // Block the shutdown signals before any thread starts, so every thread inherits the mask and
  // only the sigwait below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  metaload::service::Daemon::Options options;
  options.listen = absl::GetFlag(FLAGS_listen);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.model_roots = absl::GetFlag(FLAGS_model_root);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.max_infer_input_bytes = absl::GetFlag(FLAGS_max_infer_input_bytes);
  options.max_infer_batch = absl::GetFlag(FLAGS_max_infer_batch);
  options.version = METALOAD_VERSION;
  options.load_threads = absl::GetFlag(FLAGS_load_threads);
  options.infer_threads = absl::GetFlag(FLAGS_infer_threads);
  options.intra_op_threads = absl::GetFlag(FLAGS_intra_op_threads);
  options.state_dir = absl::GetFlag(FLAGS_state_dir);
  options.preload_file = absl::GetFlag(FLAGS_preload);
  options.keepalive_time = absl::GetFlag(FLAGS_keepalive_time);
  options.keepalive_timeout = absl::GetFlag(FLAGS_keepalive_timeout);
  options.allow_torchscript = absl::GetFlag(FLAGS_allow_torchscript);
  options.load_stall_timeout = absl::GetFlag(FLAGS_load_stall_timeout);
  if (options.load_stall_timeout < absl::ZeroDuration()) {
    LogError("start_failed").Kv("error", "--load_stall_timeout must not be negative");
    return 1;
  }
  const absl::Duration grace = absl::GetFlag(FLAGS_shutdown_grace);
  if (grace < absl::ZeroDuration()) {
    LogError("start_failed")
        .Kv("error", "--shutdown_grace must not be negative")
        .Kv("value", absl::FormatDuration(grace));
    return 1;
  }
  if (options.keepalive_time < absl::ZeroDuration() ||
      options.keepalive_timeout < absl::ZeroDuration()) {
    LogError("start_failed")
        .Kv("error", "--keepalive_time and --keepalive_timeout must not be negative");
    return 1;
  }
  if (!absl::GetFlag(FLAGS_memory_budget).empty()) {
    absl::StatusOr<std::map<std::string, int64_t>> budgets =
        metaload::core::ParseMemoryBudgets(absl::GetFlag(FLAGS_memory_budget));
    if (!budgets.ok()) {
      LogError("start_failed").Kv("error", budgets.status().ToString());
      return 1;
    }
    options.memory_budgets = *budgets;
  }
  if (const std::string arena = absl::GetFlag(FLAGS_host_arena); arena != "budget") {
    absl::StatusOr<int64_t> bytes = metaload::core::ParseByteSize(arena);
    if (!bytes.ok() || *bytes < 0) {
      LogError("start_failed")
          .Kv("error", "--host_arena must be 'budget', a size or 0")
          .Kv("value", arena);
      return 1;
    }
    options.host_arena_bytes = *bytes;
  }
  options.arena_idle_release = absl::GetFlag(FLAGS_arena_idle_release);
  if (!absl::GetFlag(FLAGS_auth_token_file).empty()) {
    std::ifstream f(absl::GetFlag(FLAGS_auth_token_file));
    std::string token;
    std::getline(f, token);
    while (!token.empty() && (token.back() == '\r' || token.back() == ' ')) token.pop_back();
    if (!f.good() && token.empty()) {
      LogError("start_failed")
          .Kv("error", "cannot read --auth_token_file")
          .Kv("path", absl::GetFlag(FLAGS_auth_token_file));
      return 1;
    }
    if (token.empty()) {
      LogError("start_failed").Kv("error", "--auth_token_file is empty");
      return 1;
    }
    options.auth_token = token;
  }

  absl::StatusOr<std::unique_ptr<metaload::service::Daemon>> daemon =
      metaload::service::Daemon::Create(options);
  if (!daemon.ok()) {
    LogError("start_failed").Kv("error", daemon.status().ToString());
    return 1;
  }
  metaload::service::Daemon& d = **daemon;

  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty() && !WritePortFile(port_file, d.grpc_port(), d.metrics_port())) {
    LogError("start_failed").Kv("error", "cannot write --port_file").Kv("path", port_file);
    return 1;
  }
  const std::string grpc_address = DialableAddress(options.listen, d.grpc_port());
  LogInfo("serving")
      .Kv("version", METALOAD_VERSION)
      .Kv("grpc", grpc_address)
      .Kv("metrics",
          absl::StrCat("http://", DialableAddress(options.metrics_listen, d.metrics_port()),
                       "/metrics"))
      .Kv("tls", options.tls_cert_file.empty() ? "off" : "on")
      .Kv("auth", options.auth_token.empty() ? "off" : "on")
      .Kv("torchscript", options.allow_torchscript ? "allowed (runs the files' code)" : "refused")
      .Kv("model_roots", d.model_roots().size());
  for (const std::string& root : d.model_roots()) LogInfo("model_root").Kv("path", root);
  if (isatty(STDERR_FILENO)) {
    const bool unix_socket = grpc_address.rfind("unix:", 0) == 0;
    std::fprintf(stderr, "\n  metaloadd is serving. Try:\n    grpcurl -plaintext %s%s list\n\n",
                 unix_socket ? "-unix " : "",
                 unix_socket ? grpc_address.substr(5).c_str() : grpc_address.c_str());
  }

  int sig = 0;
  while (true) {
    if (sigwait(&signals, &sig) != 0) continue;
    if (sig != SIGHUP) break;
    LogInfo("sighup_ignored").Kv("hint", "SIGTERM or SIGINT stops metaloadd");
  }
  LogInfo("draining")
      .Kv("signal", sig == SIGTERM ? "SIGTERM" : "SIGINT")
      .Kv("grace", absl::FormatDuration(grace));
  const absl::Time start = absl::Now();
  // The drain ends by the grace plus kDrainStopSeconds whatever a load or forward does: one that
  // cannot be interrupted (TorchScript code, a read that never returns) must not keep the
  // process alive (without the deadline, a hostile caller kept it alive 34 s and 66 s).
  std::mutex drain_mu;
  std::condition_variable drain_cv;
  bool drained = false;
  std::thread deadline([&] {
    std::unique_lock<std::mutex> lock(drain_mu);
    const auto limit = std::chrono::milliseconds(
        absl::ToInt64Milliseconds(grace + absl::Seconds(metaload::service::kDrainStopSeconds)));
    if (drain_cv.wait_for(lock, limit, [&] { return drained; })) return;
    const std::string running = d.StillRunning();  // as of the grace's end or later
    LogError("drain_timed_out")
        .Kv("seconds", absl::ToDoubleSeconds(absl::Now() - start))
        .Kv("still_running", running.empty() ? "nothing the cache knows of" : running)
        .Kv("exit_code", metaload::service::kDrainTimeoutExitCode);
    std::fflush(stderr);
    std::_Exit(metaload::service::kDrainTimeoutExitCode);
  });
  d.Drain(grace);
  {
    std::lock_guard<std::mutex> lock(drain_mu);
    drained = true;
  }
  drain_cv.notify_all();
  deadline.join();
  LogInfo("stopped").Kv("drain_seconds", absl::ToDoubleSeconds(absl::Now() - start));
  return 0;
}
