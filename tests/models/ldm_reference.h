// The Stable Diffusion reference tests' shared steps: write a checkpoint and its cases with an
// independent Python implementation (tests/tools/ref_sd1.py, ref_sd2.py), load it through the
// registry and the real loader, and compare an entry with the Python output. Test code only.
#ifndef METALOAD_TESTS_MODELS_LDM_REFERENCE_H_
#define METALOAD_TESTS_MODELS_LDM_REFERENCE_H_

#include <memory>
#include <string>
#include <vector>

#include "server/core/checkpoint.h"
#include "server/models/registry.h"
#include "tests/test_util.h"

namespace metaload::models {

// tests/tools/`script` DIR/sd `flags...`, run once per script and flags in a test binary's run;
// the directory holding "sd".
const testing::TempDir& LdmReference(const std::string& script,
                                     const std::vector<std::string>& flags);

struct LoadedReference {
  std::unique_ptr<core::CheckpointSource> source;
  std::unique_ptr<Model> model;
  core::LoadReport report;
};

// `path` built by detection and loaded under `dtype` (EffectivePolicy's names); a null model
// after a failure the test has been told of.
// With `vae_path`, the VAE comes from that file (CheckpointSource::Options::overlay_path).
LoadedReference LoadReference(const std::string& path, const std::string& dtype,
                              const ComputeChoice& compute = {}, const std::string& vae_path = "");

// max |got - expected| / max |expected| for case `name` of the reference in `dir`, printed: an
// entry's first output, or "entry@output" for another.
double ReferenceError(const Model& model, const std::string& dir, const std::string& name);

}  // namespace metaload::models

#endif  // METALOAD_TESTS_MODELS_LDM_REFERENCE_H_
