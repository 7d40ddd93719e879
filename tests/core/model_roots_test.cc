// OpenChecked: regular files inside the roots open; symlinks out, FIFOs and directories do not,
// and a path swapped after the open cannot change what is read.
#include "server/core/model_roots.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>

#include "tests/test_util.h"

namespace metaload::core {
namespace {

namespace fs = std::filesystem;

class ModelRootsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(dir_ / "root/sub");
    fs::create_directories(dir_ / "rootish");
    std::ofstream(dir_ / "root/in.bin") << "inside";
    std::ofstream(dir_ / "outside.bin") << "outside";
    std::ofstream(dir_ / "rootish/near.bin") << "near";
    fs::create_symlink(dir_ / "outside.bin", dir_ / "root/out_link.bin");
    fs::create_symlink(dir_ / "root/in.bin", dir_ / "root/sub/in_link.bin");
    fs::create_symlink(dir_ / "rootish/near.bin", dir_ / "root/near_link.bin");
    ASSERT_EQ(::mkfifo((dir_ / "root/fifo").c_str(), 0644), 0);
    roots_ = ModelRoots({fs::canonical(dir_ / "root").string()});
  }
  testing::TempDir dir_;
  ModelRoots roots_;
};

TEST_F(ModelRootsTest, FilesAndLinksInsideOpen) {
  for (const char* name : {"root/in.bin", "root/sub/in_link.bin"}) {
    absl::StatusOr<CheckedFile> f = OpenChecked(dir_ / name, roots_);
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ(f->size, 6u);
    char buf[6];
    EXPECT_EQ(::pread(f->fd(), buf, 6, 0), 6);
    EXPECT_EQ(std::string(buf, 6), "inside");
  }
}

TEST_F(ModelRootsTest, LinksOutAreInvalidArgumentNamingThePathAsGiven) {
  // "rootish" shares the root's prefix: a string prefix test would let it through.
  for (const char* name : {"root/out_link.bin", "root/near_link.bin"}) {
    absl::StatusOr<CheckedFile> f = OpenChecked(dir_ / name, roots_);
    EXPECT_TRUE(absl::IsInvalidArgument(f.status())) << name << ": " << f.status();
    EXPECT_NE(f.status().message().find(name), std::string::npos) << f.status();
    EXPECT_EQ(f.status().message().find("outside.bin"), std::string::npos) << f.status();
    EXPECT_EQ(f.status().message().find("near.bin"), std::string::npos) << f.status();
  }
  // Without roots (local tools) the same link opens.
  EXPECT_TRUE(OpenChecked(dir_ / "root/out_link.bin", ModelRoots()).ok());
}

TEST_F(ModelRootsTest, FifosAndDirectoriesAreRefusedAtOnce) {
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<CheckedFile> fifo = OpenChecked(dir_ / "root/fifo", roots_);
  EXPECT_TRUE(absl::IsFailedPrecondition(fifo.status())) << fifo.status();
  EXPECT_NE(fifo.status().message().find("not a regular file"), std::string::npos);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  EXPECT_TRUE(absl::IsFailedPrecondition(OpenChecked(dir_ / "root/sub", roots_).status()));
  EXPECT_TRUE(absl::IsNotFound(OpenChecked(dir_ / "root/nope", roots_).status()));
}

// The check is on the descriptor: re-pointing the name afterwards changes nothing read.
TEST_F(ModelRootsTest, ASwapAfterTheCheckCannotRedirectTheRead) {
  fs::create_symlink(dir_ / "root/in.bin", dir_ / "root/swap.bin");
  absl::StatusOr<CheckedFile> f = OpenChecked(dir_ / "root/swap.bin", roots_);
  ASSERT_TRUE(f.ok()) << f.status();
  fs::remove(dir_ / "root/swap.bin");
  fs::create_symlink(dir_ / "outside.bin", dir_ / "root/swap.bin");
  char buf[6];
  ASSERT_EQ(::pread(f->fd(), buf, 6, 0), 6);
  EXPECT_EQ(std::string(buf, 6), "inside");
}

TEST(ModelRootsContainsTest, ComponentBoundaries) {
  ModelRoots roots({"/srv/models", "/data"});
  EXPECT_TRUE(roots.Contains("/srv/models"));
  EXPECT_TRUE(roots.Contains("/srv/models/a/b"));
  EXPECT_FALSE(roots.Contains("/srv/models2/a"));
  EXPECT_FALSE(roots.Contains("/srv"));
  EXPECT_TRUE(roots.Contains("/data/x"));
  EXPECT_TRUE(ModelRoots({"/"}).Contains("/etc/passwd"));
}

}  // namespace
}  // namespace metaload::core
