#include "server/core/pickle_reader.h"

#include <cstring>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace metaload::core {
namespace {

using Kind = PickleValue::Kind;

class Machine {
 public:
  Machine(absl::string_view bytes, absl::string_view context, PickleDocument* doc)
      : bytes_(bytes), context_(context), doc_(doc) {}

  absl::StatusOr<PickleRef> Run() {
    while (true) {
      if (pos_ >= bytes_.size()) return Error("ends without STOP");
      op_at_ = pos_;
      const unsigned char op = static_cast<unsigned char>(bytes_[pos_++]);
      absl::Status s = Step(op);
      if (!s.ok()) return s;
      if (stopped_) {
        if (stack_.size() != 1 || !marks_.empty()) return Error("STOP with a malformed stack");
        return stack_.back();
      }
    }
  }

 private:
  PickleRef Make(Kind kind) {
    PickleRef v = doc_->New();
    v->kind = kind;
    return v;
  }
  PickleRef MakeText(Kind kind, std::string text) {
    PickleRef v = Make(kind);
    v->text = std::move(text);
    return v;
  }

  absl::Status Error(absl::string_view what) const {
    return absl::DataLossError(
        absl::StrCat(context_, ": pickle: ", what, " (opcode at byte ", op_at_, ")"));
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
  bool TakeLine(std::string* out) {
    size_t end = bytes_.find('\n', pos_);
    if (end == absl::string_view::npos) return false;
    *out = std::string(bytes_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return true;
  }

  absl::Status Pop(PickleRef* out) {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) {
      return Error("stack underflow");
    }
    *out = std::move(stack_.back());
    stack_.pop_back();
    return absl::OkStatus();
  }
  absl::Status Top(PickleRef* out) {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) {
      return Error("stack underflow");
    }
    *out = stack_.back();
    return absl::OkStatus();
  }
  // Pops everything above the last MARK, and the mark.
  absl::Status PopMark(std::vector<PickleRef>* out) {
    if (marks_.empty()) return Error("missing MARK");
    const size_t mark = marks_.back();
    marks_.pop_back();
    out->assign(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(mark)),
                std::make_move_iterator(stack_.end()));
    stack_.resize(mark);
    return absl::OkStatus();
  }

  absl::Status PushString(Kind kind, int len_bytes) {
    uint64_t n = 0;
    absl::string_view s;
    if (!TakeLe(len_bytes, &n) || !Take(n, &s)) return Error("string runs past the end");
    stack_.push_back(MakeText(kind, std::string(s)));
    return absl::OkStatus();
  }

  absl::Status PushInt(int64_t v) {
    PickleRef r = Make(Kind::kInt);
    r->integer = v;
    stack_.push_back(std::move(r));
    return absl::OkStatus();
  }

