#include "server/core/checksum_store.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include "tests/test_util.h"

namespace metaload::core {
namespace {

CheckpointFile Stat(const std::string& path) {
  struct stat st;
  EXPECT_EQ(::stat(path.c_str(), &st), 0);
  CheckpointFile f;
  f.path = path;
  f.size = static_cast<uint64_t>(st.st_size);
  f.mtime_ns = st.st_mtim.tv_sec * 1'000'000'000LL + st.st_mtim.tv_nsec;
  return f;
}

std::string PythonSha256(const testing::TempDir& dir, const std::vector<std::string>& paths) {
  std::vector<std::string> argv = {METALOAD_PYTHON, "-c",
                                   "import hashlib, sys\n"
                                   "h = hashlib.sha256()\n"
                                   "for p in sys.argv[1:]: h.update(open(p, 'rb').read())\n"
                                   "print(h.hexdigest())\n"};
  argv.insert(argv.end(), paths.begin(), paths.end());
  testing::CommandResult r = testing::RunCommand(argv, dir / "py");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out.substr(0, 64);
}

class ChecksumStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string big(9 << 20, '\0');
    for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 2654435761u) >> 13);
    std::ofstream(dir_ / "a.bin", std::ios::binary) << big;
    std::ofstream(dir_ / "b.bin", std::ios::binary) << "second shard";
    files_ = {Stat(dir_ / "a.bin"), Stat(dir_ / "b.bin")};
  }
  testing::TempDir dir_;
  std::vector<CheckpointFile> files_;
};

TEST_F(ChecksumStoreTest, MatchesPythonAndPersists) {
  ChecksumStore::Options options;
  options.state_dir = dir_ / "state";
  absl::StatusOr<std::unique_ptr<ChecksumStore>> store = ChecksumStore::Create(options);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_FALSE((*store)->Lookup(files_).has_value());
  absl::StatusOr<std::string> sha = (*store)->Compute(files_);
  ASSERT_TRUE(sha.ok()) << sha.status();
  EXPECT_EQ(*sha, PythonSha256(dir_, {dir_ / "a.bin", dir_ / "b.bin"}));
  EXPECT_EQ(ChecksumStore::ShortHash(*sha), sha->substr(0, 10));
  EXPECT_EQ((*store)->Lookup(files_), *sha);

  // A new store (a restarted daemon) remembers it without reading the files.
  absl::StatusOr<std::unique_ptr<ChecksumStore>> again = ChecksumStore::Create(options);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->Lookup(files_), *sha);

  // A rewritten file is a different key.
  std::vector<CheckpointFile> changed = files_;
  changed[1].mtime_ns += 1;
  EXPECT_FALSE((*again)->Lookup(changed).has_value());
  // A single file hashes like sha256sum.
  absl::StatusOr<std::string> one = (*again)->Compute({files_[1]});
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(*one, PythonSha256(dir_, {dir_ / "b.bin"}));
}

TEST_F(ChecksumStoreTest, UnwritableStateStillHashes) {
  ChecksumStore::Options options;
  options.state_dir = dir_ / "state";
  // checksums.json is a directory: the atomic rename fails, as it would on a full disk.
  std::filesystem::create_directories(dir_ / "state/checksums.json/x");
  absl::StatusOr<std::unique_ptr<ChecksumStore>> store = ChecksumStore::Create(options);
  ASSERT_TRUE(store.ok());
  absl::StatusOr<std::string> sha = (*store)->Compute(files_);
  ASSERT_TRUE(sha.ok()) << sha.status();
  EXPECT_EQ((*store)->Lookup(files_), *sha);
  EXPECT_FALSE(std::filesystem::exists(dir_ / "state/checksums.json.tmp"));
}

// Hostile: whoever can write --state_dir plants checksums.json.tmp as a symlink to a file the
// daemon may write. Before the fix the daemon truncated and wrote through it (the full-disk fault
// test relied on exactly that, with a link to /dev/full).
TEST_F(ChecksumStoreTest, APlantedSymlinkAtTheTempFileIsNotFollowed) {
  std::filesystem::create_directories(dir_ / "state");
  std::ofstream(dir_ / "victim") << "precious";
  std::filesystem::create_symlink(dir_ / "victim", dir_ / "state/checksums.json.tmp");
  ChecksumStore::Options options;
  options.state_dir = dir_ / "state";
  absl::StatusOr<std::unique_ptr<ChecksumStore>> store = ChecksumStore::Create(options);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Compute(files_).ok());
  EXPECT_EQ(testing::ReadFileOrEmpty(dir_ / "victim"), "precious");
  EXPECT_FALSE(std::filesystem::is_symlink(dir_ / "state/checksums.json"));
  EXPECT_NE(testing::ReadFileOrEmpty(dir_ / "state/checksums.json").find("a.bin"),
            std::string::npos);
}

// The hash is of the file the load checked: a path swapped for another file since is refused.
TEST_F(ChecksumStoreTest, AFileSwappedSinceTheLoadIsNotHashed) {
  struct stat st;
  ASSERT_EQ(::stat((dir_ / "b.bin").c_str(), &st), 0);
  std::vector<CheckpointFile> files = files_;
  files[1].device = static_cast<uint64_t>(st.st_dev);
  files[1].inode = static_cast<uint64_t>(st.st_ino);
  std::ofstream(dir_ / "other.bin") << "second shard";  // same size
  std::filesystem::rename(dir_ / "other.bin", dir_ / "b.bin");
  absl::StatusOr<std::unique_ptr<ChecksumStore>> store = ChecksumStore::Create({});
  absl::Status s = (*store)->Compute(files).status();
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_NE(s.message().find("not the file that was loaded"), std::string::npos) << s;
}

TEST_F(ChecksumStoreTest, CancelAndTruncation) {
  absl::StatusOr<std::unique_ptr<ChecksumStore>> store = ChecksumStore::Create({});
  ASSERT_TRUE(store.ok());
  std::atomic<bool> cancel{true};
  EXPECT_TRUE(absl::IsCancelled((*store)->Compute(files_, &cancel).status()));
  std::vector<CheckpointFile> longer = files_;
  longer[1].size += 100;  // the file is shorter than recorded
  absl::Status s = (*store)->Compute(longer).status();
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_NE(s.message().find("b.bin"), std::string::npos);
}

}  // namespace
}  // namespace metaload::core
