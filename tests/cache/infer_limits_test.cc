// The Infer cost rule (infer_limits.h) on the issue's request: GPT-2 input_ids of 8 MiB.
#include "server/cache/infer_limits.h"

#include <gtest/gtest.h>

#include <limits>

namespace metaload::cache {
namespace {

std::vector<models::EntrySpec> Gpt2Entries() {
  return {{"forward",
           {{"input_ids", core::DType::kInt64, {-1, -1}}},
           {{"logits", std::nullopt, {-1, -1, 50257}}}}};
}

WireTensor Ids(int64_t batch, int64_t tokens) {
  WireTensor t;
  t.name = "input_ids";
  t.datatype = "INT64";
  t.shape = {batch, tokens};
  t.raw_data.assign(static_cast<size_t>(batch * tokens * 8), '\0');
  return t;
}

// Hostile: 8 MiB of token ids (1 Mi tokens) promise 210.8 GB of logits. Before the rule this
// request peaked at 3 GB and computed for 24 s, then failed on the reply's size.
TEST(InferLimitsTest, TheIssuesGpt2RequestIsRefusedFromItsShapes) {
  const std::vector<WireTensor> flood = {Ids(1, 1 << 20)};
  EXPECT_EQ(EstimateReplyBytes(Gpt2Entries(), "", flood), int64_t{1 << 20} * 50257 * 4);
  InferLimits limits;
  limits.max_reply_bytes = 256 << 20;
  absl::Status s = CheckInferAffordable(Gpt2Entries(), "", flood, limits);
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_NE(s.message().find("the reply would take 196.3 GiB"), std::string::npos) << s;
  // The largest that fits 256 MiB: 1335 tokens of 50257 float32 logits.
  EXPECT_TRUE(CheckInferAffordable(Gpt2Entries(), "", {Ids(1, 1335)}, limits).ok());
  EXPECT_TRUE(
      absl::IsResourceExhausted(CheckInferAffordable(Gpt2Entries(), "", {Ids(1, 1336)}, limits)));
  // A batch dimension counts the same way: 2 x 700 tokens do not fit.
  EXPECT_TRUE(
      absl::IsResourceExhausted(CheckInferAffordable(Gpt2Entries(), "", {Ids(2, 700)}, limits)));
}

TEST(InferLimitsTest, ShapesThatOverflowSaturateAndUnknownEntriesAreLeftToRun) {
  std::vector<models::EntrySpec> huge = {
      {"forward",
       {{"x", core::DType::kInt64, {-1}}},
       {{"y", std::nullopt, {-1, int64_t{1} << 40, int64_t{1} << 40}}}}};
  WireTensor x;
  x.name = "x";
  x.datatype = "INT64";
  x.shape = {1};
  x.raw_data.assign(8, '\0');
  InferLimits limits;
  limits.max_reply_bytes = 1 << 20;
  EXPECT_EQ(EstimateReplyBytes(huge, "", {x}), std::numeric_limits<int64_t>::max());
  EXPECT_TRUE(absl::IsResourceExhausted(CheckInferAffordable(huge, "", {x}, limits)));
  EXPECT_EQ(EstimateReplyBytes(huge, "nope", {x}), -1);
  EXPECT_TRUE(CheckInferAffordable(huge, "nope", {x}, limits).ok());  // Run names the entry
}

}  // namespace
}  // namespace metaload::cache
