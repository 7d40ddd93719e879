// The float8 codec (float8.h): the formats' edge cases as a table, rounding checked against a
// brute-force nearest search, and the tensor conversions (CPU loops and the device-generic ATen
// path, run here on the CPU) against the scalar codec.
#include "server/core/float8.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "server/core/float8_convert.h"
#include "server/core/half.h"

namespace metaload::core {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct EncodeCase {
  DType format;
  float value;
  uint8_t bits;
};

TEST(Float8Test, EncodingEdgeCases) {
  const EncodeCase cases[] = {
      // E4M3 (fn): bias 7, largest finite 448, smallest subnormal 2^-9, no infinity.
      {DType::kFloat8E4M3, 0.0f, 0x00},
      {DType::kFloat8E4M3, -0.0f, 0x80},
      {DType::kFloat8E4M3, 1.0f, 0x38},
      {DType::kFloat8E4M3, -2.0f, 0xc0},
      {DType::kFloat8E4M3, 1.0625f, 0x38},  // halfway 1 / 1.125: ties to even (1)
      {DType::kFloat8E4M3, 1.1875f, 0x3a},  // halfway 1.125 / 1.25: ties to even (1.25)
      {DType::kFloat8E4M3, 1.07f, 0x39},    // above halfway: up
      {DType::kFloat8E4M3, 448.0f, 0x7e},
      {DType::kFloat8E4M3, 464.0f, 0x7e},  // would round to 480 (the NaN code): saturates
      {DType::kFloat8E4M3, 1e9f, 0x7e},    // overflow saturates
      {DType::kFloat8E4M3, -1e9f, 0xfe},
      {DType::kFloat8E4M3, kInf, 0x7e},  // no infinity: saturates
      {DType::kFloat8E4M3, -kInf, 0xfe},
      {DType::kFloat8E4M3, kNaN, 0x7f},
      {DType::kFloat8E4M3, 0x1p-6f, 0x08},     // smallest normal
      {DType::kFloat8E4M3, 0x7p-9f, 0x07},     // largest subnormal
      {DType::kFloat8E4M3, 0x1p-9f, 0x01},     // smallest subnormal
      {DType::kFloat8E4M3, 0x1p-10f, 0x00},    // half of it: ties to even (0)
      {DType::kFloat8E4M3, 0x3p-10f, 0x02},    // 1.5 steps: ties to even (2)
      {DType::kFloat8E4M3, 0x1.8p-10f, 0x01},  // 0.75 steps: up
      {DType::kFloat8E4M3, -0x1p-12f, 0x80},   // underflow keeps the sign
      {DType::kFloat8E4M3, 0x1.ep-7f, 0x08},   // 7.5 subnormal steps: ties to even (8, normal)
      // E5M2: bias 15, largest finite 57344, smallest subnormal 2^-16, infinities.
      {DType::kFloat8E5M2, 0.0f, 0x00},
      {DType::kFloat8E5M2, -0.0f, 0x80},
      {DType::kFloat8E5M2, 1.0f, 0x3c},
      {DType::kFloat8E5M2, 1.125f, 0x3c},  // halfway 1 / 1.25: ties to even (1)
      {DType::kFloat8E5M2, 1.375f, 0x3e},  // halfway 1.25 / 1.5: ties to even (1.5)
      {DType::kFloat8E5M2, 57344.0f, 0x7b},
      {DType::kFloat8E5M2, 61440.0f, 0x7b},  // would round to infinity: saturates
      {DType::kFloat8E5M2, 1e9f, 0x7b},
      {DType::kFloat8E5M2, kInf, 0x7c},
      {DType::kFloat8E5M2, -kInf, 0xfc},
      {DType::kFloat8E5M2, kNaN, 0x7f},
      {DType::kFloat8E5M2, 0x1p-14f, 0x04},  // smallest normal
      {DType::kFloat8E5M2, 0x1p-16f, 0x01},  // smallest subnormal
      {DType::kFloat8E5M2, 0x1p-17f, 0x00},  // half of it: ties to even (0)
      {DType::kFloat8E5M2, 0x3p-17f, 0x02},  // 1.5 steps: ties to even (2)
  };
  for (const EncodeCase& c : cases) {
    EXPECT_EQ(FloatToFloat8Bits(c.value, c.format), c.bits)
        << DTypeName(c.format) << " " << c.value;
  }
  EXPECT_EQ(FloatToFloat8Bits(-kNaN, DType::kFloat8E4M3), 0xff);  // NaN keeps its sign
}

TEST(Float8Test, DecodingEdgeCases) {
  const std::array<float, 256>& e4m3 = Float8Table(DType::kFloat8E4M3);
  const std::array<float, 256>& e5m2 = Float8Table(DType::kFloat8E5M2);
  EXPECT_EQ(e4m3[0x7e], 448.0f);
  EXPECT_EQ(e4m3[0xfe], -448.0f);
  EXPECT_TRUE(std::isnan(e4m3[0x7f]));
  EXPECT_TRUE(std::isnan(e4m3[0xff]));
  EXPECT_EQ(e4m3[0x01], 0x1p-9f);
  EXPECT_EQ(e4m3[0x08], 0x1p-6f);
  EXPECT_EQ(e4m3[0x38], 1.0f);
  EXPECT_TRUE(std::signbit(e4m3[0x80]) && e4m3[0x80] == 0.0f);
  EXPECT_EQ(e4m3[0x78], 256.0f);  // exponent 15 is finite in E4M3 (fn)
  EXPECT_EQ(e5m2[0x7b], 57344.0f);
  EXPECT_EQ(e5m2[0x7c], kInf);
  EXPECT_EQ(e5m2[0xfc], -kInf);
  for (int b : {0x7d, 0x7e, 0x7f, 0xfd, 0xfe, 0xff}) EXPECT_TRUE(std::isnan(e5m2[b])) << b;
  EXPECT_EQ(e5m2[0x01], 0x1p-16f);
  EXPECT_EQ(e5m2[0x3c], 1.0f);
  int e4m3_nans = 0, e5m2_nans = 0;
  for (int b = 0; b < 256; ++b) {
    e4m3_nans += std::isnan(e4m3[b]);
    e5m2_nans += std::isnan(e5m2[b]);
  }
  EXPECT_EQ(e4m3_nans, 2);
  EXPECT_EQ(e5m2_nans, 6);
}

// Every value decodes and encodes back to itself; every value is exact in float16.
TEST(Float8Test, EveryValueRoundTripsAndIsExactInFloat16) {
  for (DType format : {DType::kFloat8E4M3, DType::kFloat8E5M2}) {
    const std::array<float, 256>& table = Float8Table(format);
    for (int b = 0; b < 256; ++b) {
      const float v = table[b];
      if (std::isnan(v)) continue;
      EXPECT_EQ(FloatToFloat8Bits(v, format), b) << DTypeName(format) << " " << b;
      const at::Tensor h = at::scalar_tensor(v, at::kFloat).to(at::kHalf).to(at::kFloat);
      EXPECT_EQ(h.item<float>(), v) << DTypeName(format) << " " << b;
    }
  }
}

// The nearest representable value, ties to the even code, saturating: brute force over the
// table for every finite float16 value and a spread of float32 ones.
uint8_t NearestByBruteForce(float v, DType format) {
  const std::array<float, 256>& table = Float8Table(format);
  const float max_finite = format == DType::kFloat8E4M3 ? 448.0f : 57344.0f;
  const float a = std::min(std::fabs(v), max_finite);
  int best = -1;
  double best_distance = 0;
  for (int b = 0; b < 128; ++b) {
    if (!std::isfinite(table[b])) continue;
    const double d = std::fabs(static_cast<double>(table[b]) - a);
    if (best < 0 || d < best_distance || (d == best_distance && (b & 1) == 0)) {
      best = b;
      best_distance = d;
    }
  }
  return static_cast<uint8_t>(best | (std::signbit(v) ? 0x80 : 0));
}

std::vector<float> TestValues() {
  std::vector<float> values;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00) continue;  // half infinities and NaNs
    const at::Tensor t = at::scalar_tensor(0.0, at::kHalf);
    uint16_t bits = static_cast<uint16_t>(h);
    std::memcpy(t.data_ptr(), &bits, 2);
    values.push_back(t.to(at::kFloat).item<float>());
  }
  at::manual_seed(5);
  const at::Tensor r = at::randn({20000}) * at::pow(2.0, at::randint(-24, 20, {20000}));
  for (int64_t i = 0; i < r.numel(); ++i) values.push_back(r[i].item<float>());
  return values;
}