  absl::Status Memoize(uint64_t index) {
    PickleRef top = nullptr;
    absl::Status s = Top(&top);
    if (!s.ok()) return s;
    memo_[index] = top;
    return absl::OkStatus();
  }
  absl::Status Recall(uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) return Error(absl::StrCat("memo entry ", index, " was never stored"));
    stack_.push_back(it->second);
    return absl::OkStatus();
  }

  // Appends `values` to a list/set/dict target, or records them on an inert object.
  absl::Status AddItems(const PickleRef& target, std::vector<PickleRef> values, bool pairs) {
    if (pairs && values.size() % 2 != 0) return Error("SETITEMS with an odd number of values");
    if (target->kind != Kind::kList && target->kind != Kind::kDict && target->kind != Kind::kSet &&
        target->kind != Kind::kObject) {
      return Error(absl::StrCat("cannot add items to a ", target->TypeName()));
    }
    for (PickleRef& v : values) target->items.push_back(std::move(v));
    return absl::OkStatus();
  }

  // REDUCE / NEWOBJ: call nothing; understand the few constructors state dicts need.
  absl::Status Construct(const PickleRef& callable, const PickleRef& args) {
    if (callable->kind != Kind::kGlobal) return Error("call of something that is not a class");
    if (args->kind != Kind::kTuple) return Error("call arguments are not a tuple");
    const std::string& name = callable->text;
    if ((name == "collections.OrderedDict" || name == "builtins.dict") && args->items.empty()) {
      stack_.push_back(Make(Kind::kDict));
    } else if (name == "torch.Size" && args->items.size() == 1 &&
               args->items[0]->kind == Kind::kTuple) {
      stack_.push_back(args->items[0]);
    } else {
      PickleRef obj = MakeText(Kind::kObject, name);
      obj->items = args->items;
      stack_.push_back(std::move(obj));
    }
    return absl::OkStatus();
  }

  absl::Status Step(unsigned char op) {
    PickleRef a = nullptr, b = nullptr, c = nullptr;
    std::vector<PickleRef> items;
    uint64_t n = 0;
    absl::string_view raw;
    std::string line, line2;
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
        return PopMark(&items);
      case '2':  // DUP
        s = Top(&a);
        if (s.ok()) stack_.push_back(a);
        return s;
      case 'N':
        stack_.push_back(Make(Kind::kNone));
        return absl::OkStatus();
      case 0x88:  // NEWTRUE
      case 0x89:  // NEWFALSE
        a = Make(Kind::kBool);
        a->boolean = op == 0x88;
        stack_.push_back(std::move(a));
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
          stack_.push_back(MakeText(Kind::kObject, "builtins.int"));
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
        std::memcpy(&a->real, &bits, 8);
        stack_.push_back(std::move(a));
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
        stack_.push_back(Make(Kind::kTuple));
        return absl::OkStatus();
      case 't':  // TUPLE
        s = PopMark(&items);
        if (!s.ok()) return s;
        a = Make(Kind::kTuple);
        a->items = std::move(items);
        stack_.push_back(std::move(a));
        return absl::OkStatus();
      case 0x85:    // TUPLE1
      case 0x86:    // TUPLE2
      case 0x87: {  // TUPLE3
        const int count = op - 0x84;
        a = Make(Kind::kTuple);
        a->items.resize(static_cast<size_t>(count));
        for (int i = count - 1; i >= 0; --i) {
          s = Pop(&a->items[static_cast<size_t>(i)]);
          if (!s.ok()) return s;
        }
        stack_.push_back(std::move(a));
        return absl::OkStatus();
      }
      case ']':  // EMPTY_LIST
        stack_.push_back(Make(Kind::kList));
        return absl::OkStatus();
      case 'l':  // LIST
        s = PopMark(&items);
        if (!s.ok()) return s;
        a = Make(Kind::kList);
        a->items = std::move(items);
        stack_.push_back(std::move(a));
        return absl::OkStatus();
      case '}':  // EMPTY_DICT
        stack_.push_back(Make(Kind::kDict));
        return absl::OkStatus();
      case 'd':  // DICT
        s = PopMark(&items);
        if (!s.ok()) return s;
        if (items.size() % 2 != 0) return Error("DICT with an odd number of values");
        a = Make(Kind::kDict);
        a->items = std::move(items);
        stack_.push_back(std::move(a));
        return absl::OkStatus();
      case 0x8f:  // EMPTY_SET
        stack_.push_back(Make(Kind::kSet));
        return absl::OkStatus();
      case 0x91:  // FROZENSET
        s = PopMark(&items);
        if (!s.ok()) return s;
        a = Make(Kind::kSet);
        a->items = std::move(items);
        stack_.push_back(std::move(a));
        return absl::OkStatus();
      case 'a':  // APPEND
        s = Pop(&b);
        if (s.ok()) s = Top(&a);
        if (!s.ok()) return s;
        return AddItems(a, {b}, false);
      case 'e':    // APPENDS
      case 0x90:   // ADDITEMS
      case 'u': {  // SETITEMS
        s = PopMark(&items);
        if (s.ok()) s = Top(&a);
        if (!s.ok()) return s;
        return AddItems(a, std::move(items), op == 'u');
      }
      case 's':  // SETITEM
        s = Pop(&c);
        if (s.ok()) s = Pop(&b);
        if (s.ok()) s = Top(&a);
        if (!s.ok()) return s;
        return AddItems(a, {b, c}, true);
      case 'q':  // BINPUT
        if (!TakeLe(1, &n)) return Error("truncated BINPUT");
        return Memoize(n);
      case 'r':  // LONG_BINPUT
        if (!TakeLe(4, &n)) return Error("truncated LONG_BINPUT");
        return Memoize(n);
      case 0x94:  // MEMOIZE
        return Memoize(memo_.size());
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
        stack_.push_back(MakeText(Kind::kGlobal, absl::StrCat(line, ".", line2)));
        return absl::OkStatus();
      case 0x93:  // STACK_GLOBAL
        s = Pop(&b);
        if (s.ok()) s = Pop(&a);
        if (!s.ok()) return s;
        if (a->kind != Kind::kString || b->kind != Kind::kString) {
          return Error("STACK_GLOBAL of non-strings");
        }
        stack_.push_back(MakeText(Kind::kGlobal, absl::StrCat(a->text, ".", b->text)));
        return absl::OkStatus();
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
        s = Pop(&a);
        if (!s.ok()) return s;
        b = Make(Kind::kPersistent);
        b->items.push_back(std::move(a));
        stack_.push_back(std::move(b));
        return absl::OkStatus();
      case 'P':  // PERSID (text)
        if (!TakeLine(&line)) return Error("truncated PERSID");
        b = Make(Kind::kPersistent);
        b->items.push_back(MakeText(Kind::kString, line));
        stack_.push_back(std::move(b));
        return absl::OkStatus();
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
  std::vector<PickleRef> stack_;
  std::vector<size_t> marks_;
  std::map<uint64_t, PickleRef> memo_;
};

}  // namespace

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
      return "type " + text;
    case Kind::kObject:
      return text;
    case Kind::kPersistent:
      return "persistent";
  }
  return "unknown";
}

PickleRef PickleDocument::New() {
  arena_.push_back(std::make_unique<PickleValue>());
  return arena_.back().get();
}

absl::StatusOr<std::unique_ptr<PickleDocument>> ParsePickle(absl::string_view bytes,
                                                            absl::string_view context) {
  auto doc = std::make_unique<PickleDocument>();
  absl::StatusOr<PickleRef> root = Machine(bytes, context, doc.get()).Run();
  if (!root.ok()) return root.status();
  doc->root_ = *root;
  return doc;
}

}  // namespace metaload::core
