#include "server/core/half.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <random>
#include <vector>

#include "tests/test_util.h"

namespace metaload::core {
namespace {

// Every conversion must give the bits torch gives: edge cases (zeros, subnormals, rounding ties,
// overflow, infinities, NaN) plus a million random bit patterns.
TEST(HalfTest, MatchesTorchBitForBit) {
  std::vector<float> values = {0.0f,
                               -0.0f,
                               1.0f,
                               -1.0f,
                               65504.0f,
                               65520.0f,
                               65519.99f,
                               1e-8f,
                               5.96e-8f,
                               2.98e-8f,
                               6.1e-5f,
                               6.0e-5f,
                               1.0009765625f,
                               1.00048828125f,
                               1.00146484375f,
                               3.14159265f,
                               1e38f,
                               -1e38f,
                               std::numeric_limits<float>::infinity(),
                               -std::numeric_limits<float>::infinity(),
                               std::numeric_limits<float>::denorm_min(),
                               std::numeric_limits<float>::min()};
  std::mt19937 rng(7);
  for (int i = 0; i < 1'000'000; ++i) {
    uint32_t bits = rng();
    float f;
    std::memcpy(&f, &bits, 4);
    if (std::isnan(f)) continue;  // NaN payloads differ legitimately; NaN-ness is checked below
    values.push_back(f);
  }
  testing::TempDir dir;
  std::ofstream(dir / "in.f32", std::ios::binary)
      .write(reinterpret_cast<const char*>(values.data()),
             static_cast<std::streamsize>(values.size() * 4));
  const std::string script =
      "import sys, torch\n"
      "x = torch.frombuffer(bytearray(open(sys.argv[1], 'rb').read()), dtype=torch.float32)\n"
      "open(sys.argv[2], 'wb').write(x.half().view(torch.int16).numpy().tobytes())\n"
      "open(sys.argv[3], 'wb').write(x.bfloat16().view(torch.int16).numpy().tobytes())\n";
  testing::CommandResult r = testing::RunCommand(
      {METALOAD_PYTHON, "-c", script, dir / "in.f32", dir / "out.f16", dir / "out.bf16"},
      dir / "py");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string f16 = testing::ReadFileOrEmpty(dir / "out.f16");
  const std::string bf16 = testing::ReadFileOrEmpty(dir / "out.bf16");
  ASSERT_EQ(f16.size(), values.size() * 2);
  ASSERT_EQ(bf16.size(), values.size() * 2);
  size_t mismatches = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    uint16_t want_h, want_b;
    std::memcpy(&want_h, f16.data() + 2 * i, 2);
    std::memcpy(&want_b, bf16.data() + 2 * i, 2);
    if (FloatToHalfBits(values[i]) != want_h || FloatToBFloat16Bits(values[i]) != want_b) {
      if (++mismatches <= 5) {
        ADD_FAILURE() << "value " << values[i] << ": half " << FloatToHalfBits(values[i])
                      << " vs torch " << want_h << ", bf16 " << FloatToBFloat16Bits(values[i])
                      << " vs torch " << want_b;
      }
    }
  }
  EXPECT_EQ(mismatches, 0u);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(FloatToHalfBits(nan) & 0x7c00, 0x7c00);
  EXPECT_NE(FloatToHalfBits(nan) & 0x03ff, 0);
  EXPECT_EQ(FloatToBFloat16Bits(nan) & 0x7f80, 0x7f80);
  EXPECT_NE(FloatToBFloat16Bits(nan) & 0x007f, 0);
}

}  // namespace
}  // namespace metaload::core
