#include "server/core/pickle_reader.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <new>
#include <type_traits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace metaload::core {

using Kind = PickleValue::Kind;

// The arena frees nothing value by value.
static_assert(std::is_trivially_destructible_v<PickleValue>);

namespace {

// Immutable values every document shares: nothing ever adds items to them or builds them (only
// lists, dicts, sets and objects take either), so a NONE flood costs a stack slot per byte.
struct Constants {
  PickleValue none, yes, no, empty_tuple;
  PickleValue small[256];  // the integers 0..255 (BININT1)
  Constants() {
    yes.kind = no.kind = Kind::kBool;
    yes.boolean = true;
    empty_tuple.kind = Kind::kTuple;
    for (int i = 0; i < 256; ++i) {
      small[i].kind = Kind::kInt;
      small[i].integer = i;
    }
  }
};
Constants& Shared() {
  static Constants* constants = new Constants();  // never destroyed: documents may outlive main
  return *constants;
}

constexpr size_t kMaxBlockBytes = 1 << 20;

// Memory for the arena and the machine's stacks. A small parse (most of them; every fuzzing run)
// gets its first 32-64 KiB from malloc; everything after comes from mmap, not malloc: the
// kernel gets every page back when the parse ends, whatever else the allocator holds (20 MiB of
// small values freed into malloc's bins once stayed resident after a failed parse).
constexpr size_t kFromMallocBelow = 128 << 10;
void* GetBlock(size_t size) {
  if (size < kFromMallocBelow) return std::malloc(size);
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}
void PutBlock(void* p, size_t size) {
  if (size < kFromMallocBelow) {
    std::free(p);
  } else {
    ::munmap(p, size);
  }
}

// A stack of T in chunks: a first one of 32 KiB, then 512 KiB ones (see GetBlock). It grows a
// chunk at a time (a vector's reallocation holds 3x its size for a moment). When no memory is
// left, push_back drops the value and failed() says so.
template <typename T>
class ChunkedStack {
 public:
  static_assert(std::is_trivially_copyable_v<T>);
  static constexpr size_t kFirst = (32 << 10) / sizeof(T);
  static constexpr size_t kChunk = (512 << 10) / sizeof(T);

  ChunkedStack() = default;
  ChunkedStack(const ChunkedStack&) = delete;
  ChunkedStack& operator=(const ChunkedStack&) = delete;
  ~ChunkedStack() {
    if (first_ != nullptr) PutBlock(first_, kFirst * sizeof(T));
    for (T* chunk : chunks_) PutBlock(chunk, kChunk * sizeof(T));
  }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  bool failed() const { return failed_; }
  T& operator[](size_t i) {
    return i < kFirst ? first_[i] : chunks_[(i - kFirst) / kChunk][(i - kFirst) % kChunk];
  }
  const T& operator[](size_t i) const { return const_cast<ChunkedStack*>(this)->operator[](i); }
  T& back() { return (*this)[size_ - 1]; }
  const T& back() const { return (*this)[size_ - 1]; }
  void push_back(T value) {
    if (size_ == capacity_) {
      const size_t bytes = first_ == nullptr ? kFirst * sizeof(T) : kChunk * sizeof(T);
      T* chunk = static_cast<T*>(GetBlock(bytes));
      if (chunk == nullptr) {
        failed_ = true;
        return;
      }
      if (first_ == nullptr) {
        first_ = chunk;
        capacity_ = kFirst;
      } else {
        chunks_.push_back(chunk);
        capacity_ += kChunk;
      }
    }
    (*this)[size_++] = value;
  }
  void pop_back() { --size_; }
  // Only shrinks; the chunks stay for the rest of the parse.
  void shrink(size_t n) { size_ = n; }

 private:
  T* first_ = nullptr;
  std::vector<T*> chunks_;
  size_t size_ = 0;
  size_t capacity_ = 0;
  bool failed_ = false;
};

}  // namespace

// Runs one pickle program into a document.
class PickleMachine {
 public:
  PickleMachine(absl::string_view bytes, absl::string_view context, PickleDocument* doc)
      : bytes_(bytes), context_(context), doc_(doc) {}

