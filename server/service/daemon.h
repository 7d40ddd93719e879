// The metaloadd process minus flag parsing: the gRPC server (ModelLoader, grpc.health.v1.Health,
// server reflection) and the Prometheus endpoint, with their lifecycle.
//
//   Create()  binds both listeners and starts serving; health reports SERVING.
//   Drain()   health goes NOT_SERVING, new calls get UNAVAILABLE, in-flight calls get until the
//             grace deadline, then the servers stop.
//
// Owns the servers and the services they dispatch to. Drain() may be called from any one thread;
// the accessors are thread-safe.
#ifndef METALOAD_SERVER_SERVICE_DAEMON_H_
#define METALOAD_SERVER_SERVICE_DAEMON_H_

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace grpc {
class Server;
}  // namespace grpc

namespace metaload::metrics {
class MetricsServer;
class LoaderMetrics;
}  // namespace metaload::metrics

namespace metaload::cache {
class ModelCache;
}  // namespace metaload::cache

namespace metaload::core {
class ChecksumStore;
class HostArena;
}  // namespace metaload::core

namespace metaload::service {

class CallTracker;
class ModelLoaderService;
class ReflectionV1;
class PathResolver;

// The smallest --max_message_bytes accepted: below it no real request fits.
inline constexpr int kMinMessageBytes = 64 << 10;

class Daemon {
 public:
  struct Options {
    // gRPC address, host:port; port 0 picks a free one (see grpc_port()).
    std::string listen = "127.0.0.1:50051";
    // Prometheus address, host:port; port 0 picks a free one (see metrics_port()).
    std::string metrics_listen = "127.0.0.1:9464";
    // Directories request paths are resolved against. Each must exist.
    std::vector<std::string> model_roots;
    // PEM server certificate and key; both empty: plaintext.
    std::string tls_cert_file;
    std::string tls_key_file;
    // PEM CA that client certificates must chain to; set: mutual TLS is required.
    std::string tls_client_ca_file;
    // Largest request or response message, in bytes. Also the largest reply an Infer may
    // promise (cache::InferLimits): bigger ones are refused before computing.
    int max_message_bytes = 256 << 20;
    // Largest sum of one Infer's input tensor bytes; 0: only max_message_bytes.
    int64_t max_infer_input_bytes = 0;
    // Largest first dimension (batch) of any Infer input; 0: none.
    int64_t max_infer_batch = 0;
    // Exported as metaload_build_info{version}.
    std::string version = "dev";
    // Device -> bytes ("cpu" defaults to 80% of MemAvailable at start).
    std::map<std::string, int64_t> memory_budgets;
    // Host memory kept faulted between CPU loads (core::HostArena), at most this many bytes;
    // -1: as much as the cpu budget leaves (the default); 0: none, every load faults fresh
    // memory.
    int64_t host_arena_bytes = -1;
    // Kept memory unused this long goes back to the kernel; zero: only when the budget needs it.
    absl::Duration arena_idle_release = absl::Seconds(60);
    // Bearer token required on every RPC but health; empty: none.
    std::string auth_token;
    int load_threads = 2;
    int infer_threads = 2;
    // Threads one forward pass may use; 0 keeps LibTorch's default (the number of cores).
    int intra_op_threads = 0;
    // Where sha256 results persist; empty: memory only.
    std::string state_dir;
    // JSON list of LoadModel requests (proto JSON field names) loaded at start.
    std::string preload_file;
    // Load TorchScript archives, which runs their code (see ModelCache::Options).
    bool allow_torchscript = false;
    // A load pool whose every thread has run one load for longer than this is wedged (a load
    // that cannot be interrupted: a TorchScript __setstate__ that spins, a read that never
    // returns): health turns NOT_SERVING until a thread is free again, so a liveness probe can
    // restart the process. Zero disables.
    absl::Duration load_stall_timeout = absl::Minutes(10);
    // HTTP/2 keepalive pings to idle clients; zero disables.
    absl::Duration keepalive_time = absl::Minutes(2);
    absl::Duration keepalive_timeout = absl::Seconds(20);
  };

  // Validates the options, binds the listeners and starts serving. INVALID_ARGUMENT for bad
  // options (naming the flag's value), UNAVAILABLE when an address cannot be bound.
  static absl::StatusOr<std::unique_ptr<Daemon>> Create(Options options);
  ~Daemon();

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }
  // The model roots, resolved to absolute canonical paths.
  const std::vector<std::string>& model_roots() const { return options_.model_roots; }

  // Stops accepting, lets in-flight calls finish until `grace` has passed, then stops the servers
  // and the cache (cancelling loads, waiting for the pools). A load or forward that cannot be
  // interrupted keeps this from returning: metaloadd's main() bounds it (kDrainTimeoutExitCode).
  void Drain(absl::Duration grace);

  // What the drain was still waiting for when its grace ended and again when it stopped the
  // cache: running loads (id, path, seconds) and Infers; empty when nothing was. Thread-safe,
  // for main()'s drain deadline.
  std::string StillRunning() const;

 private:
  explicit Daemon(Options options);

  // Starts the --preload loads; INVALID_ARGUMENT for an unreadable file or a malformed entry.
  absl::Status Preload();
  // The load-stall monitor's loop (see Options::load_stall_timeout); returns on StopMonitor().
  void MonitorLoads();
  void StopMonitor();
  // Records (for StillRunning) and logs as `event` the loads and Infers running now.
  void NoteStillRunning(const char* event);

  Options options_;
  std::unique_ptr<metrics::MetricsServer> metrics_;
  std::unique_ptr<metrics::LoaderMetrics> loader_metrics_;
  std::unique_ptr<core::ChecksumStore> checksums_;
  std::unique_ptr<core::HostArena> arena_;  // outlives the cache, whose models return to it
  std::unique_ptr<PathResolver> resolver_;
  std::unique_ptr<cache::ModelCache> cache_;
  std::unique_ptr<ModelLoaderService> model_loader_;
  std::unique_ptr<ReflectionV1> reflection_v1_;  // null with an auth token
  std::unique_ptr<CallTracker> calls_;           // outlives server_, whose interceptors point at it
  std::unique_ptr<grpc::Server> server_;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
  bool drained_ = false;

  std::thread monitor_;
  std::mutex monitor_mu_;
  std::condition_variable monitor_cv_;
  bool monitor_stop_ = false;  // guarded by monitor_mu_

  mutable std::mutex still_running_mu_;
  std::string still_running_;  // guarded by still_running_mu_
};

// metaloadd's exit status when the drain did not end by --shutdown_grace plus
// kDrainStopSeconds: something (a load in TorchScript code, a forward) could not be
// interrupted; the process exits anyway, logging what was still running (drain_timed_out).
inline constexpr int kDrainTimeoutExitCode = 3;
// After the grace, how long stopping the servers, cancelling loads and freeing models may take.
inline constexpr int kDrainStopSeconds = 5;

}  // namespace metaload::service

#endif  // METALOAD_SERVER_SERVICE_DAEMON_H_
