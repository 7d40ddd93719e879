#include "server/metrics/metrics_server.h"

#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>

#include <exception>
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
  return server;
}

void MetricsServer::AddCollectable(const std::shared_ptr<prometheus::Collectable>& collectable) {
  exposer_->RegisterCollectable(collectable);
}

MetricsServer::~MetricsServer() {
  // Stop serving before the collectables it reads go away.
  exposer_.reset();
}

}  // namespace metaload::metrics