  absl::StatusOr<PickleRef> Run() {
    while (true) {
      if (pos_ >= bytes_.size()) return Error("ends without STOP");
      op_at_ = pos_;
      const unsigned char op = static_cast<unsigned char>(bytes_[pos_++]);
      absl::Status s = Step(op);
      if (!s.ok()) return s;
      if (stack_.failed() || marks_.failed() || memo_dense_.failed()) {
        return absl::ResourceExhaustedError(
            absl::StrCat(context_, ": pickle: out of memory (opcode at byte ", op_at_, ")"));
      }
      if (stopped_) {
        if (stack_.size() != 1 || !marks_.empty()) return Error("STOP with a malformed stack");
        return stack_.back();
      }
    }
  }

 private:
  // A new value in the arena; nullptr past the budget (then return OverBudget()).
  PickleRef Make(Kind kind) {
    void* memory = doc_->Allocate(sizeof(PickleValue));
    if (memory == nullptr) return nullptr;
    PickleRef v = new (memory) PickleValue();
    v->kind = kind;
    return v;
  }
  // `parts` joined, copied into the arena; false past the budget.
  bool CopyText(std::initializer_list<absl::string_view> parts, absl::string_view* out) {
    size_t n = 0;
    for (absl::string_view p : parts) n += p.size();
    if (n == 0) {
      *out = absl::string_view();
      return true;
    }
    char* memory = static_cast<char*>(doc_->Allocate(n));
    if (memory == nullptr) return false;
    char* at = memory;
    for (absl::string_view p : parts) {
      if (!p.empty()) std::memcpy(at, p.data(), p.size());
      at += p.size();
    }
    *out = absl::string_view(memory, n);
    return true;
  }
  absl::Status PushText(Kind kind, std::initializer_list<absl::string_view> parts) {
    PickleRef v = Make(kind);
    if (v == nullptr || !CopyText(parts, &v->text)) return OverBudget();
    stack_.push_back(v);
    return absl::OkStatus();
  }

  absl::Status Error(absl::string_view what) const {
    return absl::DataLossError(
        absl::StrCat(context_, ": pickle: ", what, " (opcode at byte ", op_at_, ")"));
  }
  absl::Status OverBudget() const {
    if (doc_->map_failed_) {
      return absl::ResourceExhaustedError(
          absl::StrCat(context_, ": pickle: out of memory (opcode at byte ", op_at_, ")"));
    }
    return Error(absl::StrCat("a program of ", bytes_.size(), " bytes that needs more than ",
                              doc_->budget_, " bytes of memory (", kPickleMemoryPerInputByte,
                              " x its size + ", kPickleMemoryBaseBytes >> 20,
                              " MiB) is not a checkpoint"));
  }

  bool Take(uint64_t n, absl::string_view* out) {
    if (n > bytes_.size() - pos_) return false;
    *out = bytes_.substr(pos_, n);
    pos_ += n;
    return true;
  }
  bool TakeLe(int n, uint64_t* out) {
    absl::string_view b;
    if (!Take(static_cast<uint64_t>(n), &b)) return false;
    *out = 0;
    for (int i = n - 1; i >= 0; --i) *out = (*out << 8) | static_cast<unsigned char>(b[i]);
    return true;
  }
  bool TakeLine(absl::string_view* out) {
    size_t end = bytes_.find('\n', pos_);
    if (end == absl::string_view::npos) return false;
    *out = bytes_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return true;
  }

  // The stack above the last MARK is all a program may pop.
  bool CanPop(size_t n) const {
    const size_t floor = marks_.empty() ? 0 : marks_.back();
    return stack_.size() >= floor + n;
  }
  absl::Status Pop(PickleRef* out) {
    if (!CanPop(1)) return Error("stack underflow");
    *out = stack_.back();
    stack_.pop_back();
    return absl::OkStatus();
  }
  absl::Status Top(PickleRef* out) {
    if (!CanPop(1)) return Error("stack underflow");
    *out = stack_.back();
    return absl::OkStatus();
  }
  // Removes the last MARK; `*mark` is where it stood.
  absl::Status PopMark(size_t* mark) {
    if (marks_.empty()) return Error("missing MARK");
    *mark = marks_.back();
    marks_.pop_back();
    return absl::OkStatus();
  }
  // Appends the stack from `mark` on to `items`, and drops it from the stack.
  absl::Status MoveFromStack(size_t mark, PickleItems* items) {
    const size_t n = stack_.size() - mark;
    if (!doc_->Reserve(items, n)) return OverBudget();
    for (size_t i = mark; i < stack_.size(); ++i) items->data_[items->size_++] = stack_[i];
    stack_.shrink(mark);
    return absl::OkStatus();
  }
  // TUPLE / LIST / DICT / FROZENSET: everything above the MARK becomes one new value.
  absl::Status Collect(Kind kind) {
    size_t mark = 0;
    absl::Status s = PopMark(&mark);
    if (!s.ok()) return s;
    if (kind == Kind::kDict && (stack_.size() - mark) % 2 != 0) {
      return Error("DICT with an odd number of values");
    }
    PickleRef v = Make(kind);
    if (v == nullptr) return OverBudget();
    s = MoveFromStack(mark, &v->items);
    if (!s.ok()) return s;
    stack_.push_back(v);
    return absl::OkStatus();
  }

