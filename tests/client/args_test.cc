#include "client/args.h"

#include <gtest/gtest.h>

namespace metaload::client {
namespace {

TEST(ArgsTest, ParsesValuesBooleansAndPositionals) {
  absl::StatusOr<Args> a =
      Args::Parse({"--arch=gpt2", "out", "--preset", "tiny", "--json", "--", "--not-a-flag"},
                  {"arch", "preset"}, {"json"});
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->Get("arch"), "gpt2");
  EXPECT_EQ(a->Get("preset"), "tiny");
  EXPECT_EQ(a->Get("json"), "true");
  EXPECT_EQ(a->Get("missing", "fallback"), "fallback");
  EXPECT_EQ(a->positionals(), (std::vector<std::string>{"out", "--not-a-flag"}));
}

TEST(ArgsTest, UsageErrorsNameTheFlag) {
  absl::Status unknown = Args::Parse({"--bogus=1"}, {"arch"}, {}).status();
  EXPECT_TRUE(absl::IsInvalidArgument(unknown));
  EXPECT_NE(unknown.message().find("--bogus"), std::string::npos);
  absl::Status no_value = Args::Parse({"--arch"}, {"arch"}, {}).status();
  EXPECT_NE(no_value.message().find("--arch needs a value"), std::string::npos);
  EXPECT_FALSE(Args::Parse({"--json=yes"}, {}, {"json"}).ok());
}

TEST(ArgsTest, IntegersAreChecked) {
  absl::StatusOr<Args> a = Args::Parse({"--shards=3", "--seed=x"}, {"shards", "seed"}, {});
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*a->GetInt("shards", 1), 3);
  EXPECT_EQ(*a->GetInt("absent", 9), 9);
  absl::Status bad = a->GetInt("seed", 0).status();
  EXPECT_NE(bad.message().find("--seed"), std::string::npos);
}

}  // namespace
}  // namespace metaload::client
