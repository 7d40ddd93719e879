// The checkpoint readers against files written by Python PyTorch and an independent Python
// safetensors writer (tests/tools/make_checkpoints.py), compared byte for byte, plus one broken
// file per failure class of the sharded, zip and pickle layers.
#include "server/core/checkpoint.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "server/core/pickle_reader.h"
#include "server/core/safetensors_writer.h"
#include "tests/test_util.h"

namespace metaload::core {
namespace {

namespace fs = std::filesystem;

class CheckpointTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    testing::CommandResult r = testing::RunCommand(
        {METALOAD_PYTHON, METALOAD_SOURCE_DIR "/tests/tools/make_checkpoints.py", dir_->path()},
        *dir_ / "make");
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static std::string Path(const std::string& name) { return *dir_ / name; }

  // Every expected tensor of `fixture` reads back equal to Python's bytes, through pread and
  // through the mapping; the index holds exactly those tensors.
  static void ExpectTensorsMatchPython(const CheckpointSource& source, const std::string& fixture) {
    size_t expected_count = 0;
    for (const auto& entry : fs::directory_iterator(*dir_ / ("expected/" + fixture))) {
      ++expected_count;
      const std::string name = entry.path().stem().string();
      const std::string want = testing::ReadFileOrEmpty(entry.path().string());
      const TensorInfo* t = source.index().Find(name);
      ASSERT_NE(t, nullptr) << fixture << ": " << name;
      ASSERT_EQ(t->nbytes, want.size()) << fixture << ": " << name;
      EXPECT_EQ(static_cast<uint64_t>(t->numel()) * DTypeSize(t->dtype), t->nbytes);
      std::string got(want.size(), '\0');
      ASSERT_TRUE(source.Read(*t, 0, t->nbytes, got.data()).ok());
      EXPECT_EQ(got, want) << fixture << ": " << name;
      absl::StatusOr<std::shared_ptr<const MappedFile>> map = source.Map(t->file);
      ASSERT_TRUE(map.ok()) << map.status();
      EXPECT_EQ(std::string((*map)->data() + t->offset, t->nbytes), want) << name;
    }
    EXPECT_EQ(source.index().tensors.size(), expected_count) << fixture;
  }

  static testing::TempDir* dir_;
};

testing::TempDir* CheckpointTest::dir_ = nullptr;

TEST_F(CheckpointTest, SafetensorsFromAnIndependentWriter) {
  absl::StatusOr<std::unique_ptr<CheckpointSource>> s =
      CheckpointSource::Open(Path("mixed.safetensors"));
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->index().format, CheckpointFormat::kSafetensors);
  EXPECT_EQ((*s)->index().metadata.at("format"), "pt");
  ExpectTensorsMatchPython(**s, "mixed.safetensors");
  const TensorInfo* bf16 = (*s)->index().Find("bf16");
  EXPECT_EQ(bf16->dtype, DType::kBFloat16);
  EXPECT_EQ((*s)->index().Find("mask")->dtype, DType::kBool);
  EXPECT_TRUE((*s)->index().Find("scalar")->shape.empty());
  std::map<DType, uint64_t> by_dtype = (*s)->index().bytes_by_dtype();
  EXPECT_EQ(by_dtype[DType::kFloat32], (15 + 1 + 0) * 4u);
  EXPECT_EQ(by_dtype[DType::kInt64], 10 * 8u);
}

TEST_F(CheckpointTest, TorchSaveStateDict) {
  absl::StatusOr<std::unique_ptr<CheckpointSource>> s =
      CheckpointSource::Open(Path("state_dict.pt"));
  ASSERT_TRUE(s.ok()) << s.status();
  const CheckpointIndex& index = (*s)->index();
  EXPECT_EQ(index.format, CheckpointFormat::kTorchZip);
  ExpectTensorsMatchPython(**s, "state_dict.pt");
  // Tied weights share one storage; the view starts 3 floats into its storage.
  EXPECT_EQ(index.Find("tied.weight")->offset, index.Find("0.weight")->offset);
  EXPECT_EQ(index.Find("view")->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(index.Find("flags")->dtype, DType::kBool);
  EXPECT_EQ(index.skipped_entries, (std::vector<std::string>{"version (int)", "note (str)"}));
}

TEST_F(CheckpointTest, OneEntryDictPickledWithSetitem) {
  absl::StatusOr<std::unique_ptr<CheckpointSource>> s =
      CheckpointSource::Open(Path("one_entry.pt"));
  ASSERT_TRUE(s.ok()) << s.status();
  ExpectTensorsMatchPython(**s, "one_entry.pt");
}

TEST_F(CheckpointTest, LightningCheckpointUnwrapsStateDictAndSkipsTheRest) {
  absl::StatusOr<std::unique_ptr<CheckpointSource>> s =
      CheckpointSource::Open(Path("lightning.ckpt"));
  ASSERT_TRUE(s.ok()) << s.status();
  ExpectTensorsMatchPython(**s, "lightning.ckpt");
  EXPECT_EQ((*s)->index().skipped_entries,
            (std::vector<std::string>{"epoch (int)", "global_step (int)", "callbacks (dict)",
                                      "hparams (dict)"}));
}

TEST_F(CheckpointTest, ShardedHuggingFaceDirectory) {
  absl::StatusOr<std::unique_ptr<CheckpointSource>> s = CheckpointSource::Open(Path("hf_sharded"));
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->index().format, CheckpointFormat::kSafetensorsSharded);
  EXPECT_EQ((*s)->index().files.size(), 2u);
  EXPECT_NE((*s)->index().config_json.find("\"toy\""), std::string::npos);
  ExpectTensorsMatchPython(**s, "hf_sharded");
}

