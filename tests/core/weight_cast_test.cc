// Casts to the compute dtype reuse released buffers, never one that is still viewed.
#include "server/core/weight_cast.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

namespace metaload::core {
namespace {

// 8 MiB as float32: above kMinPooledBytes.
at::Tensor BigHalf() { return at::randn({2048, 1024}).to(at::kHalf); }

TEST(WeightCastTest, GivesTheValuesOfTo) {
  at::Tensor w = BigHalf();
  at::Tensor cast = CastWeight(w, at::kFloat);
  EXPECT_EQ(cast.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(cast, w.to(at::kFloat)));
  at::Tensor t = w.t();  // not contiguous
  EXPECT_TRUE(at::equal(CastWeight(t, at::kFloat), t.to(at::kFloat)));
  at::Tensor small = at::randn({4, 4}).to(at::kBFloat16);
  EXPECT_TRUE(at::equal(CastWeight(small, at::kFloat), small.to(at::kFloat)));
}

TEST(WeightCastTest, ReusesOnlyReleasedBuffers) {
  at::Tensor w = BigHalf();
  const void* first_data = nullptr;
  {
    at::Tensor first = CastWeight(w, at::kFloat);
    first_data = first.data_ptr();
    // While `first` is alive, another cast must not get its memory.
    at::Tensor second = CastWeight(w * 2, at::kFloat);
    EXPECT_NE(second.data_ptr(), first_data);
    EXPECT_TRUE(at::equal(first, w.to(at::kFloat)));  // not overwritten by the second cast
  }
  const WeightCastPoolStats before = GetWeightCastPoolStats();
  EXPECT_GE(before.idle_bytes, 2 * 2048 * 1024 * 4);
  at::Tensor again = CastWeight(w, at::kFloat);
  const WeightCastPoolStats after = GetWeightCastPoolStats();
  EXPECT_EQ(after.reused_total, before.reused_total + 1);
  EXPECT_EQ(after.idle_bytes, before.idle_bytes - 2048 * 1024 * 4);
  EXPECT_TRUE(at::equal(again, w.to(at::kFloat)));
  // A view keeps the buffer: releasing `again` but not its slice returns nothing yet.
  at::Tensor row = again[7];
  again = at::Tensor();
  EXPECT_EQ(GetWeightCastPoolStats().idle_bytes, after.idle_bytes);
  EXPECT_TRUE(at::equal(row, w[7].to(at::kFloat)));
}

TEST(WeightCastTest, IdleBuffersStayBounded) {
  std::vector<at::Tensor> casts;
  at::Tensor w = at::zeros({16, 1 << 20}, at::kHalf);  // 64 MiB as float32
  for (int i = 0; i < 6; ++i) casts.push_back(CastWeight(w, at::kFloat));
  casts.clear();  // 384 MiB released at once: only kMaxIdleBytes stay
  EXPECT_LE(GetWeightCastPoolStats().idle_bytes, kMaxIdleBytes);
  EXPECT_GE(GetWeightCastPoolStats().idle_bytes, kMaxIdleBytes - (int64_t{64} << 20));
}

}  // namespace
}  // namespace metaload::core