  absl::Status PushString(Kind kind, int len_bytes) {
    uint64_t n = 0;
    absl::string_view s;
    if (!TakeLe(len_bytes, &n) || !Take(n, &s)) return Error("string runs past the end");
    return PushText(kind, {s});
  }

  absl::Status PushInt(int64_t v) {
    if (v >= 0 && v < 256) {
      stack_.push_back(&Shared().small[v]);
      return absl::OkStatus();
    }
    PickleRef r = Make(Kind::kInt);
    if (r == nullptr) return OverBudget();
    r->integer = v;
    stack_.push_back(r);
    return absl::OkStatus();
  }

  absl::Status Memoize(uint64_t index) {
    PickleRef top = nullptr;
    absl::Status s = Top(&top);
    if (!s.ok()) return s;
    if (index < memo_dense_.size()) {
      memo_dense_[index] = top;
    } else if (index == memo_dense_.size()) {
      memo_dense_.push_back(top);
      memo_sparse_.erase(index);
    } else {
      memo_sparse_[index] = top;
    }
    return absl::OkStatus();
  }
  absl::Status Recall(uint64_t index) {
    if (index < memo_dense_.size()) {
      stack_.push_back(memo_dense_[index]);
      return absl::OkStatus();
    }
    auto it = memo_sparse_.find(index);
    if (it == memo_sparse_.end()) {
      return Error(absl::StrCat("memo entry ", index, " was never stored"));
    }
    stack_.push_back(it->second);
    return absl::OkStatus();
  }

  static bool TakesItems(const PickleValue& target) {
    return target.kind == Kind::kList || target.kind == Kind::kDict || target.kind == Kind::kSet ||
           target.kind == Kind::kObject;
  }
  // APPEND / SETITEM: the top `count` values go to the list/set/dict/object below them.
  absl::Status AddTop(size_t count) {
    if (!CanPop(count + 1)) return Error("stack underflow");
    PickleRef target = stack_[stack_.size() - count - 1];
    if (!TakesItems(*target)) {
      return Error(absl::StrCat("cannot add items to a ", target->TypeName()));
    }
    return MoveFromStack(stack_.size() - count, &target->items);
  }
  // APPENDS / ADDITEMS / SETITEMS: everything above the MARK goes to the value below it.
  absl::Status AddMarked(bool pairs) {
    size_t mark = 0;
    absl::Status s = PopMark(&mark);
    if (!s.ok()) return s;
    if (!CanPop(stack_.size() - mark + 1)) return Error("stack underflow");
    PickleRef target = stack_[mark - 1];
    if (pairs && (stack_.size() - mark) % 2 != 0) {
      return Error("SETITEMS with an odd number of values");
    }
    if (!TakesItems(*target)) {
      return Error(absl::StrCat("cannot add items to a ", target->TypeName()));
    }
    return MoveFromStack(mark, &target->items);
  }

  // REDUCE / NEWOBJ: call nothing; understand the few constructors state dicts need. The
  // object shares its argument tuple's items (no copy: a memoised tuple may be called often).
  absl::Status Construct(const PickleRef& callable, const PickleRef& args) {
    if (callable->kind != Kind::kGlobal) return Error("call of something that is not a class");
    if (args->kind != Kind::kTuple) return Error("call arguments are not a tuple");
    const absl::string_view name = callable->text;
    if ((name == "collections.OrderedDict" || name == "builtins.dict") && args->items.empty()) {
      PickleRef dict = Make(Kind::kDict);
      if (dict == nullptr) return OverBudget();
      stack_.push_back(dict);
    } else if (name == "torch.Size" && args->items.size() == 1 &&
               args->items[0]->kind == Kind::kTuple) {
      stack_.push_back(args->items[0]);
    } else {
      PickleRef obj = Make(Kind::kObject);
      if (obj == nullptr) return OverBudget();
      obj->text = name;  // the class's text, in the same arena
      obj->items = args->items;
      obj->items.capacity_ = 0;  // shared: an APPEND copies it first
      stack_.push_back(obj);
    }
    return absl::OkStatus();
  }

