// Admission's rules, one row each (admission.h states them).
#include "server/cache/admission.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace metaload::cache {
namespace {

Resident Idle(int64_t bytes, uint64_t last_use) { return {bytes, last_use}; }
Resident Pinned(int64_t bytes, uint64_t last_use) { return {bytes, last_use, /*pinned=*/true}; }
Resident InUse(int64_t bytes, uint64_t last_use) {
  return {bytes, last_use, false, /*in_use=*/true};
}
Resident Replaced(int64_t bytes, uint64_t last_use) {
  return {bytes, last_use, false, false, /*replaced=*/true};
}

struct Row {
  std::string rule;
  AdmissionRequest request;
  bool admitted;
  std::vector<size_t> evict;
  int64_t limit;
};

// held = the sum of the residents' bytes unless a row says otherwise (an unloaded model an
// Infer still holds is held but not a resident).
AdmissionRequest Request(int64_t need, std::optional<int64_t> budget, std::vector<Resident> rs,
                         int64_t reserved = 0, int64_t available = -1, int64_t extra_held = 0) {
  AdmissionRequest r;
  r.need = need;
  r.budget = budget;
  r.available = available;
  r.reserved = reserved;
  r.residents = std::move(rs);
  r.held = extra_held;
  for (const Resident& x : r.residents) r.held += x.bytes;
  return r;
}

std::vector<Row> Rows() {
  return {
      {"no budget: admitted, nothing evicted",
       Request(1 << 30, std::nullopt, {Idle(10, 1)}),
       true,
       {},
       INT64_MAX},
      {"fits as is", Request(40, 100, {Idle(50, 1)}), true, {}, 100},
      {"exactly the budget fits", Request(50, 100, {Idle(50, 1)}), true, {}, 100},
      {"least recently used goes first",
       Request(40, 100, {Idle(30, 5), Idle(30, 2), Idle(30, 9)}),
       true,
       {1},
       100},
      {"as many as needed, oldest first",
       Request(80, 100, {Idle(30, 5), Idle(30, 2), Idle(30, 9)}),
       true,
       {1, 0, 2},
       100},
      {"pinned models are skipped",
       Request(40, 100, {Pinned(30, 1), Idle(30, 5), Idle(30, 9)}),
       true,
       {1},
       100},
      {"models in use are skipped",
       Request(40, 100, {InUse(30, 1), Idle(30, 5), Idle(30, 9)}),
       true,
       {1},
       100},
      {"the replaced model is spared while others fit",
       Request(40, 100, {Replaced(30, 1), Idle(30, 5), Idle(30, 9)}),
       true,
       {1},
       100},
      {"the replaced model goes when nothing else fits",
       Request(60, 100, {Replaced(50, 1), Idle(30, 5)}),
       true,
       {1, 0},
       100},
      {"would not fit with everything evictable gone: nothing evicted",
       Request(80, 100, {Pinned(30, 1), Idle(30, 2)}),
       false,
       {},
       100},
      {"in-use bytes count against the fit",
       Request(80, 100, {InUse(30, 1), Idle(30, 2)}),
       false,
       {},
       100},
      {"reservations of loads in flight count",
       Request(40, 100, {Idle(30, 1)}, /*reserved=*/50),
       true,
       {0},
       100},
      {"reservations alone can refuse", Request(60, 100, {}, /*reserved=*/50), false, {}, 100},
      {"an unloaded model an Infer holds counts but cannot be evicted",
       Request(60, 100, {Idle(30, 1)}, 0, -1, /*extra_held=*/50),
       false,
       {},
       100},
      {"a following budget is capped by what is free now",
       Request(50, 1000, {Idle(100, 1)}, 0, /*available=*/50),
       true,
       {0},
       100 + 40},
      {"a following budget never exceeds the configured one",
       Request(50, 120, {Idle(100, 1)}, 0, /*available=*/1000),
       true,
       {0},
       120},
      {"a need over the whole budget is refused", Request(101, 100, {}), false, {}, 100},
      {"a shared model (one resident) frees its bytes once",
       Request(60, 100, {Idle(60, 1)}),
       true,
       {0},
       100},
  };
}

TEST(AdmissionTest, EveryRule) {
  for (const Row& row : Rows()) {
    SCOPED_TRACE(row.rule);
    const Admission a = Admit(row.request);
    EXPECT_EQ(a.admitted, row.admitted);
    EXPECT_EQ(a.evict, row.evict);
    EXPECT_EQ(a.limit, row.limit);
    int64_t freed = 0;
    for (size_t i : a.evict) freed += row.request.residents[i].bytes;
    EXPECT_EQ(a.used, row.request.held + row.request.reserved - freed);
    if (a.admitted) {
      EXPECT_LE(a.used + row.request.need, a.limit);
    }
  }
}

}  // namespace
}  // namespace metaload::cache
