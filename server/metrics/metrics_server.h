// The Prometheus side of the daemon: one prometheus::Registry for every metaload_ metric, and the
// HTTP endpoint (http_endpoint.h) that serves it at /metrics. Process figures (peak RSS, RSS,
// threads, open fds) are read from /proc at scrape time, so they are exact whenever Prometheus
// looks.
//
// Owns the endpoint's listening socket and thread; destroying it stops serving.
// Thread-safe: metric families may be created and updated from any thread.
#ifndef METALOAD_SERVER_METRICS_METRICS_SERVER_H_
#define METALOAD_SERVER_METRICS_METRICS_SERVER_H_

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace prometheus {
class Collectable;
class Registry;
}  // namespace prometheus

namespace metaload::metrics {

class HttpEndpoint;

class MetricsServer {
 public:
  struct Options {
    // host:port for the HTTP endpoint; port 0 picks a free one (see port()).
    std::string listen = "127.0.0.1:9464";
    // Version string exported as metaload_build_info{version}.
    std::string version = "dev";
  };

  // Starts serving. UNAVAILABLE when the address cannot be bound, naming it.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Create(const Options& options);
  ~MetricsServer();

  // The bound port (the real one when Options::listen asked for port 0).
  int port() const;
  // The registry every metaload_ family is created in.
  prometheus::Registry& registry() { return *registry_; }
  std::shared_ptr<prometheus::Registry> shared_registry() { return registry_; }
  // Adds a collector read at scrape time (it must stay valid while this server lives).
  void AddCollectable(const std::shared_ptr<prometheus::Collectable>& collectable);

 private:
  MetricsServer() = default;
  // Every collectable's families in the text exposition format.
  std::string Scrape() const;

  std::shared_ptr<prometheus::Registry> registry_;
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables_;  // guarded by mu_
  std::unique_ptr<HttpEndpoint> endpoint_;  // last: stops before the collectables go
};

}  // namespace metaload::metrics

#endif  // METALOAD_SERVER_METRICS_METRICS_SERVER_H_