  absl::Status Step(unsigned char op) {
    PickleRef a = nullptr, b = nullptr, c = nullptr;
    uint64_t n = 0;
    size_t mark = 0;
    absl::string_view raw, line, line2;
    absl::Status s;
    switch (op) {
      case 0x80:  // PROTO
        if (!Take(1, &raw)) return Error("truncated PROTO");
        if (static_cast<unsigned char>(raw[0]) > 5) return Error("unknown pickle protocol");
        return absl::OkStatus();
      case 0x95:  // FRAME: a length hint only
        if (!TakeLe(8, &n)) return Error("truncated FRAME");
        return absl::OkStatus();
      case '.':  // STOP
        stopped_ = true;
        return absl::OkStatus();
      case '(':  // MARK
        marks_.push_back(stack_.size());
        return absl::OkStatus();
      case '0':  // POP
        return Pop(&a);
      case '1':  // POP_MARK
        s = PopMark(&mark);
        if (s.ok()) stack_.shrink(mark);
        return s;
      case '2':  // DUP
        s = Top(&a);
        if (s.ok()) stack_.push_back(a);
        return s;
      case 'N':
        stack_.push_back(&Shared().none);
        return absl::OkStatus();
      case 0x88:  // NEWTRUE
        stack_.push_back(&Shared().yes);
        return absl::OkStatus();
      case 0x89:  // NEWFALSE
        stack_.push_back(&Shared().no);
        return absl::OkStatus();
      case 'J':  // BININT
        if (!TakeLe(4, &n)) return Error("truncated BININT");
        return PushInt(static_cast<int32_t>(static_cast<uint32_t>(n)));
      case 'K':  // BININT1
        if (!TakeLe(1, &n)) return Error("truncated BININT1");
        return PushInt(static_cast<int64_t>(n));
      case 'M':  // BININT2
        if (!TakeLe(2, &n)) return Error("truncated BININT2");
        return PushInt(static_cast<int64_t>(n));
      case 0x8a:    // LONG1
      case 0x8b: {  // LONG4
        if (!TakeLe(op == 0x8a ? 1 : 4, &n) || !Take(n, &raw)) return Error("truncated LONG");
        if (n > 8) {  // beyond int64: keep an inert marker rather than a wrong number
          a = Make(Kind::kObject);
          if (a == nullptr) return OverBudget();
          a->text = "builtins.int";
          stack_.push_back(a);
          return absl::OkStatus();
        }
        uint64_t v = 0;
        for (int i = static_cast<int>(n) - 1; i >= 0; --i)
          v = (v << 8) | static_cast<unsigned char>(raw[i]);
        if (n > 0 && n < 8 && (static_cast<unsigned char>(raw[n - 1]) & 0x80)) {
          v |= ~uint64_t{0} << (8 * n);  // sign-extend
        }
        return PushInt(static_cast<int64_t>(v));
      }
      case 'I':  // INT (text): also encodes True/False as 01/00 in protocol 0
        if (!TakeLine(&line)) return Error("truncated INT");
        {
          int64_t v = 0;
          if (!absl::SimpleAtoi(line, &v)) return Error("bad INT");
          return PushInt(v);
        }
      case 'G': {  // BINFLOAT, big-endian
        if (!Take(8, &raw)) return Error("truncated BINFLOAT");
        uint64_t bits = 0;
        for (int i = 0; i < 8; ++i) bits = (bits << 8) | static_cast<unsigned char>(raw[i]);
        a = Make(Kind::kFloat);
        if (a == nullptr) return OverBudget();
        std::memcpy(&a->real, &bits, 8);
        stack_.push_back(a);
        return absl::OkStatus();
      }
      case 'X':  // BINUNICODE
        return PushString(Kind::kString, 4);
      case 0x8c:  // SHORT_BINUNICODE
        return PushString(Kind::kString, 1);
      case 0x8d:  // BINUNICODE8
        return PushString(Kind::kString, 8);
      case 'T':  // BINSTRING
        return PushString(Kind::kBytes, 4);
      case 'U':  // SHORT_BINSTRING
        return PushString(Kind::kBytes, 1);
      case 'B':  // BINBYTES
        return PushString(Kind::kBytes, 4);
      case 'C':  // SHORT_BINBYTES
        return PushString(Kind::kBytes, 1);
      case 0x8e:  // BINBYTES8
      case 0x96:  // BYTEARRAY8
        return PushString(Kind::kBytes, 8);
      case ')':  // EMPTY_TUPLE
        stack_.push_back(&Shared().empty_tuple);
        return absl::OkStatus();
      case 't':  // TUPLE
        return Collect(Kind::kTuple);
      case 0x85:    // TUPLE1
      case 0x86:    // TUPLE2
      case 0x87: {  // TUPLE3
        const size_t count = op - 0x84;
        if (!CanPop(count)) return Error("stack underflow");
        a = Make(Kind::kTuple);
        if (a == nullptr) return OverBudget();
        s = MoveFromStack(stack_.size() - count, &a->items);
        if (s.ok()) stack_.push_back(a);
        return s;
      }
      case ']':   // EMPTY_LIST
      case '}':   // EMPTY_DICT
      case 0x8f:  // EMPTY_SET
        a = Make(op == ']' ? Kind::kList : op == '}' ? Kind::kDict : Kind::kSet);
        if (a == nullptr) return OverBudget();
        stack_.push_back(a);
        return absl::OkStatus();
      case 'l':  // LIST
        return Collect(Kind::kList);
      case 'd':  // DICT
        return Collect(Kind::kDict);
      case 0x91:  // FROZENSET
        return Collect(Kind::kSet);
      case 'a':  // APPEND
        return AddTop(1);
      case 's':  // SETITEM
        return AddTop(2);
      case 'e':   // APPENDS
      case 0x90:  // ADDITEMS
        return AddMarked(/*pairs=*/false);
      case 'u':  // SETITEMS
        return AddMarked(/*pairs=*/true);
      case 'q':  // BINPUT
        if (!TakeLe(1, &n)) return Error("truncated BINPUT");
        return Memoize(n);
      case 'r':  // LONG_BINPUT
        if (!TakeLe(4, &n)) return Error("truncated LONG_BINPUT");
        return Memoize(n);
      case 0x94:  // MEMOIZE
        return Memoize(memo_dense_.size() + memo_sparse_.size());
      case 'p':  // PUT (text)
        if (!TakeLine(&line) || !absl::SimpleAtoi(line, &n)) return Error("bad PUT");
        return Memoize(n);
      case 'h':  // BINGET
        if (!TakeLe(1, &n)) return Error("truncated BINGET");
        return Recall(n);
      case 'j':  // LONG_BINGET
        if (!TakeLe(4, &n)) return Error("truncated LONG_BINGET");
        return Recall(n);
      case 'g':  // GET (text)
        if (!TakeLine(&line) || !absl::SimpleAtoi(line, &n)) return Error("bad GET");
        return Recall(n);
      case 'c':  // GLOBAL module\nname\n — recorded, never imported
        if (!TakeLine(&line) || !TakeLine(&line2)) return Error("truncated GLOBAL");
        return PushText(Kind::kGlobal, {line, ".", line2});
      case 0x93:  // STACK_GLOBAL
        s = Pop(&b);
        if (s.ok()) s = Pop(&a);
        if (!s.ok()) return s;
        if (a->kind != Kind::kString || b->kind != Kind::kString) {
          return Error("STACK_GLOBAL of non-strings");
        }
        return PushText(Kind::kGlobal, {a->text, ".", b->text});
      case 'R':   // REDUCE
      case 0x81:  // NEWOBJ
        s = Pop(&b);
        if (s.ok()) s = Pop(&a);
        if (!s.ok()) return s;
        return Construct(a, b);
      case 0x92:  // NEWOBJ_EX: cls, args, kwargs
        s = Pop(&c);
        if (s.ok()) s = Pop(&b);
        if (s.ok()) s = Pop(&a);
        if (!s.ok()) return s;
        return Construct(a, b);
      case 'b':  // BUILD: state is recorded on objects, ignored on dicts (OrderedDict _metadata)
        s = Pop(&b);
        if (s.ok()) s = Top(&a);
        if (!s.ok()) return s;
        if (a->kind == Kind::kObject) a->state = b;
        return absl::OkStatus();
      case 'Q':  // BINPERSID
        if (!CanPop(1)) return Error("stack underflow");
        b = Make(Kind::kPersistent);
        if (b == nullptr) return OverBudget();
        s = MoveFromStack(stack_.size() - 1, &b->items);
        if (s.ok()) stack_.push_back(b);
        return s;
      case 'P':  // PERSID (text)
        if (!TakeLine(&line)) return Error("truncated PERSID");
        s = PushText(Kind::kString, {line});
        if (!s.ok()) return s;
        b = Make(Kind::kPersistent);
        if (b == nullptr) return OverBudget();
        s = MoveFromStack(stack_.size() - 1, &b->items);
        if (s.ok()) stack_.push_back(b);
        return s;
      default:
        return Error(absl::StrCat("unsupported opcode 0x", absl::Hex(op, absl::kZeroPad2)));
    }
  }

