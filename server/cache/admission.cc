#include "server/cache/admission.h"

#include <algorithm>

namespace metaload::cache {
namespace {

// Of the memory free at an admission, the share a following budget may promise (the same
// share the daemon's default budget takes of MemAvailable at start).
constexpr double kAvailableFraction = 0.8;

}  // namespace

Admission Admit(const AdmissionRequest& request) {
  Admission out;
  out.used = request.held + request.reserved;
  if (!request.budget) {
    out.limit = INT64_MAX;
    out.admitted = true;
    return out;
  }
  out.limit = *request.budget;
  if (request.available >= 0) {
    out.limit = std::min(
        out.limit, request.held + static_cast<int64_t>(request.available * kAvailableFraction));
  }
  const std::vector<Resident>& rs = request.residents;
  auto evictable = [](const Resident& r) { return !r.pinned && !r.in_use; };
  int64_t evictable_bytes = 0;
  for (const Resident& r : rs) {
    if (evictable(r)) evictable_bytes += r.bytes;
  }
  if (out.used - evictable_bytes + request.need > out.limit) return out;  // evict nothing

  std::vector<bool> gone(rs.size(), false);
  bool spare_replaced = true;
  while (out.used + request.need > out.limit) {
    std::optional<size_t> victim;
    for (size_t i = 0; i < rs.size(); ++i) {
      if (gone[i] || !evictable(rs[i]) || (rs[i].replaced && spare_replaced)) continue;
      if (!victim || rs[i].last_use < rs[*victim].last_use) victim = i;
    }
    if (!victim) {
      if (!spare_replaced) break;
      spare_replaced = false;
      continue;
    }
    gone[*victim] = true;
    out.evict.push_back(*victim);
    out.used -= rs[*victim].bytes;
  }
  out.admitted = out.used + request.need <= out.limit;
  return out;
}

}  // namespace metaload::cache
