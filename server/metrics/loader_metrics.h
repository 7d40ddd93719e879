// Every metaload_ metric of the API: load latency by architecture/device/outcome and by phase,
// peak host/device bytes of each model's last load, loaded bytes, cache requests, evictions,
// models by device and state, resident and budget bytes, RPC and Infer latency.
//
// Label values stay bounded: model_id labels exist only for loaded models and are removed when
// the model goes; no paths appear in labels. Gauges that describe the cache (models, resident,
// budget) are read from it at scrape time.
//
// Thread-safe. Keeps the registry alive; the cache must outlive scrapes (Detach() before it goes).
#ifndef METALOAD_SERVER_METRICS_LOADER_METRICS_H_
#define METALOAD_SERVER_METRICS_LOADER_METRICS_H_

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "server/cache/model_cache.h"

namespace prometheus {
class Collectable;
class Counter;
class Gauge;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace metaload::metrics {

class LoaderMetrics : public cache::CacheObserver {
 public:
  explicit LoaderMetrics(std::shared_ptr<prometheus::Registry> registry);
  ~LoaderMetrics() override;

  // Scrape-time gauges from `cache` (nullptr: none). Returns the collectable to register.
  std::shared_ptr<prometheus::Collectable> CacheCollector(const cache::ModelCache* cache);
  // Stops reading the cache (before it is destroyed).
  void Detach();

  void ObserveRpc(const std::string& method, const std::string& code, double seconds);

  void OnCacheRequest(const std::string& result) override;
  void OnLoadFinished(const std::string& model_id, const std::string& architecture,
                      const std::string& device, const std::string& outcome,
                      const cache::LoadStats& stats, int64_t loaded_bytes) override;
  void OnEviction(const std::string& device) override;
  void OnModelRemoved(const std::string& model_id) override;
  void OnInfer(const std::string& model_id, double seconds) override;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Histogram>* load_duration_;
  prometheus::Family<prometheus::Histogram>* phase_duration_;
  prometheus::Family<prometheus::Gauge>* peak_host_;
  prometheus::Family<prometheus::Gauge>* peak_device_;
  prometheus::Family<prometheus::Counter>* loaded_bytes_;
  prometheus::Family<prometheus::Counter>* cache_requests_;
  prometheus::Family<prometheus::Counter>* evictions_;
  prometheus::Family<prometheus::Histogram>* rpc_duration_;
  prometheus::Family<prometheus::Histogram>* infer_duration_;

  std::mutex mu_;
  std::map<std::string, std::string> peak_device_label_;  // model_id -> device; guarded by mu_
  std::shared_ptr<class CacheCollectable> collector_;
};

}  // namespace metaload::metrics

#endif  // METALOAD_SERVER_METRICS_LOADER_METRICS_H_
