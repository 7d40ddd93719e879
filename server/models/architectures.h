// The architecture table: the one list of the architectures metaload knows, one row each with
// its name, a one-line description, its variants, how config.json names it, and what `metaload
// synth` writes for it. Every list of names derives from it: the registry's names and error
// messages, the detector's config.json names, synth's --arch values and its messages, the
// CLI's usage text. A new architecture is a new row (see README.md in this folder).
//
// Why the builders are not a column here: the CLI links this table (synth, inspect) and must
// start without LibTorch, while builders are LibTorch code. registry.cc holds the builder of
// each loadable row by name, next to BuildModel; RegistryTest walks every row and fails on a
// loadable row without a builder, a builder without a row, or a row without a synth preset.
//
// The table is built once, on first use, and never changes: safe from any thread. LibTorch-free.
#ifndef METALOAD_SERVER_MODELS_ARCHITECTURES_H_
#define METALOAD_SERVER_MODELS_ARCHITECTURES_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "server/models/synth_presets.h"

namespace metaload::models {

// A name that the row's builder also builds, for a checkpoint the detector tells apart (SD1's
// inpainting UNet); the loaded model's architecture() is the variant's name.
struct ArchitectureVariant {
  std::string name;
  std::string description;
};

struct ArchitectureInfo {
  // What a load request's `architecture` names and Model::architecture() returns.
  std::string name;
  // One line, for usage texts and the guide.
  std::string description;
  std::vector<ArchitectureVariant> variants;
  // False for families that are detected and named but not built yet (sd2, sdxl): a load is
  // FAILED_PRECONDITION "detected NAME; not supported yet", and they appear in no name list.
  bool loadable = true;
  // config.json values that name this row (architecture_detector.cc): any row's model_type
  // first, then the first entry of "architectures" that some row lists.
  std::vector<std::string> config_model_types;
  std::vector<std::string> config_architectures;
  // `metaload synth`: the size presets, smallest first (tests load the first), and the
  // generator. Empty and null where synth writes nothing (TorchScript is a program).
  std::vector<std::string> synth_presets;
  SynthGenerator synth = nullptr;
};

// Every row, in the order usage texts list them.
const std::vector<ArchitectureInfo>& Architectures();

// The row whose name, or one of whose variants, is `name`; nullptr if none.
const ArchitectureInfo* FindArchitecture(absl::string_view name);

// The names and variant names of the loadable rows, sorted: what a load may name.
std::vector<std::string> ArchitectureNames();

// The names and variant names synth writes, in table order: `metaload synth --arch` values.
std::vector<std::string> SynthArchitectureNames();

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_ARCHITECTURES_H_
