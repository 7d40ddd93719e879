#include "server/cache/infer_limits.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "server/core/byte_size.h"

namespace metaload::cache {
namespace {

constexpr int64_t kSaturated = std::numeric_limits<int64_t>::max();

int64_t SaturatingMul(int64_t a, int64_t b) {
  if (a == 0 || b == 0) return 0;
  if (a > kSaturated / b) return kSaturated;
  return a * b;
}

}  // namespace

int64_t EstimateReplyBytes(const std::vector<models::EntrySpec>& entries, const std::string& entry,
                           const std::vector<WireTensor>& inputs) {
  const models::EntrySpec* spec = nullptr;
  if (entry.empty() && !entries.empty()) spec = &entries.front();
  for (const models::EntrySpec& e : entries) {
    if (e.name == entry) spec = &e;
  }
  if (spec == nullptr) return -1;
  // The request's sizes of the first input spec's "any" dimensions, in order.
  std::vector<int64_t> any;
  if (!spec->inputs.empty()) {
    const models::TensorSpec& first = spec->inputs.front();
    for (const WireTensor& w : inputs) {
      if (w.name != first.name || w.shape.size() != first.shape.size()) continue;
      for (size_t d = 0; d < first.shape.size(); ++d) {
        if (first.shape[d] == -1) any.push_back(w.shape[d]);
      }
      break;
    }
  }
  const int element = spec->compute_dtype ? core::DTypeSize(*spec->compute_dtype) : 4;
  int64_t total = 0;
  for (const models::TensorSpec& out : spec->outputs) {
    const int64_t bytes = out.dtype ? core::DTypeSize(*out.dtype) : static_cast<int64_t>(element);
    int64_t n = bytes;
    size_t k = 0;
    for (int64_t d : out.shape) {
      const int64_t size = d >= 0 ? d : (k < any.size() ? any[k] : 1);
      if (d < 0) ++k;
      n = SaturatingMul(n, std::max<int64_t>(size, 0));
    }
    total = total > kSaturated - n ? kSaturated : total + n;
  }
  return total;
}

absl::Status CheckInferAffordable(const std::vector<models::EntrySpec>& entries,
                                  const std::string& entry, const std::vector<WireTensor>& inputs,
                                  const InferLimits& limits) {
  int64_t input_bytes = 0;
  for (const WireTensor& w : inputs) {
    absl::StatusOr<WireLayout> layout = CheckWireTensor(w);
    if (!layout.ok()) return layout.status();
    input_bytes += layout->nbytes;  // each under kMaxWireTensorBytes: no overflow
    if (limits.max_batch > 0 && !w.shape.empty() && w.shape[0] > limits.max_batch) {
      return absl::ResourceExhaustedError(absl::StrCat("input '", w.name, "': a batch of ",
                                                       w.shape[0], "; at most ", limits.max_batch,
                                                       " per Infer (--max_infer_batch)"));
    }
  }
  if (limits.max_input_bytes > 0 && input_bytes > limits.max_input_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "inputs of ", core::HumanBytes(input_bytes), "; at most ",
        core::HumanBytes(limits.max_input_bytes), " per Infer (--max_infer_input_bytes)"));
  }
  if (limits.max_reply_bytes > 0) {
    const int64_t reply = EstimateReplyBytes(entries, entry, inputs);
    if (reply > limits.max_reply_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the reply would take ",
          reply == kSaturated ? "more than 2^63 bytes" : core::HumanBytes(reply),
          " (from the entry's output shapes); at most ", core::HumanBytes(limits.max_reply_bytes),
          " (--max_message_bytes): refused before computing"));
    }
  }
  return absl::OkStatus();
}

}  // namespace metaload::cache
