// A restricted reader of Python pickles, for torch.save checkpoints that may come from anyone.
//
// It runs the pickle program on a small stack machine that never imports or calls anything:
// GLOBAL only records a class name, REDUCE / NEWOBJ / BUILD build inert objects that remember the
// callable's name and its arguments. Two callables are understood because state dicts need
// them: collections.OrderedDict (and builtins.dict) yield real dicts, and torch.Size a tuple.
// Everything else (pytorch_lightning callbacks, numpy scalars, ...) stays an inert placeholder
// that the caller can inspect or skip, like the web UI's safe unpickler, minus its whitelist
// failures: nothing is ever rejected for its class, and nothing is ever executed.
//
// Limits against hostile input: lengths are checked against the remaining bytes before any
// allocation, the memo is a map (a huge memo index costs nothing), and every malformed program
// (unknown opcode, stack underflow, missing MARK, truncation) is DATA_LOSS with the byte offset.
// Depends on nothing but Abseil, so it can be fuzzed. Stateless and thread-safe.
#ifndef METALOAD_SERVER_CORE_PICKLE_READER_H_
#define METALOAD_SERVER_CORE_PICKLE_READER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

struct PickleValue;
// Values are owned by their PickleDocument; references between them may form cycles.
using PickleRef = PickleValue*;

struct PickleValue {
  enum class Kind {
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,      // text holds UTF-8
    kBytes,       // text holds the bytes
    kTuple,       // items
    kList,        // items
    kDict,        // items: key, value, key, value, ...
    kSet,         // items
    kGlobal,      // text: "module.name"
    kObject,      // text: the callable's "module.name"; items: its arguments; state: BUILD state
    kPersistent,  // items[0]: the persistent id (torch.save: a storage tuple)
  };
  Kind kind = Kind::kNone;
  bool boolean = false;
  int64_t integer = 0;
  double real = 0;
  std::string text;
  std::vector<PickleRef> items;
  PickleRef state = nullptr;

  // "None", "int", "str", "dict", "pytorch_lightning.callbacks.ModelCheckpoint", ...
  std::string TypeName() const;
};

// Owns every value of one parsed pickle.
class PickleDocument {
 public:
  const PickleValue& root() const { return *root_; }
  // Allocates a value owned by this document.
  PickleRef New();

 private:
  friend absl::StatusOr<std::unique_ptr<PickleDocument>> ParsePickle(absl::string_view,
                                                                     absl::string_view);
  std::vector<std::unique_ptr<PickleValue>> arena_;
  PickleRef root_ = nullptr;
};

// Parses a whole pickle (ending in STOP). `context` names it in errors.
absl::StatusOr<std::unique_ptr<PickleDocument>> ParsePickle(absl::string_view bytes,
                                                            absl::string_view context);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_PICKLE_READER_H_
