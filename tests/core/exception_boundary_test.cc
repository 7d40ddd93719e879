// The exception boundary: each kind of exception becomes the documented code, named by context.
#include "server/core/exception_boundary.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <stdexcept>

#include "absl/status/statusor.h"

namespace metaload::core {
namespace {

TEST(ExceptionBoundaryTest, EachKindMapsToItsCode) {
  EXPECT_TRUE(CatchExceptions("ctx", []() -> absl::Status { return absl::OkStatus(); }).ok());
  absl::Status bad_alloc = CatchExceptions("m", []() -> absl::Status { throw std::bad_alloc(); });
  EXPECT_TRUE(absl::IsResourceExhausted(bad_alloc)) << bad_alloc;
  EXPECT_EQ(bad_alloc.message(), "m: out of memory");

  // LibTorch's own errors: a CPU allocation that cannot be served, a meta tensor whose storage
  // size overflows, and a JSON value of the wrong type.
  absl::Status cpu = CatchExceptions("key 'w'", []() -> absl::Status {
    at::empty({int64_t{1} << 62}, at::kByte);
    return absl::OkStatus();
  });
  EXPECT_TRUE(absl::IsResourceExhausted(cpu)) << cpu;
  EXPECT_EQ(cpu.message().rfind("key 'w': out of memory", 0), 0u) << cpu;
  absl::StatusOr<int> overflow = CatchExceptions("mlp", []() -> absl::StatusOr<int> {
    at::empty({int64_t{1} << 40, int64_t{1} << 40}, at::TensorOptions().device(at::kMeta));
    return 1;
  });
  EXPECT_TRUE(absl::IsFailedPrecondition(overflow.status())) << overflow.status();
  EXPECT_NE(overflow.status().message().find("overflow"), std::string::npos);
  EXPECT_EQ(overflow.status().message().find("frame #"), std::string::npos)
      << "a backtrace: " << overflow.status();
  absl::Status json = CatchExceptions("config.json", []() -> absl::Status {
    nlohmann::json j = {{"a", 5}};
    (void)j.value("a", std::string());
    return absl::OkStatus();
  });
  EXPECT_TRUE(absl::IsFailedPrecondition(json)) << json;
  EXPECT_EQ(json.message().rfind("config.json: ", 0), 0u) << json;

  absl::Status code = CatchExceptions(
      "x", []() -> absl::Status { throw std::runtime_error("boom\nmore"); },
      absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::IsInvalidArgument(code));
  EXPECT_EQ(code.message(), "x: boom");
  absl::Status odd = CatchExceptions("x", []() -> absl::Status { throw 42; });
  EXPECT_TRUE(absl::IsInternal(odd)) << odd;
  absl::Status oom = CatchExceptions("cuda", []() -> absl::Status {
    throw c10::OutOfMemoryError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                                "CUDA out of memory. Tried to allocate 2.00 GiB");
  });
  EXPECT_TRUE(absl::IsResourceExhausted(oom)) << oom;
  EXPECT_NE(oom.message().find("Tried to allocate 2.00 GiB"), std::string::npos) << oom;
}

}  // namespace
}  // namespace metaload::core
