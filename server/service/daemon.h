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

#include <map>
#include <memory>
#include <string>
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
}  // namespace metaload::core

namespace metaload::service {

class CallTracker;
class ModelLoaderService;
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

  // Stops accepting, lets in-flight calls finish until `grace` has passed, then stops the servers.
  void Drain(absl::Duration grace);

 private:
  explicit Daemon(Options options);

  // Starts the --preload loads; INVALID_ARGUMENT for an unreadable file or a malformed entry.
  absl::Status Preload();

  Options options_;
  std::unique_ptr<metrics::MetricsServer> metrics_;
  std::unique_ptr<metrics::LoaderMetrics> loader_metrics_;
  std::unique_ptr<core::ChecksumStore> checksums_;
  std::unique_ptr<PathResolver> resolver_;
  std::unique_ptr<cache::ModelCache> cache_;
  std::unique_ptr<ModelLoaderService> model_loader_;
  std::unique_ptr<CallTracker> calls_;  // outlives server_, whose interceptors point at it
  std::unique_ptr<grpc::Server> server_;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
  bool drained_ = false;
};

}  // namespace metaload::service

#endif  // METALOAD_SERVER_SERVICE_DAEMON_H_
