#include "server/metrics/loader_metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>

#include <cmath>

namespace metaload::metrics {
namespace {

// ~x2 apart from `start` to `end`.
prometheus::Histogram::BucketBoundaries Doubling(double start, double end) {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = start; v < end * 1.0001; v *= 2) b.push_back(v);
  if (b.back() < end) b.push_back(end);
  return b;
}

const prometheus::Histogram::BucketBoundaries& LoadBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries(Doubling(0.01, 600));
  return *b;
}
const prometheus::Histogram::BucketBoundaries& RpcBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries(Doubling(0.0001, 60));
  return *b;
}

prometheus::MetricFamily GaugeFamily(const std::string& name, const std::string& help) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = prometheus::MetricType::Gauge;
  return f;
}

void AddSample(prometheus::MetricFamily* f, std::vector<prometheus::ClientMetric::Label> labels,
               double value) {
  prometheus::ClientMetric m;
  m.label = std::move(labels);
  m.gauge.value = value;
  f->metric.push_back(std::move(m));
}

}  // namespace

// Reads the cache at scrape time: models by device/state, resident and budget bytes per device,
// the load pool's threads, busy threads, queued loads and the oldest running load.
class CacheCollectable : public prometheus::Collectable {
 public:
  explicit CacheCollectable(const cache::ModelCache* cache) : cache_(cache) {}
  void Detach() {
    std::lock_guard<std::mutex> lock(mu_);
    cache_ = nullptr;
  }
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::lock_guard<std::mutex> lock(mu_);
    if (cache_ == nullptr) return {};
    prometheus::MetricFamily models = GaugeFamily("metaload_models", "Models by device and state.");
    prometheus::MetricFamily resident =
        GaugeFamily("metaload_resident_bytes", "Bytes held by loaded models, per device.");
    prometheus::MetricFamily budget =
        GaugeFamily("metaload_memory_budget_bytes", "Memory budget for models, per device.");
    std::map<std::pair<std::string, std::string>, int> counts;
    for (const cache::ModelInfo& info : cache_->List()) ++counts[{info.device, info.state}];
    for (const auto& [key, n] : counts) {
      AddSample(&models, {{"device", key.first}, {"state", key.second}}, n);
    }
    std::map<std::string, int64_t> bytes = cache_->ResidentBytes();
    for (const auto& [device, limit] : cache_->budgets()) bytes.emplace(device, 0);
    for (const auto& [device, n] : bytes)
      AddSample(&resident, {{"device", device}}, static_cast<double>(n));
    for (const auto& [device, n] : cache_->budgets()) {
      AddSample(&budget, {{"device", device}}, static_cast<double>(n));
    }
    // The load pool, so a wedged one (every thread held by a load that never ends) shows.
    const cache::ModelCache::LoadActivity activity = cache_->Activity();
    prometheus::MetricFamily threads =
        GaugeFamily("metaload_load_threads", "Threads of the load pool (--load_threads).");
    AddSample(&threads, {}, activity.threads);
    prometheus::MetricFamily busy = GaugeFamily(
        "metaload_load_threads_busy", "Load threads running a load now (not queued ones).");
    AddSample(&busy, {}, static_cast<double>(activity.running.size()));
    prometheus::MetricFamily queued =
        GaugeFamily("metaload_loads_queued", "Loads waiting for a load thread.");
    AddSample(&queued, {}, activity.queued);
    prometheus::MetricFamily oldest = GaugeFamily(
        "metaload_oldest_load_seconds",
        "Seconds the longest-running load has been running; 0 when none is. Health turns "
        "NOT_SERVING while every load thread's load is older than --load_stall_timeout.");
    AddSample(&oldest, {}, activity.running.empty() ? 0.0 : activity.running.front().seconds);
    std::vector<prometheus::MetricFamily> out{models, resident, budget, threads,
                                              busy,   queued,   oldest};
    if (std::optional<cache::ModelCache::ArenaFigures> arena = cache_->Arena()) {
      prometheus::MetricFamily kept = GaugeFamily(
          "metaload_arena_bytes",
          "Host memory the arena keeps faulted for the next CPU loads (--host_arena): no "
          "model's, given back after --arena_idle_release or when the budget needs it.");
      AddSample(&kept, {}, static_cast<double>(arena->kept_bytes));
      prometheus::MetricFamily reused = GaugeFamily(
          "metaload_arena_reused_bytes_total",
          "Bytes of CPU load destinations that came from the arena's kept memory, since start.");
      reused.type = prometheus::MetricType::Counter;
      prometheus::ClientMetric m;
      m.counter.value = static_cast<double>(arena->reused_bytes_total);
      reused.metric.push_back(std::move(m));
      out.push_back(std::move(kept));
      out.push_back(std::move(reused));
    }
    return out;
  }

 private:
  mutable std::mutex mu_;
  const cache::ModelCache* cache_;
};