  absl::string_view bytes_;
  absl::string_view context_;
  PickleDocument* doc_;
  size_t pos_ = 0;
  size_t op_at_ = 0;
  bool stopped_ = false;
  ChunkedStack<PickleRef> stack_;
  ChunkedStack<size_t> marks_;  // stack sizes at each MARK
  // The pickler numbers memo entries 0, 1, 2, ...: those are dense; any other index is sparse.
  ChunkedStack<PickleRef> memo_dense_;
  std::map<uint64_t, PickleRef> memo_sparse_;
};

std::string PickleValue::TypeName() const {
  switch (kind) {
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return "bool";
    case Kind::kInt:
      return "int";
    case Kind::kFloat:
      return "float";
    case Kind::kString:
      return "str";
    case Kind::kBytes:
      return "bytes";
    case Kind::kTuple:
      return "tuple";
    case Kind::kList:
      return "list";
    case Kind::kDict:
      return "dict";
    case Kind::kSet:
      return "set";
    case Kind::kGlobal:
      return absl::StrCat("type ", text);
    case Kind::kObject:
      return std::string(text);
    case Kind::kPersistent:
      return "persistent";
  }
  return "unknown";
}

PickleDocument::~PickleDocument() {
  for (const Block& b : blocks_) PutBlock(b.data, b.size);
}

