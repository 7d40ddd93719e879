// Byte sizes as people write them ("8GiB", "512MiB", "1.5G", "1000000") and the daemon's
// --memory_budget value ("cpu=8GiB,cuda:0=70GiB"). LibTorch-free; stateless.
#ifndef METALOAD_SERVER_CORE_BYTE_SIZE_H_
#define METALOAD_SERVER_CORE_BYTE_SIZE_H_

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

// Suffixes: B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB (K, M, G, T are binary, like KiB...;
// KB, MB, GB, TB are decimal). INVALID_ARGUMENT otherwise.
absl::StatusOr<int64_t> ParseByteSize(absl::string_view text);

// "device=size,device=size"; devices "cpu", "cuda:N" ("cuda" means "cuda:0").
absl::StatusOr<std::map<std::string, int64_t>> ParseMemoryBudgets(absl::string_view text);

// MemAvailable from /proc/meminfo, or -1.
int64_t MemAvailableBytes();

// "1.3 GiB", for messages.
std::string HumanBytes(int64_t bytes);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_BYTE_SIZE_H_
