// The restricted unpickler against hostile programs whose memory grows faster than their size:
// each is built here, in C++, and parsed while the process's peak RSS is measured. The bound is
// pickle_reader.h's: kPickleMemoryPerInputByte x the input + kPickleMemoryBaseBytes.
// (PickleReaderTest cases for malformed programs are in checkpoint_test.cc.)
#include "server/core/pickle_reader.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "server/core/process_memory.h"

namespace metaload::core {
namespace {

using namespace std::string_literals;

constexpr int64_t kMiB = 1 << 20;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kMeasuresRss = false;  // shadow memory and quarantine are not the parser's
#else
constexpr bool kMeasuresRss = true;
#endif

int64_t Rss() {
  absl::StatusOr<ProcessMemory> m = ReadProcessMemory();
  return m.ok() ? m->rss_bytes : 0;
}

// Parses `bytes` and reports the peak RSS above the RSS before, and the RSS left after.
struct Measured {
  absl::Status status;
  size_t arena_bytes = 0;  // of a document that parsed
  int64_t peak_above_baseline = 0;
  int64_t left_after = 0;
};
Measured Parse(const std::string& bytes) {
  Measured m;
  const int64_t baseline = Rss();
  const bool reset = ResetPeakRss();
  {
    absl::StatusOr<std::unique_ptr<PickleDocument>> doc = ParsePickle(bytes, "hostile.pkl");
    m.status = doc.status();
    if (doc.ok()) m.arena_bytes = (*doc)->arena_bytes();
    absl::StatusOr<ProcessMemory> after = ReadProcessMemory();
    m.peak_above_baseline = reset && after.ok() ? after->peak_rss_bytes - baseline : -1;
  }
  m.left_after = Rss() - baseline;
  return m;
}

// pickle_reader.h's RSS bound: the arena's budget plus the machine's stack, marks and memo.
int64_t Bound(const std::string& bytes) {
  return static_cast<int64_t>(kPickleRssPerInputByte * bytes.size() + kPickleRssBaseBytes);
}

void ExpectWithinBound(const Measured& m, const std::string& bytes, int64_t left_at_most) {
  if (!kMeasuresRss) return;
  ASSERT_GE(m.peak_above_baseline, 0) << "the kernel refused to reset VmHWM";
  EXPECT_LE(m.peak_above_baseline, Bound(bytes))
      << "peak " << m.peak_above_baseline / kMiB << " MiB for " << bytes.size() << " bytes";
  EXPECT_LE(m.left_after, left_at_most) << m.left_after / kMiB << " MiB left after the parse";
  std::printf(
      "[ measured ] %zu input bytes: peak %.1f MiB above baseline (bound %.1f MiB), "
      "%.1f MiB left after\n",
      bytes.size(), static_cast<double>(m.peak_above_baseline) / kMiB,
      static_cast<double>(Bound(bytes)) / kMiB, static_cast<double>(m.left_after) / kMiB);
}

const std::string kProto = "\x80\x02";

// A tuple of `items` Nones stored as memo 0, a class as memo 1, then REDUCE of the two, again
// and again, to `total` bytes: each REDUCE used to copy the whole tuple (quadratic).
std::string MemoReduceChain(size_t items, size_t total) {
  std::string p =
      kProto + "(" + std::string(items, 'N') + "tq\x00"s + "0" + "c__main__\nX\nq\x01" + "0";
  const std::string call = "h\x01h\x00R0"s;
  p.reserve(total);
  while (p.size() + call.size() + 2 <= total) p += call;
  return p + "N.";
}

TEST(PickleMemoryTest, ReduceOnAMemoisedTupleSharesIt) {
  // Until 2026-12: 3.5-4 GB in 4 s, then bad_alloc (an abort), for this 1 MiB program.
  const std::string p = MemoReduceChain(256 << 10, 1 << 20);
  const Measured m = Parse(p);
  ASSERT_TRUE(m.status.ok()) << m.status;
  EXPECT_LE(m.arena_bytes, kPickleMemoryPerInputByte * p.size() + kPickleMemoryBaseBytes);
  ExpectWithinBound(m, p, 16 * kMiB);
}

TEST(PickleMemoryTest, NoneFloodIsBoundedAndFreedOnFailure) {
  // Until 2026-12: 20 MiB of NONE peaked at 2.5 GB and kept 2.1 GB after the parse failed.
  const std::string p = kProto + std::string(20 << 20, 'N') + ".";
  const Measured m = Parse(p);
  EXPECT_TRUE(absl::IsDataLoss(m.status)) << m.status;
  EXPECT_NE(m.status.message().find("malformed stack"), std::string::npos) << m.status;
  ExpectWithinBound(m, p, 16 * kMiB);
}

TEST(PickleMemoryTest, EmptyListFloodStopsAtTheBound) {
  // Each 1-byte EMPTY_LIST is a distinct mutable value: more memory per byte than the bound
  // allows, so the parse stops there instead of growing with the file.
  const std::string p = kProto + std::string(4 << 20, ']') + ".";
  const Measured m = Parse(p);
  EXPECT_TRUE(absl::IsDataLoss(m.status)) << m.status;
  EXPECT_NE(m.status.message().find("needs more than"), std::string::npos) << m.status;
  ExpectWithinBound(m, p, 16 * kMiB);
}

TEST(PickleMemoryTest, StackGlobalOfMemoisedStringsStopsAtTheBound) {
  // STACK_GLOBAL joins module and name: two memoised 64 KiB strings make each 5-byte
  // STACK_GLOBAL a 128 KiB name (quadratic without a bound).
  const std::string big(64 << 10, 'a');
  std::string p = kProto + "X" + "\x00\x00\x01\x00"s + big + "q\x00"s + "0";
  while (p.size() < (1 << 20))
    p += "h\x00h\x00\x93"s
         "0";
  p += "N.";
  const Measured m = Parse(p);
  EXPECT_TRUE(absl::IsDataLoss(m.status)) << m.status;
  EXPECT_NE(m.status.message().find("needs more than"), std::string::npos) << m.status;
  ExpectWithinBound(m, p, 16 * kMiB);
}

TEST(PickleMemoryTest, AppendingToObjectsThatShareArgumentsCopiesWithinTheBound) {
  // REDUCE shares its argument tuple; APPEND onto the object must not write into the shared
  // tuple, and the copy it makes instead is charged, so a chain of them stops at the bound.
  std::string p =
      kProto + "(" + std::string(64 << 10, 'N') + "tq\x00"s + "0" + "c__main__\nX\nq\x01" + "0";
  while (p.size() < (1 << 20)) p += "h\x01h\x00RNa0"s;
  p += "N.";
  const Measured m = Parse(p);
  EXPECT_TRUE(absl::IsDataLoss(m.status)) << m.status;
  ExpectWithinBound(m, p, 16 * kMiB);

  // Two objects of one tuple, each appended to: each sees its own item, the tuple none.
  const std::string two = kProto + "c__main__\nX\nq\x01" + "0" + "K\x07\x85q\x00"s + "0" +
                          "(h\x01h\x00RK\x08"s
                          "ah\x01h\x00RK\x09"s
                          "ah\x00t."s;
  absl::StatusOr<std::unique_ptr<PickleDocument>> doc = ParsePickle(two, "two.pkl");
  ASSERT_TRUE(doc.ok()) << doc.status();
  const PickleValue& root = (*doc)->root();
  ASSERT_EQ(root.items.size(), 3u);
  ASSERT_EQ(root.items[0]->items.size(), 2u);
  EXPECT_EQ(root.items[0]->items[1]->integer, 8);
  ASSERT_EQ(root.items[1]->items.size(), 2u);
  EXPECT_EQ(root.items[1]->items[1]->integer, 9);
  ASSERT_EQ(root.items[2]->items.size(), 1u);
  EXPECT_EQ(root.items[2]->items[0]->integer, 7);
}

// A real torch.save pickle, from Python: 1,200 tensors in a GPT-2-like layout plus a Lightning
// wrapper's extras, far inside the bound.
TEST(PickleMemoryTest, RealStateDictsNeedAFractionOfTheBound) {
  const std::string path = ::testing::TempDir() + "/state_dict_data.pkl";
  const std::string script =
      "import io, sys, zipfile, torch\n"
      "sd = {}\n"
      "for i in range(100):\n"
      "  for n in ['ln_1.weight','ln_1.bias','attn.c_attn.weight','attn.c_attn.bias',\n"
      "            'attn.c_proj.weight','attn.c_proj.bias','ln_2.weight','ln_2.bias',\n"
      "            'mlp.c_fc.weight','mlp.c_fc.bias','mlp.c_proj.weight','mlp.c_proj.bias']:\n"
      "    sd[f'transformer.h.{i}.{n}'] = torch.zeros(2, 3)\n"
      "ckpt = {'state_dict': sd, 'epoch': 3, 'global_step': 1000,\n"
      "        'hyper_parameters': {'lr': 1e-4, 'betas': (0.9, 0.999), 'layers': "
      "list(range(64))}}\n"
      "b = io.BytesIO(); torch.save(ckpt, b)\n"
      "z = zipfile.ZipFile(io.BytesIO(b.getvalue()))\n"
      "name = [n for n in z.namelist() if n.endswith('/data.pkl')][0]\n"
      "open(sys.argv[1], 'wb').write(z.read(name))\n";
  const std::string script_path = ::testing::TempDir() + "/write_state_dict_pkl.py";
  std::ofstream(script_path) << script;
  ASSERT_EQ(std::system((std::string(METALOAD_PYTHON) + " " + script_path + " " + path).c_str()),
            0);
  std::ifstream in(path, std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  const std::string p = bytes.str();
  ASSERT_GT(p.size(), 10000u);
  absl::StatusOr<std::unique_ptr<PickleDocument>> doc = ParsePickle(p, "data.pkl");
  ASSERT_TRUE(doc.ok()) << doc.status();
  const double per_byte = static_cast<double>((*doc)->arena_bytes()) / p.size();
  std::printf("[ measured ] a %zu-byte torch.save pickle: %zu arena bytes, %.1f per input byte\n",
              p.size(), (*doc)->arena_bytes(), per_byte);
  EXPECT_LT(per_byte, kPickleMemoryPerInputByte / 2.0);
}

}  // namespace
}  // namespace metaload::core
