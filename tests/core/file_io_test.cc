#include "server/core/file_io.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include "tests/test_util.h"

namespace metaload::core {
namespace {

class FileIoTest : public ::testing::Test {
 protected:
  // A file holding `bytes`, opened for reading.
  int OpenWith(const std::string& bytes) {
    const std::string path = dir_ / "f";
    const int w = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    EXPECT_GE(w, 0);
    EXPECT_EQ(WriteFully(w, bytes.data(), bytes.size()), 0);
    ::close(w);
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    EXPECT_GE(fd_, 0);
    return fd_;
  }
  ~FileIoTest() override {
    if (fd_ >= 0) ::close(fd_);
  }

  testing::TempDir dir_;
  int fd_ = -1;
};

TEST_F(FileIoTest, AWholeRangeIsReadAtItsOffset) {
  std::string bytes(3 << 20, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 7 + i / 4096);
  const int fd = OpenWith(bytes);
  std::string out(1 << 20, '\0');
  ASSERT_EQ(PreadFully(fd, out.data(), out.size(), 12345), 0);
  EXPECT_EQ(out, bytes.substr(12345, out.size()));
  EXPECT_EQ(PreadFully(fd, out.data(), 0, bytes.size()), 0);  // nothing asked, at the end
}

TEST_F(FileIoTest, AFileShorterThanTheRangeIsEndOfFileNotAnError) {
  const int fd = OpenWith(std::string(100, 'x'));
  std::string out(64, '\0');
  EXPECT_EQ(PreadFully(fd, out.data(), 64, 50), kEndOfFile);  // 50 there, 64 asked
  EXPECT_EQ(PreadFully(fd, out.data(), 1, 100), kEndOfFile);
  EXPECT_EQ(IoErrorMessage(kEndOfFile), "file ended early");
}

TEST_F(FileIoTest, ABadDescriptorGivesItsErrno) {
  char byte = 0;
  EXPECT_EQ(PreadFully(-1, &byte, 1, 0), EBADF);
  EXPECT_EQ(WriteFully(-1, &byte, 1), EBADF);
  EXPECT_EQ(IoErrorMessage(EBADF), "Bad file descriptor");
  const int fd = OpenWith("abc");
  EXPECT_EQ(WriteFully(fd, "z", 1), EBADF);  // opened read-only
}

}  // namespace
}  // namespace metaload::core