TEST(Float8Test, EncodingIsTheNearestValueTiesToEven) {
  const std::vector<float> values = TestValues();
  for (DType format : {DType::kFloat8E4M3, DType::kFloat8E5M2}) {
    int wrong = 0;
    for (float v : values) {
      const uint8_t got = FloatToFloat8Bits(v, format);
      const uint8_t want = NearestByBruteForce(v, format);
      if (got != want && ++wrong <= 5) {
        ADD_FAILURE() << DTypeName(format) << " " << v << ": " << int{got} << " vs " << int{want};
      }
    }
    EXPECT_EQ(wrong, 0) << DTypeName(format);
  }
}

TEST(Float8Test, TensorConversionsMatchTheCodecOnBothPaths) {
  const std::vector<float> list = TestValues();
  at::Tensor values = at::from_blob(const_cast<float*>(list.data()),
                                    {static_cast<int64_t>(list.size())}, at::kFloat)
                          .clone();
  values = at::cat({values, at::tensor({kInf, -kInf, kNaN, -0.0f, 1e30f, -1e30f})});
  for (DType format : {DType::kFloat8E4M3, DType::kFloat8E5M2}) {
    at::Tensor want = at::empty(values.sizes(), at::kByte);
    for (int64_t i = 0; i < values.numel(); ++i) {
      want.data_ptr<uint8_t>()[i] = FloatToFloat8Bits(values.data_ptr<float>()[i], format);
    }
    at::Tensor loop = at::empty(values.sizes(), at::kByte);
    EncodeFloat8(values, format, loop);
    EXPECT_TRUE(at::equal(loop, want)) << DTypeName(format);
    EXPECT_TRUE(at::equal(EncodeFloat8WithTensorOps(values, format), want)) << DTypeName(format);
    // From float16 and bfloat16 sources: the codec of their (exact) float32 values.
    for (at::ScalarType narrow : {at::kHalf, at::kBFloat16}) {
      const at::Tensor src = values.to(narrow);
      at::Tensor from_wide = at::empty(values.sizes(), at::kByte);
      EncodeFloat8(src.to(at::kFloat), format, from_wide);
      at::Tensor direct = at::empty(values.sizes(), at::kByte);
      EncodeFloat8(src, format, direct);
      EXPECT_TRUE(at::equal(direct, from_wide)) << DTypeName(format) << " " << narrow;
    }

    const at::Tensor bytes = at::arange(256, at::kInt).to(at::kByte);
    at::Tensor decoded = at::empty({256}, at::kFloat);
    DecodeFloat8(bytes, format, decoded);
    const at::Tensor via_ops = DecodeFloat8WithTensorOps(bytes, format, at::kFloat);
    const std::array<float, 256>& table = Float8Table(format);
    for (int b = 0; b < 256; ++b) {
      const float d = decoded.data_ptr<float>()[b], o = via_ops.data_ptr<float>()[b];
      if (std::isnan(table[b])) {
        EXPECT_TRUE(std::isnan(d) && std::isnan(o)) << b;
      } else {
        EXPECT_EQ(d, table[b]) << b;
        EXPECT_EQ(o, table[b]) << b;
      }
    }
    at::Tensor half = at::empty({256}, at::kHalf);
    DecodeFloat8(bytes, format, half);
    EXPECT_TRUE(at::allclose(half.to(at::kFloat), decoded, 0, 0, /*equal_nan=*/true));
  }
}

