// What an Infer may cost, decided before it computes: without it an 8 MiB GPT-2 request can peak
// at 3 GB and compute for 24 s, only to fail on the reply's size.
//
// The rule, in order, each RESOURCE_EXHAUSTED naming the limit:
//   1. inputs: the sum of the input tensors' bytes is at most `max_input_bytes`;
//   2. batch: every input's first dimension is at most `max_batch`;
//   3. reply: the reply the entry's output specs promise is at most `max_reply_bytes` (the
//      daemon passes --max_message_bytes, beyond which gRPC could not send it anyway). Each
//      output's size comes from its TensorSpec: fixed dimensions as they are, and the k-th
//      "any" (-1) dimension taken from the k-th "any" dimension of the entry's first input
//      spec, as the request's tensor of that name has it (MLP [-1,in] -> [-1,out], GPT-2
//      input_ids [-1,-1] -> logits [-1,-1,vocab]). Elements are priced at the entry's compute
//      dtype (4 bytes where unknown). A dimension with no counterpart counts 1, so the estimate
//      never exceeds a reply that follows the spec (SD's vae_decode, whose image is 8x its
//      latent, is underestimated, never refused wrongly).
// A limit of 0 is no limit. Plain data, no LibTorch: cheap to call on the caller's thread.
#ifndef METALOAD_SERVER_CACHE_INFER_LIMITS_H_
#define METALOAD_SERVER_CACHE_INFER_LIMITS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/cache/wire_tensor.h"
#include "server/models/entry_spec.h"

namespace metaload::cache {

struct InferLimits {
  int64_t max_input_bytes = 0;  // 0: none beyond the gRPC message size
  int64_t max_batch = 0;        // 0: none
  int64_t max_reply_bytes = 0;  // 0: none; the daemon: --max_message_bytes
};

// The bytes the reply of `entry` (of `entries`; "" = the first) is expected to take for
// `inputs`, by the rule above; -1 for an unknown entry (Run names it).
int64_t EstimateReplyBytes(const std::vector<models::EntrySpec>& entries, const std::string& entry,
                           const std::vector<WireTensor>& inputs);

// OK, or RESOURCE_EXHAUSTED naming the limit and the figure (INVALID_ARGUMENT for an input
// CheckWireTensor refuses).
absl::Status CheckInferAffordable(const std::vector<models::EntrySpec>& entries,
                                  const std::string& entry, const std::vector<WireTensor>& inputs,
                                  const InferLimits& limits);

}  // namespace metaload::cache

#endif  // METALOAD_SERVER_CACHE_INFER_LIMITS_H_