LoaderMetrics::LoaderMetrics(std::shared_ptr<prometheus::Registry> registry)
    : registry_(std::move(registry)) {
  prometheus::Registry& r = *registry_;
  load_duration_ = &prometheus::BuildHistogram()
                        .Name("metaload_load_duration_seconds")
                        .Help("LoadModel wall time from start to READY (or failure), by outcome.")
                        .Register(r);
  phase_duration_ = &prometheus::BuildHistogram()
                         .Name("metaload_load_phase_duration_seconds")
                         .Help("Time spent per load phase: build (meta skeleton), read and place.")
                         .Register(r);
  peak_host_ =
      &prometheus::BuildGauge()
           .Name("metaload_load_peak_host_bytes")
           .Help(
               "Host bytes the model's last load allocated itself (destinations, zero-fills, "
               "staging slots), counted by the loader rather than sampled from the process, so "
               "concurrent loads do not disturb it; excludes page cache and LibTorch scratch. "
               "TorchScript: the bytes the loaded module holds.")
           .Register(r);
  peak_device_ = &prometheus::BuildGauge()
                      .Name("metaload_load_peak_device_bytes")
                      .Help(
                          "Device bytes the model's last load allocated itself "
                          "(destinations, zero-fills, conversion scratch), counted by the "
                          "loader; 0 on cpu.")
                      .Register(r);
  loaded_bytes_ = &prometheus::BuildCounter()
                       .Name("metaload_loaded_bytes_total")
                       .Help("Bytes of model weights placed on each device.")
                       .Register(r);
  cache_requests_ = &prometheus::BuildCounter()
                         .Name("metaload_cache_requests_total")
                         .Help("LoadModel requests by result: hit, miss, coalesced.")
                         .Register(r);
  evictions_ = &prometheus::BuildCounter()
                    .Name("metaload_cache_evictions_total")
                    .Help("Idle models evicted to make room, per device.")
                    .Register(r);
  rpc_duration_ = &prometheus::BuildHistogram()
                       .Name("metaload_rpc_duration_seconds")
                       .Help("gRPC call duration by method and status code.")
                       .Register(r);
  infer_duration_ = &prometheus::BuildHistogram()
                         .Name("metaload_infer_duration_seconds")
                         .Help("Infer forward-pass time per model.")
                         .Register(r);
  for (const char* result : {"hit", "miss", "coalesced"})
    cache_requests_->Add({{"result", result}});
}

LoaderMetrics::~LoaderMetrics() { Detach(); }

std::shared_ptr<prometheus::Collectable> LoaderMetrics::CacheCollector(
    const cache::ModelCache* cache) {
  collector_ = std::make_shared<CacheCollectable>(cache);
  return collector_;
}

void LoaderMetrics::Detach() {
  if (collector_) collector_->Detach();
}

void LoaderMetrics::ObserveRpc(const std::string& method, const std::string& code, double seconds) {
  rpc_duration_->Add({{"method", method}, {"code", code}}, RpcBuckets()).Observe(seconds);
}

void LoaderMetrics::OnCacheRequest(const std::string& result) {
  cache_requests_->Add({{"result", result}}).Increment();
}

void LoaderMetrics::OnLoadFinished(const std::string& model_id, const std::string& architecture,
                                   const std::string& device, const std::string& outcome,
                                   const cache::LoadStats& stats, int64_t loaded_bytes) {
  load_duration_
      ->Add({{"architecture", architecture.empty() ? "unknown" : architecture},
             {"device", device},
             {"outcome", outcome}},
            LoadBuckets())
      .Observe(stats.total_seconds);
  if (outcome != "ok") return;
  phase_duration_->Add({{"phase", "build"}, {"device", device}}, LoadBuckets())
      .Observe(stats.build_seconds);
  phase_duration_->Add({{"phase", "read"}, {"device", device}}, LoadBuckets())
      .Observe(stats.read_seconds);
  phase_duration_->Add({{"phase", "place"}, {"device", device}}, LoadBuckets())
      .Observe(std::max(0.0, stats.total_seconds - stats.build_seconds - stats.read_seconds));
  peak_host_->Add({{"model_id", model_id}}).Set(static_cast<double>(stats.peak_host_bytes));
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto old = peak_device_label_.find(model_id);
    if (old != peak_device_label_.end() && old->second != device) {
      peak_device_->Remove(&peak_device_->Add({{"model_id", model_id}, {"device", old->second}}));
    }
    peak_device_label_[model_id] = device;
  }
  peak_device_->Add({{"model_id", model_id}, {"device", device}})
      .Set(static_cast<double>(stats.peak_device_bytes));
  loaded_bytes_->Add({{"device", device}}).Increment(static_cast<double>(loaded_bytes));
}

void LoaderMetrics::OnEviction(const std::string& device) {
  evictions_->Add({{"device", device}}).Increment();
}

void LoaderMetrics::OnModelRemoved(const std::string& model_id) {
  // Drop the per-model series so label values stay bounded by the models actually loaded.
  peak_host_->Remove(&peak_host_->Add({{"model_id", model_id}}));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = peak_device_label_.find(model_id);
  if (it != peak_device_label_.end()) {
    peak_device_->Remove(&peak_device_->Add({{"model_id", model_id}, {"device", it->second}}));
    peak_device_label_.erase(it);
  }
  infer_duration_->Remove(&infer_duration_->Add({{"model_id", model_id}}, RpcBuckets()));
}

void LoaderMetrics::OnInfer(const std::string& model_id, double seconds) {
  infer_duration_->Add({{"model_id", model_id}}, RpcBuckets()).Observe(seconds);
}

}  // namespace metaload::metrics