TEST_F(CheckpointTest, TorchScriptIsRecognised) {
  absl::StatusOr<std::unique_ptr<CheckpointSource>> s = CheckpointSource::Open(Path("scripted.pt"));
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->index().format, CheckpointFormat::kTorchScript);
  EXPECT_TRUE((*s)->index().tensors.empty());
}

TEST_F(CheckpointTest, UnusableButValidFilesAreFailedPrecondition) {
  struct Case {
    const char* file;
    const char* message;
  };
  for (const Case& c : {Case{"legacy.pt", "legacy (pre-1.6, non-zip) torch.save format"},
                        Case{"module.pt", "holds a torch.nn.modules.container.Sequential"},
                        Case{"transposed.pt", "tensor 'w' is not contiguous"}}) {
    absl::Status status = CheckpointSource::Open(Path(c.file)).status();
    EXPECT_TRUE(absl::IsFailedPrecondition(status)) << c.file << ": " << status;
    EXPECT_NE(status.message().find(c.message), std::string::npos) << status;
    EXPECT_NE(status.message().find(Path(c.file)), std::string::npos) << status;
  }
  absl::Status empty_dir = CheckpointSource::Open(dir_->path() + "/expected").status();
  EXPECT_TRUE(absl::IsFailedPrecondition(empty_dir)) << empty_dir;
  absl::Status missing = CheckpointSource::Open(Path("nope.safetensors")).status();
  EXPECT_TRUE(absl::IsNotFound(missing)) << missing;
}

// Writes a file with the given bytes.
void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

TEST_F(CheckpointTest, CorruptZipsAreDataLoss) {
  const std::string good = testing::ReadFileOrEmpty(Path("state_dict.pt"));
  ASSERT_GT(good.size(), 1000u);
  struct Case {
    const char* name;
    std::string bytes;
    const char* message;
  };
  std::string bad_directory = good;
  size_t central = good.rfind(std::string("PK\x01\x02", 4));
  bad_directory[central + 2] = '\x07';
  for (const Case& c :
       {Case{"truncated.pt", good.substr(0, good.size() - 300), "zip"},
        Case{"cut_in_half.pt", good.substr(0, good.size() / 2), "zip"},
        Case{"bad_central.pt", bad_directory, "central directory entry"},
        Case{"not_torch.zip", testing::ReadFileOrEmpty(Path("plain.zip")), "without data.pkl"},
        Case{"garbage.bin", std::string(4096, '\x5a'), "header length"}}) {
    const std::string path = *dir_ / c.name;
    WriteBytes(path, c.bytes);
    absl::Status status = CheckpointSource::Open(path).status();
    EXPECT_TRUE(absl::IsDataLoss(status)) << c.name << ": " << status;
    EXPECT_NE(status.message().find(path), std::string::npos) << status;
    EXPECT_NE(status.message().find(c.message), std::string::npos) << c.name << ": " << status;
  }
}

// Hostile: two entries of one name. torch reads the first, a map would keep the last, so the
// same file would mean two different state dicts: DATA_LOSS. Before the fix the last one won.
TEST_F(CheckpointTest, DuplicateZipEntryNamesAreDataLoss) {
  const std::string out = *dir_ / "duplicate.pt";
  testing::CommandResult r = testing::RunCommand(
      {METALOAD_PYTHON, "-W", "ignore", "-c",
       "import sys, zipfile\n"
       "src = zipfile.ZipFile(sys.argv[1])\n"
       "with zipfile.ZipFile(sys.argv[2], 'w', zipfile.ZIP_STORED) as z:\n"
       "    for i in src.infolist(): z.writestr(i.filename, src.read(i))\n"
       "    pkl = [i for i in src.infolist() if i.filename.endswith('/data.pkl')][0]\n"
       "    z.writestr(pkl.filename, src.read(pkl))\n",
       Path("state_dict.pt"), out},
      *dir_ / "dup");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  absl::Status status = CheckpointSource::Open(out).status();
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_NE(status.message().find("data.pkl' appears twice"), std::string::npos) << status;
}

