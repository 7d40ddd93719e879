#include "server/core/weight_cast.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

#include "server/core/float8_convert.h"

namespace metaload::core {
namespace {

class Pool {
 public:
  // Never destroyed: a tensor released during exit still gives its buffer back.
  static Pool& Get() {
    static Pool* pool = new Pool();
    return *pool;
  }

  // A buffer of at least `bytes`, at most twice that (so a small cast never pins a big buffer).
  void* Take(int64_t bytes, int64_t* capacity) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = idle_.lower_bound(bytes);
      if (it != idle_.end() && it->first < 2 * bytes) {
        *capacity = it->first;
        void* data = it->second;
        idle_.erase(it);
        stats_.idle_bytes -= *capacity;
        ++stats_.reused_total;
        return data;
      }
      ++stats_.allocated_total;
    }
    *capacity = (bytes + 63) / 64 * 64;
    void* data = std::aligned_alloc(64, static_cast<size_t>(*capacity));
    if (data == nullptr) throw std::bad_alloc();
    return data;
  }

  void Give(void* data, int64_t capacity) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stats_.idle_bytes + capacity <= kMaxIdleBytes) {
        idle_.emplace(capacity, data);
        stats_.idle_bytes += capacity;
        return;
      }
    }
    std::free(data);
  }

  WeightCastPoolStats Stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

 private:
  std::mutex mu_;                       // guards idle_ and stats_
  std::multimap<int64_t, void*> idle_;  // capacity -> buffer no tensor views
  WeightCastPoolStats stats_;           // stats_.idle_bytes == sum of idle_'s capacities
};

// A CPU tensor of `sizes` and `dtype` in a pooled buffer.
at::Tensor PooledTensor(at::IntArrayRef sizes, at::ScalarType dtype, int64_t bytes) {
  int64_t capacity = 0;
  void* data = Pool::Get().Take(bytes, &capacity);
  return at::from_blob(
      data, sizes, [capacity](void* p) { Pool::Get().Give(p, capacity); },
      at::TensorOptions().dtype(dtype));
}

}  // namespace

at::Tensor CastWeight(const at::Tensor& stored, at::ScalarType dtype) {
  const int64_t bytes = stored.numel() * static_cast<int64_t>(c10::elementSize(dtype));
  if (!stored.device().is_cpu() || bytes < kMinPooledBytes) return stored.to(dtype);
  at::Tensor cast = PooledTensor(stored.sizes(), dtype, bytes);
  cast.copy_(stored);
  return cast;
}

at::Tensor DecodeWeight(const at::Tensor& stored, DType format, at::ScalarType dtype) {
  const int64_t bytes = stored.numel() * static_cast<int64_t>(c10::elementSize(dtype));
  at::Tensor decoded = stored.device().is_cpu() && bytes >= kMinPooledBytes
                           ? PooledTensor(stored.sizes(), dtype, bytes)
                           : at::empty(stored.sizes(), stored.options().dtype(dtype));
  DecodeFloat8(stored, format, decoded);
  return decoded;
}

WeightCastPoolStats GetWeightCastPoolStats() { return Pool::Get().Stats(); }

}  // namespace metaload::core