TEST(Float8Test, ConvertTensorBetweenEveryPair) {
  at::manual_seed(9);
  const at::Tensor x = at::randn({4096}) * 8;
  at::Tensor e4m3 = at::empty({4096}, at::kByte), e5m2 = at::empty({4096}, at::kByte);
  ConvertTensor(x, DType::kFloat32, e4m3, DType::kFloat8E4M3);
  ConvertTensor(x, DType::kFloat32, e5m2, DType::kFloat8E5M2);
  // e4m3 -> e5m2 equals decode-then-encode.
  at::Tensor wide = at::empty({4096}, at::kFloat);
  DecodeFloat8(e4m3, DType::kFloat8E4M3, wide);
  at::Tensor want = at::empty({4096}, at::kByte), got = at::empty({4096}, at::kByte);
  EncodeFloat8(wide, DType::kFloat8E5M2, want);
  ConvertTensor(e4m3, DType::kFloat8E4M3, got, DType::kFloat8E5M2);
  EXPECT_TRUE(at::equal(got, want));
  // Plain dtypes: copy_.
  at::Tensor h = at::empty({4096}, at::kHalf);
  ConvertTensor(x, DType::kFloat32, h, DType::kFloat16);
  EXPECT_TRUE(at::equal(h, x.to(at::kHalf)));
  // Decoding is within half a step of the source: E4M3 has 3 mantissa bits.
  EXPECT_LE(((wide - x).abs() / x.abs().clamp_min(0x1p-6)).max().item<float>(), 1.0f / 16);
  EXPECT_THROW(EncodeFloat8(x, DType::kFloat16, e4m3), std::invalid_argument);
  EXPECT_THROW(EncodeFloat8(x, DType::kFloat8E4M3, at::empty({4095}, at::kByte)),
               std::invalid_argument);
}

}  // namespace
}  // namespace metaload::core