void* PickleDocument::Allocate(size_t bytes) {
  if (bytes > budget_) return nullptr;
  bytes = (bytes + 7) & ~size_t{7};
  used_ += bytes;
  if (bytes <= left_) {
    void* p = next_;
    next_ += bytes;
    left_ -= bytes;
    return p;
  }
  // A large run gets a mapping of its own; small ones share blocks (wasting under a quarter).
  const bool own = bytes > block_size_ / 4;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t size = own ? (bytes + page - 1) / page * page : block_size_;
  if (size > budget_ - std::min(budget_, mapped_)) {
    used_ -= bytes;
    return nullptr;
  }
  void* p = GetBlock(size);
  if (p == nullptr) {
    used_ -= bytes;
    map_failed_ = true;
    return nullptr;
  }
  blocks_.push_back({p, size});
  mapped_ += size;
  if (own) return p;
  next_ = static_cast<char*>(p) + bytes;
  left_ = size - bytes;
  block_size_ = std::min(block_size_ * 2, kMaxBlockBytes);
  return p;
}

bool PickleDocument::Reserve(PickleItems* items, size_t more) {
  if (more > budget_ / sizeof(PickleRef) - items->size_) return false;
  const size_t need = items->size_ + more;
  if (need <= items->capacity_) return true;
  const size_t capacity = items->capacity_ == 0 ? need : std::max(need, items->capacity_ * 2);
  auto* data = static_cast<PickleRef*>(Allocate(capacity * sizeof(PickleRef)));
  if (data == nullptr) return false;
  if (items->size_ > 0) std::memcpy(data, items->data_, items->size_ * sizeof(PickleRef));
  items->data_ = data;
  items->capacity_ = capacity;
  return true;
}

absl::StatusOr<std::unique_ptr<PickleDocument>> ParsePickle(absl::string_view bytes,
                                                            absl::string_view context) {
  const size_t budget =
      bytes.size() > (std::numeric_limits<size_t>::max() - kPickleMemoryBaseBytes) /
                         kPickleMemoryPerInputByte
          ? std::numeric_limits<size_t>::max()
          : kPickleMemoryPerInputByte * bytes.size() + kPickleMemoryBaseBytes;
  std::unique_ptr<PickleDocument> doc(new PickleDocument(budget));
  absl::StatusOr<PickleRef> root = PickleMachine(bytes, context, doc.get()).Run();
  if (!root.ok()) return root.status();
  doc->root_ = *root;
  return doc;
}

}  // namespace metaload::core