// A data.pkl over the limit (64 MiB; the unpickler may take 48 x its input) is refused before it
// is read: DATA_LOSS naming the limit.
TEST_F(CheckpointTest, OversizedPickleIsRefusedBeforeReading) {
  const std::string out = *dir_ / "big_pickle.pt";
  testing::CommandResult r = testing::RunCommand(
      {METALOAD_PYTHON, "-W", "ignore", "-c",
       "import sys, zipfile\n"
       "src = zipfile.ZipFile(sys.argv[1])\n"
       "with zipfile.ZipFile(sys.argv[2], 'w', zipfile.ZIP_STORED) as z:\n"
       "    for i in src.infolist():\n"
       "        data = src.read(i)\n"
       "        if i.filename.endswith('/data.pkl'): data = data[:-1] + b'N' * (65 << 20) + b'.'\n"
       "        z.writestr(i.filename, data)\n",
       Path("state_dict.pt"), out},
      *dir_ / "big");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  absl::Status status = CheckpointSource::Open(out).status();
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_NE(status.message().find("at most 67108864"), std::string::npos) << status;
}

// A two-shard directory built with metaload's writer, then broken one way per case.
class ShardedFailureTest : public ::testing::Test {
 protected:
  void WriteShard(const std::string& file, const std::vector<std::string>& names) {
    SafetensorsWriter w;
    for (const std::string& n : names) {
      ASSERT_TRUE(w.Add(n, DType::kFloat32, {2}, [](char* d, int64_t, int64_t n) {
                     std::memset(d, 0, n);
                   }).ok());
    }
    ASSERT_TRUE(w.Write(dir_ / file).ok());
  }
  void WriteIndex(const std::string& weight_map_json) {
    WriteBytes(dir_ / "model.safetensors.index.json",
               "{\"metadata\":{},\"weight_map\":" + weight_map_json + "}");
  }
  absl::Status Open() { return CheckpointSource::Open(dir_.path()).status(); }

  testing::TempDir dir_;
};

TEST_F(ShardedFailureTest, EachInconsistencyIsDataLossNamingTheKey) {
  WriteShard("a.safetensors", {"x", "y"});
  WriteShard("b.safetensors", {"z"});
  WriteIndex(R"({"x":"a.safetensors","y":"a.safetensors","z":"b.safetensors"})");
  ASSERT_TRUE(Open().ok()) << Open();

  WriteIndex(R"({"x":"a.safetensors","y":"a.safetensors","z":"c.safetensors"})");
  absl::Status missing_shard = Open();
  EXPECT_TRUE(absl::IsDataLoss(missing_shard));
  EXPECT_NE(missing_shard.message().find("shard c.safetensors (for tensor 'z') does not exist"),
            std::string::npos)
      << missing_shard;

  WriteIndex(
      R"({"x":"a.safetensors","y":"a.safetensors","z":"b.safetensors","w":"b.safetensors"})");
  absl::Status missing_tensor = Open();
  EXPECT_NE(missing_tensor.message().find("weight_map entry 'w': shard b.safetensors has no such"),
            std::string::npos)
      << missing_tensor;

  WriteIndex(R"({"x":"a.safetensors","z":"b.safetensors"})");
  absl::Status unlisted = Open();
  EXPECT_NE(unlisted.message().find("tensor 'y' is not in the index's weight_map"),
            std::string::npos)
      << unlisted;

  WriteShard("b.safetensors", {"z", "x"});
  WriteIndex(R"({"x":"a.safetensors","y":"a.safetensors","z":"b.safetensors"})");
  absl::Status twice = Open();
  EXPECT_TRUE(absl::IsDataLoss(twice));
  EXPECT_NE(twice.message().find("'x'"), std::string::npos) << twice;

  WriteIndex(R"({"x":"../a.safetensors"})");
  absl::Status escape = Open();
  EXPECT_TRUE(absl::IsDataLoss(escape));
  EXPECT_NE(escape.message().find("not a file in the checkpoint's directory"), std::string::npos);

  WriteIndex(R"({"x":"a.safetensors","x":"a.safetensors"})");
  EXPECT_NE(Open().message().find("duplicate key 'x'"), std::string::npos) << Open();

  WriteBytes(dir_ / "model.safetensors.index.json", R"({"weight_map":[]})");
  EXPECT_NE(Open().message().find("weight_map is not an object"), std::string::npos) << Open();
}

