// The two 8-bit floating-point formats of the OCP specification (OFP8, revision 1.0), as
// safetensors names them (F8_E4M3, F8_E5M2) and PyTorch (float8_e4m3fn, float8_e5m2):
//
//   E4M3 (the "fn" variant: finite, no infinities): sign, 4 exponent bits (bias 7), 3 mantissa
//        bits. Largest finite value 448 (0x7e), smallest normal 2^-6, smallest subnormal 2^-9.
//        S.1111.111 (0x7f, 0xff) is NaN; there is no infinity.
//   E5M2 (IEEE-like; float16's top byte): sign, 5 exponent bits (bias 15), 2 mantissa bits.
//        Largest finite value 57344 (0x7b), smallest normal 2^-14, smallest subnormal 2^-16.
//        0x7c/0xfc are infinities, 0x7d-0x7f (and with the sign) NaNs.
//
// Decoding is exact in float32 and in float16 (every value of both formats is a float16 value),
// through a 256-entry table. Encoding (float32 to float8), as metaload converts weights at load:
//   - round to nearest, ties to even, on the format's grid, subnormals included;
//   - a finite value beyond the largest finite one saturates to it (±448, ±57344): the OCP
//     "saturating" conversion, so a weight never turns into an infinity or a NaN for being
//     slightly too large (PyTorch's own cast gives NaN for E4M3 and infinity for E5M2 there);
//   - ±infinity: ±448 in E4M3 (it has none), ±infinity in E5M2;
//   - NaN: NaN (0x7f, with the input's sign); -0 stays -0 (0x80); values below half the
//     smallest subnormal round to ±0.
// Header-only and LibTorch-free, for the loader, the synthesizer and their tests.
#ifndef METALOAD_SERVER_CORE_FLOAT8_H_
#define METALOAD_SERVER_CORE_FLOAT8_H_

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "server/core/dtype.h"

namespace metaload::core {

// A format's parameters, the one place they are written down.
struct Float8Format {
  int mantissa_bits;
  int bias;
  uint8_t max_finite;  // the code of the largest finite value
  float max_value;     // its value
  bool has_infinity;
};
inline constexpr Float8Format kE4M3 = {3, 7, 0x7e, 448.0f, false};
inline constexpr Float8Format kE5M2 = {2, 15, 0x7b, 57344.0f, true};
// `format`: kFloat8E4M3 or kFloat8E5M2.
constexpr const Float8Format& Float8FormatOf(DType format) {
  return format == DType::kFloat8E4M3 ? kE4M3 : kE5M2;
}

namespace float8_internal {

// Branch-free (both roundings computed, one selected) so that loops over it vectorize: weights
// sit on both sides of the subnormal boundary, and a branch there mispredicts.
template <int kMantissa, int kBias, uint8_t kMaxFinite, bool kHasInfinity>
inline uint8_t Encode(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t abs = bits & 0x7fffffffu;
  // Normal: rebias the exponent and round the mantissa from 23 bits, ties to even; a carry moves
  // into the exponent. (Wraps for subnormal inputs, whose code comes from below instead.)
  uint32_t r = abs - (static_cast<uint32_t>(127 - kBias) << 23);
  r += ((1u << (22 - kMantissa)) - 1) + ((r >> (23 - kMantissa)) & 1u);
  const uint32_t normal = r >> (23 - kMantissa);
  // Subnormal (or zero): adding 2^(1 - bias + 23 - mantissa) leaves the value's multiple of the
  // subnormal step in the low bits, rounded to nearest even by the float addition; a result of
  // 2^mantissa is the smallest normal's code.
  constexpr uint32_t kMagicBits = static_cast<uint32_t>(127 - kBias + 23 - kMantissa + 1) << 23;
  float magic, a;
  std::memcpy(&magic, &kMagicBits, 4);
  std::memcpy(&a, &abs, 4);
  const float sum = a + magic;
  uint32_t sum_bits;
  std::memcpy(&sum_bits, &sum, 4);
  const uint32_t subnormal = sum_bits - kMagicBits;
  constexpr uint32_t kMinNormal = static_cast<uint32_t>(127 + 1 - kBias) << 23;
  auto select = [](bool take_a, uint32_t a_value, uint32_t b_value) {  // bitwise, no branch
    const uint32_t mask = 0u - static_cast<uint32_t>(take_a);
    return (a_value & mask) | (b_value & ~mask);
  };
  uint32_t code = select(abs < kMinNormal, subnormal, normal);
  code = select(code > kMaxFinite, kMaxFinite, code);  // saturate (E4M3 also maps inf here)
  if (kHasInfinity) code = select(abs == 0x7f800000u, 0x7cu, code);
  code = select(abs > 0x7f800000u, 0x7fu, code);  // NaN
  return static_cast<uint8_t>(sign | code);
}

template <int kMantissa, int kBias, bool kHasInfinity>
inline float Decode(uint8_t byte) {
  const int exponent = (byte & 0x7f) >> kMantissa;
  const int mantissa = byte & ((1 << kMantissa) - 1);
  const float sign = (byte & 0x80) ? -1.0f : 1.0f;
  constexpr int kTopExponent = (0x7f >> kMantissa);
  if (kHasInfinity && exponent == kTopExponent) {
    return mantissa == 0 ? sign * std::numeric_limits<float>::infinity()
                         : std::numeric_limits<float>::quiet_NaN();
  }
  if (!kHasInfinity && (byte & 0x7f) == 0x7f) return std::numeric_limits<float>::quiet_NaN();
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), 1 - kBias - kMantissa);
  return sign *
         std::ldexp(static_cast<float>((1 << kMantissa) + mantissa), exponent - kBias - kMantissa);
}

template <int kMantissa, int kBias, bool kHasInfinity>
std::array<float, 256> MakeTable() {
  std::array<float, 256> table{};
  for (int b = 0; b < 256; ++b) {
    table[b] = Decode<kMantissa, kBias, kHasInfinity>(static_cast<uint8_t>(b));
  }
  return table;
}

}  // namespace float8_internal

inline uint8_t FloatToFloat8E4M3Bits(float value) {
  return float8_internal::Encode<kE4M3.mantissa_bits, kE4M3.bias, kE4M3.max_finite,
                                 kE4M3.has_infinity>(value);
}
inline uint8_t FloatToFloat8E5M2Bits(float value) {
  return float8_internal::Encode<kE5M2.mantissa_bits, kE5M2.bias, kE5M2.max_finite,
                                 kE5M2.has_infinity>(value);
}
// `format`: kFloat8E4M3 or kFloat8E5M2.
inline uint8_t FloatToFloat8Bits(float value, DType format) {
  return format == DType::kFloat8E4M3 ? FloatToFloat8E4M3Bits(value) : FloatToFloat8E5M2Bits(value);
}

// Every byte's value in `format` (kFloat8E4M3 or kFloat8E5M2), as float32.
inline const std::array<float, 256>& Float8Table(DType format) {
  static const std::array<float, 256> e4m3 =
      float8_internal::MakeTable<kE4M3.mantissa_bits, kE4M3.bias, kE4M3.has_infinity>();
  static const std::array<float, 256> e5m2 =
      float8_internal::MakeTable<kE5M2.mantissa_bits, kE5M2.bias, kE5M2.has_infinity>();
  return format == DType::kFloat8E4M3 ? e4m3 : e5m2;
}

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_FLOAT8_H_
