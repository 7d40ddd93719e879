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
// allocation, the memo is a map beyond its dense part (a huge memo index costs nothing), and
// every malformed program (unknown opcode, stack underflow, missing MARK, truncation) is
// DATA_LOSS with the byte offset.
//
// MEMORY MODEL. Values are never copied: the stack, the memo, containers and REDUCE arguments
// hold references to values that live in the document's arena (a 64 KiB block from malloc, then
// mmap'd ones, returned to the kernel when the document goes, or at once when the parse fails).
// None, booleans, the empty tuple and the integers 0..255 are shared constants. Everything the
// arena hands out (values, item runs, text) is charged against a budget of
//     kPickleMemoryPerInputByte x input bytes + kPickleMemoryBaseBytes   (32 x n + 1 MiB);
// a program that needs more is DATA_LOSS ("needs more than N bytes of memory"): a torch.save
// pickle needs about 7.4 x its size (PickleMemoryTest, 1,200 tensors). The machine's stack, marks
// and memo cost at most 16 bytes per input byte beside it, so a parse peaks below
//     48 x input bytes + 2 MiB of RSS
// (PickleMemoryTest asserts that for each hostile shape, and that nothing is left after a failed
// parse). Time is linear in the input plus the bytes charged.
//
// Depends on nothing but Abseil, so it can be fuzzed. Stateless and thread-safe.
#ifndef METALOAD_SERVER_CORE_PICKLE_READER_H_
#define METALOAD_SERVER_CORE_PICKLE_READER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

// The parse's arena budget: kPickleMemoryPerInputByte x input bytes + kPickleMemoryBaseBytes.
inline constexpr size_t kPickleMemoryPerInputByte = 32;
inline constexpr size_t kPickleMemoryBaseBytes = 1 << 20;
// What a whole parse may take, arena and machine: the peak RSS bound PickleMemoryTest asserts.
inline constexpr size_t kPickleRssPerInputByte = kPickleMemoryPerInputByte + 16;
inline constexpr size_t kPickleRssBaseBytes = 2 << 20;

struct PickleValue;
// Values are owned by their PickleDocument; references between them may form cycles.
using PickleRef = PickleValue*;
class PickleMachine;

// A run of references in the document's arena. Copies may share the run (REDUCE's arguments
// are its argument tuple's items); only the parser grows a run, copying a shared one first.
class PickleItems {
 public:
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  PickleRef operator[](size_t i) const { return data_[i]; }
  const PickleRef* begin() const { return data_; }
  const PickleRef* end() const { return data_ + size_; }

 private:
  friend class PickleDocument;
  friend class PickleMachine;
  PickleRef* data_ = nullptr;
  size_t size_ = 0;
  size_t capacity_ = 0;  // 0 with size_ > 0: shared, copy before growing
};

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
  absl::string_view text;  // in the document's arena
  PickleItems items;
  PickleRef state = nullptr;

  // "None", "int", "str", "dict", "pytorch_lightning.callbacks.ModelCheckpoint", ...
  std::string TypeName() const;
};

// Owns every value of one parsed pickle: an arena of blocks (mmap'd but the first), freed on
// destruction.
class PickleDocument {
 public:
  ~PickleDocument();
  PickleDocument(const PickleDocument&) = delete;
  PickleDocument& operator=(const PickleDocument&) = delete;

  const PickleValue& root() const { return *root_; }
  // Bytes the arena handed out (values, item runs, text). The budget is charged the mapped
  // blocks, at most this plus one 1 MiB block and a quarter for block ends.
  size_t arena_bytes() const { return used_; }

 private:
  friend class PickleMachine;
  friend absl::StatusOr<std::unique_ptr<PickleDocument>> ParsePickle(absl::string_view,
                                                                     absl::string_view);
  explicit PickleDocument(size_t budget) : budget_(budget) {}
  // `bytes` (8-aligned) from the arena; nullptr when the budget would be exceeded.
  void* Allocate(size_t bytes);
  // Grows `items` to hold `more` further references (copying a shared run); false past budget.
  bool Reserve(PickleItems* items, size_t more);

  struct Block {
    void* data;
    size_t size;
  };
  std::vector<Block> blocks_;
  char* next_ = nullptr;  // free space in the last small-allocation block
  size_t left_ = 0;
  size_t block_size_ = 64 << 10;  // doubles up to 1 MiB
  size_t mapped_ = 0;
  size_t used_ = 0;
  bool map_failed_ = false;  // out of memory (not of budget)
  const size_t budget_;
  PickleRef root_ = nullptr;
};

// Parses a whole pickle (ending in STOP). `context` names it in errors.
absl::StatusOr<std::unique_ptr<PickleDocument>> ParsePickle(absl::string_view bytes,
                                                            absl::string_view context);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_PICKLE_READER_H_
