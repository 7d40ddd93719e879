#include "server/metrics/metrics_server.h"

#include <prometheus/collectable.h>
#include <prometheus/gauge.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <iterator>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/core/process_memory.h"
#include "server/metrics/http_endpoint.h"

namespace metaload::metrics {

// Reads /proc at scrape time; scraped beside the main registry.
class ProcessCollector : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    absl::StatusOr<core::ProcessMemory> mem = core::ReadProcessMemory();
    if (mem.ok()) {
      out.push_back(Gauge("metaload_process_peak_rss_bytes",
                          "Highest resident set size of the daemon since it started (the "
                          "kernel's VmHWM, kept across the resets each load makes).",
                          static_cast<double>(core::ProcessPeakRssBytes())));
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
  prometheus::BuildGauge()
      .Name("metaload_build_info")
      .Help("Always 1; the version label says which metaload is running.")
      .Register(*server->registry_)
      .Add({{"version", options.version}})
      .Set(1);
  server->collectables_ = {server->registry_, std::make_shared<ProcessCollector>()};
  HttpEndpoint::Options endpoint;
  endpoint.listen = options.listen;
  absl::StatusOr<std::unique_ptr<HttpEndpoint>> started =
      HttpEndpoint::Start(endpoint, [s = server.get()] { return s->Scrape(); });
  if (!started.ok()) {
    return absl::Status(started.status().code(),
                        absl::StrCat("metrics: ", started.status().message()));
  }
  server->endpoint_ = std::move(*started);
  return server;
}

int MetricsServer::port() const { return endpoint_->port(); }

void MetricsServer::AddCollectable(const std::shared_ptr<prometheus::Collectable>& collectable) {
  std::lock_guard<std::mutex> lock(mu_);
  collectables_.push_back(collectable);
}

std::string MetricsServer::Scrape() const {
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables;
  {
    std::lock_guard<std::mutex> lock(mu_);
    collectables = collectables_;
  }
  std::vector<prometheus::MetricFamily> families;
  for (const auto& c : collectables) {
    std::vector<prometheus::MetricFamily> more = c->Collect();
    families.insert(families.end(), std::make_move_iterator(more.begin()),
                    std::make_move_iterator(more.end()));
  }
  return prometheus::TextSerializer().Serialize(families);
}

MetricsServer::~MetricsServer() = default;

}  // namespace metaload::metrics
