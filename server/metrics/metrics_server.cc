#include "server/metrics/metrics_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/core/process_memory.h"

namespace metaload::metrics {

// Reads /proc at scrape time; registered with the exposer beside the main registry.
class ProcessCollector : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    absl::StatusOr<core::ProcessMemory> mem = core::ReadProcessMemory();
    if (mem.ok()) {
      out.push_back(Gauge("metaload_process_peak_rss_bytes",
                          "Highest resident set size of the daemon since it started (VmHWM).",
                          static_cast<double>(mem->peak_rss_bytes)));
      out.push_back(Gauge("metaload_process_resident_bytes",
                          "Current resident set size of the daemon (VmRSS).",
                          static_cast<double>(mem->rss_bytes)));
      out.push_back(Gauge("metaload_process_threads", "Threads of the daemon.",
                          static_cast<double>(mem->threads)));
    }
    int64_t fds = core::CountOpenFds();
    if (fds >= 0) {
      out.push_back(Gauge("metaload_process_open_fds", "Open file descriptors of the daemon.",
                          static_cast<double>(fds)));
    }
    return out;
  }

 private:
  static prometheus::MetricFamily Gauge(std::string name, std::string help, double value) {
    prometheus::MetricFamily family;
    family.name = std::move(name);
    family.help = std::move(help);
    family.type = prometheus::MetricType::Gauge;
    prometheus::ClientMetric metric;
    metric.gauge.value = value;
    family.metric.push_back(std::move(metric));
    return family;
  }
};

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Create(const Options& options) {
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  server->registry_ = std::make_shared<prometheus::Registry>();
  server->process_collector_ = std::make_shared<ProcessCollector>();
  prometheus::BuildGauge()
      .Name("metaload_build_info")
      .Help("Always 1; the version label says which metaload is running.")
      .Register(*server->registry_)
      .Add({{"version", options.version}})
      .Set(1);
  try {
    // civetweb throws when the port cannot be bound.
    server->exposer_ = std::make_unique<prometheus::Exposer>(options.listen, /*num_threads=*/2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot listen on ", options.listen, ": ", e.what()));
  }
  server->exposer_->RegisterCollectable(server->registry_);
  server->exposer_->RegisterCollectable(server->process_collector_);
  std::vector<int> ports = server->exposer_->GetListeningPorts();
  server->port_ = ports.empty() ? 0 : ports.front();
  // Where ~MetricsServer can reach the listener: its own address, or loopback for a wildcard.
  const std::string host = options.listen.substr(0, options.listen.rfind(':'));
  in_addr parsed{};
  server->knock_address_ = host != "0.0.0.0" && ::inet_pton(AF_INET, host.c_str(), &parsed) == 1
                               ? parsed.s_addr
                               : htonl(INADDR_LOOPBACK);
  return server;
}

void MetricsServer::AddCollectable(const std::shared_ptr<prometheus::Collectable>& collectable) {
  exposer_->RegisterCollectable(collectable);
}

MetricsServer::~MetricsServer() {
  // Stop serving before the collectables it reads go away. civetweb's listener notices its stop
  // flag only when its poll() returns, which without traffic takes up to two seconds: knock on
  // our own port until it has stopped, so the daemon exits within its shutdown grace.
  std::atomic<bool> stopped{false};
  std::thread knocker([this, &stopped] {
    while (!stopped.load()) {
      int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (fd >= 0) {
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_port = htons(static_cast<uint16_t>(port_));
        addr.sin_addr.s_addr = knock_address_;
        (void)::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
        ::close(fd);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  exposer_.reset();
  stopped.store(true);
  knocker.join();
}

}  // namespace metaload::metrics
