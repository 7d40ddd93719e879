// The single-flight key of a load: what makes two load requests the same load (and a loaded
// model a cache hit): the resolved path, the identity of every file of the checkpoint, the
// architecture, the device, the requested dtypes, compute dtypes, zero_copy,
// allow_missing_keys, the requested prediction and the VAE file's path and identity. Also the
// bounded form of a policy's description ModelInfo carries. Internal to server/cache; stateless.
#ifndef METALOAD_SERVER_CACHE_LOAD_KEY_H_
#define METALOAD_SERVER_CACHE_LOAD_KEY_H_

#include <sys/stat.h>

#include <optional>
#include <string>

#include "server/cache/model_cache.h"
#include "server/core/dtype_policy.h"

namespace metaload::cache {

// `spec` as parsed: `device` canonical ("cuda:0", not "cuda"), `requested` from
// core::DtypePolicy::FromRequest (nullopt: the architecture's default, a different model from
// "keep"), `st` the stat of spec.path.
std::string LoadKey(const LoadSpec& spec, const std::string& device,
                    const std::optional<core::DtypePolicy>& requested, const struct stat& st);

// `described` cut to at most 1 KiB at an override's end, saying how many are left out: one
// caller's model must not make ListModels too large for everyone (three loads of 100,000
// overrides once did).
std::string BoundedDtype(std::string described);

}  // namespace metaload::cache

#endif  // METALOAD_SERVER_CACHE_LOAD_KEY_H_