TEST(CheckpointSourceTest, FileTruncatedWhileLoadingIsDataLoss) {
  testing::TempDir dir;
  SafetensorsWriter w;
  ASSERT_TRUE(w.Add("big", DType::kFloat32, {1 << 20}, [](char* d, int64_t, int64_t n) {
                 std::memset(d, 1, n);
               }).ok());
  const std::string path = dir / "m.safetensors";
  ASSERT_TRUE(w.Write(path).ok());
  CheckpointSource::Options options;
  options.parallel_read_min_bytes = 1 << 20;  // exercise the threaded path
  absl::StatusOr<std::unique_ptr<CheckpointSource>> s = CheckpointSource::Open(path, options);
  ASSERT_TRUE(s.ok()) << s.status();
  const TensorInfo& t = (*s)->index().tensors[0];
  std::string buf(t.nbytes, '\0');
  ASSERT_TRUE((*s)->Read(t, 0, t.nbytes, buf.data()).ok());
  EXPECT_EQ(buf[t.nbytes - 1], 1);
  EXPECT_TRUE((*s)->CheckUnchanged().ok());

  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(t.offset + t.nbytes / 2)), 0);
  absl::Status read = (*s)->Read(t, 0, t.nbytes, buf.data());
  EXPECT_TRUE(absl::IsDataLoss(read)) << read;
  EXPECT_NE(read.message().find("tensor 'big'"), std::string::npos) << read;
  absl::Status changed = (*s)->CheckUnchanged();
  EXPECT_TRUE(absl::IsDataLoss(changed)) << changed;
  EXPECT_NE(changed.message().find("m.safetensors"), std::string::npos) << changed;
}

absl::Status PickleError(const std::string& bytes) {
  return ParsePickle(bytes, "test.pkl").status();
}

TEST(PickleReaderTest, EveryMalformedProgramIsDataLoss) {
  struct Case {
    const char* name;
    std::string bytes;
    const char* message;
  };
  for (const Case& c : {
           Case{"empty", "", "ends without STOP"},
           Case{"no STOP", "\x80\x02}", "ends without STOP"},
           Case{"unknown opcode", "\x80\x02\xff.", "unsupported opcode 0xff"},
           Case{"stack underflow",
                "\x80\x02"
                "0.",
                "stack underflow"},
           Case{"missing MARK", "\x80\x02]e.", "missing MARK"},
           Case{"memo miss", "\x80\x02h\x05.", "memo entry 5 was never stored"},
           Case{"string past the end",
                std::string("\x80\x02X\xff\xff\xff\x7f"
                            "ab.",
                            10),
                "string runs past the end"},
           Case{"odd SETITEMS", "\x80\x02}(K\x01u.", "odd number"},
           Case{"two values at STOP", "\x80\x02NN.", "malformed stack"},
           Case{"append to an int",
                "\x80\x02K\x01K\x02"
                "a.",
                "cannot add items to a int"},
           Case{"truncated BININT", "\x80\x02J\x01", "truncated BININT"},
       }) {
    absl::Status s = PickleError(c.bytes);
    EXPECT_TRUE(absl::IsDataLoss(s)) << c.name << ": " << s;
    EXPECT_NE(s.message().find("test.pkl"), std::string::npos) << s;
    EXPECT_NE(s.message().find(c.message), std::string::npos) << c.name << ": " << s;
  }
}

TEST(PickleReaderTest, NeverExecutesAndKeepsUnknownClassesInert) {
  // os.system("echo pwned") as a pickle: GLOBAL, the argument tuple, REDUCE.
  const std::string evil = std::string("\x80\x02") + "cos\nsystem\n" +
                           std::string("X\x0a\x00\x00\x00", 5) + "echo pwned" + "\x85R.";
  absl::StatusOr<std::unique_ptr<PickleDocument>> doc = ParsePickle(evil, "evil.pkl");
  ASSERT_TRUE(doc.ok()) << doc.status();
  const PickleValue& root = (*doc)->root();
  EXPECT_EQ(root.kind, PickleValue::Kind::kObject);
  EXPECT_EQ(root.TypeName(), "os.system");
  ASSERT_EQ(root.items.size(), 1u);
  EXPECT_EQ(root.items[0]->text, "echo pwned");
}

TEST(PickleReaderTest, SelfReferencesAreFine) {
  // l = []; l.append(l): EMPTY_LIST, BINPUT 0, BINGET 0, APPEND.
  absl::StatusOr<std::unique_ptr<PickleDocument>> doc =
      ParsePickle(std::string("\x80\x02]q\x00h\x00"
                              "a.",
                              9),
                  "cycle.pkl");
  ASSERT_TRUE(doc.ok()) << doc.status();
  EXPECT_EQ((*doc)->root().items.size(), 1u);
  EXPECT_EQ((*doc)->root().items[0], &(*doc)->root());
}

}  // namespace
}  // namespace metaload::core
