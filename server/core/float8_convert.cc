#include "server/core/float8_convert.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <stdexcept>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "server/core/float8.h"

namespace metaload::core {
namespace {

// Elements per task of a CPU conversion: big enough that a task costs more than its dispatch.
constexpr int64_t kGrain = int64_t{1} << 16;

void CheckFormat(DType format) {
  if (!IsFloat8(format)) {
    throw std::invalid_argument(
        absl::StrCat("not a float8 format: ", std::string(DTypeName(format))));
  }
}

void CheckSameCount(const at::Tensor& src, const at::Tensor& dst) {
  if (src.numel() != dst.numel() || src.device() != dst.device()) {
    throw std::invalid_argument(
        "float8 conversion: source and destination differ in size or device");
  }
}

// `fn(begin, end)` over [0, n), on LibTorch's intra-op threads.
template <typename Fn>
void ForEachRange(int64_t n, Fn fn) {
  at::parallel_for(0, n, kGrain, fn);
}

template <typename T>
void EncodeLoop(const at::Tensor& src, DType format, uint8_t* out) {
  const T* in = src.data_ptr<T>();
  ForEachRange(src.numel(), [&](int64_t begin, int64_t end) {
    if (format == DType::kFloat8E4M3) {
      for (int64_t i = begin; i < end; ++i)
        out[i] = FloatToFloat8E4M3Bits(static_cast<float>(in[i]));
    } else {
      for (int64_t i = begin; i < end; ++i)
        out[i] = FloatToFloat8E5M2Bits(static_cast<float>(in[i]));
    }
  });
}

template <typename T>
void DecodeLoop(const uint8_t* in, int64_t n, DType format, T* out) {
  const std::array<float, 256>& table = Float8Table(format);
  ForEachRange(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = static_cast<T>(table[in[i]]);
  });
}

}  // namespace

void EncodeFloat8(const at::Tensor& src, DType format, const at::Tensor& dst) {
  CheckFormat(format);
  CheckSameCount(src, dst);
  if (dst.scalar_type() != at::kByte)
    throw std::invalid_argument("float8 destination is not bytes");
  if (!src.is_cpu()) {
    dst.view({-1}).copy_(EncodeFloat8WithTensorOps(src, format).view({-1}));
    return;
  }
  const at::Tensor in = src.contiguous();
  at::Tensor out = dst.is_contiguous() ? dst : at::empty(dst.sizes(), dst.options());
  uint8_t* bytes = out.data_ptr<uint8_t>();
  switch (in.scalar_type()) {
    case at::kFloat:
      EncodeLoop<float>(in, format, bytes);
      break;
    case at::kHalf:
      EncodeLoop<at::Half>(in, format, bytes);
      break;
    case at::kBFloat16:
      EncodeLoop<at::BFloat16>(in, format, bytes);
      break;
    case at::kDouble:  // float64 -> float32 -> float8 rounds twice; weights are never that close
      EncodeLoop<float>(in.to(at::kFloat), format, bytes);
      break;
    default:
      throw std::invalid_argument(
          absl::StrCat("cannot convert ", c10::toString(in.scalar_type()), " to float8"));
  }
  if (!out.is_same(dst)) dst.copy_(out);
}

void DecodeFloat8(const at::Tensor& src, DType format, const at::Tensor& dst) {
  CheckFormat(format);
  CheckSameCount(src, dst);
  if (src.scalar_type() != at::kByte) throw std::invalid_argument("float8 source is not bytes");
  if (!src.is_cpu()) {
    dst.view({-1}).copy_(DecodeFloat8WithTensorOps(src, format, dst.scalar_type()).view({-1}));
    return;
  }
  const at::Tensor in = src.contiguous();
  at::Tensor out = dst.is_contiguous() ? dst : at::empty(dst.sizes(), dst.options());
  const uint8_t* bytes = in.data_ptr<uint8_t>();
  switch (out.scalar_type()) {
    case at::kFloat:
      DecodeLoop(bytes, in.numel(), format, out.data_ptr<float>());
      break;
    case at::kHalf:
      DecodeLoop(bytes, in.numel(), format, out.data_ptr<at::Half>());
      break;
    case at::kBFloat16:
      DecodeLoop(bytes, in.numel(), format, out.data_ptr<at::BFloat16>());
      break;
    case at::kDouble:
      DecodeLoop(bytes, in.numel(), format, out.data_ptr<double>());
      break;
    default:
      throw std::invalid_argument(
          absl::StrCat("cannot convert float8 to ", c10::toString(out.scalar_type())));
  }
  if (!out.is_same(dst)) dst.copy_(out);
}

void ConvertTensor(const at::Tensor& src, DType src_dtype, const at::Tensor& dst, DType dst_dtype) {
  if (!IsFloat8(src_dtype) && !IsFloat8(dst_dtype)) {
    dst.copy_(src);
  } else if (!IsFloat8(src_dtype)) {
    EncodeFloat8(src, dst_dtype, dst);
  } else if (!IsFloat8(dst_dtype)) {
    DecodeFloat8(src, src_dtype, dst);
  } else if (src_dtype == dst_dtype) {
    dst.copy_(src);
  } else if (src.is_cpu() && src.is_contiguous() && dst.is_contiguous()) {
    // One float8 format to the other: a byte-to-byte table, no wider scratch.
    std::array<uint8_t, 256> table;
    for (int b = 0; b < 256; ++b)
      table[b] = FloatToFloat8Bits(Float8Table(src_dtype)[b], dst_dtype);
    const uint8_t* in = src.data_ptr<uint8_t>();
    uint8_t* out = dst.data_ptr<uint8_t>();
    ForEachRange(src.numel(), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] = table[in[i]];
    });
  } else {  // through float32 (exact), on the device
    at::Tensor wide = at::empty(src.sizes(), src.options().dtype(at::kFloat));
    DecodeFloat8(src, src_dtype, wide);
    EncodeFloat8(wide, dst_dtype, dst);
  }
}

at::Tensor EncodeFloat8WithTensorOps(const at::Tensor& src, DType format) {
  CheckFormat(format);
  const bool e4m3 = format == DType::kFloat8E4M3;
  const int64_t mantissa = e4m3 ? 3 : 2;
  const int64_t bias = e4m3 ? 7 : 15;
  const double max_finite = e4m3 ? 448.0 : 57344.0;
  const at::Tensor x = src.to(at::kFloat);
  // |x| = m * 2^e with m in [0.5, 1): the float8 exponent is e - 1, at least the subnormals' own.
  const at::Tensor a = x.abs().clamp_max(max_finite);  // saturates (and maps +-inf to +-max)
  at::Tensor exponent = std::get<1>(at::frexp(a)).sub(1).clamp_min(1 - bias);
  // The value's multiple of its binade's step, rounded half to even (at::round does).
  const at::Tensor steps = at::round(at::ldexp(a, exponent.neg().add(mantissa)));
  at::Tensor code = exponent.add(bias)
                        .mul(int64_t{1} << mantissa)
                        .add(steps.to(at::kInt))
                        .sub(int64_t{1} << mantissa)
                        .clamp_max(static_cast<int64_t>(e4m3 ? 0x7e : 0x7b));
  code = at::where(a.eq(0), at::zeros_like(code), code);  // frexp(0) has exponent 0, not -inf
  if (!e4m3) code = at::where(x.isinf(), at::full_like(code, 0x7c), code);
  code = at::where(x.isnan(), at::full_like(code, 0x7f), code);
  code = code.add(at::signbit(x).to(at::kInt).mul(0x80));
  return code.to(at::kByte);
}

at::Tensor DecodeFloat8WithTensorOps(const at::Tensor& src, DType format, at::ScalarType dtype) {
  CheckFormat(format);
  const std::array<float, 256>& values = Float8Table(format);
  const at::Tensor table =
      at::from_blob(const_cast<float*>(values.data()), {256}, at::kFloat).to(src.device());
  return table.index_select(0, src.reshape({-1}).to(at::kInt)).view(src.sizes()).to(dtype);
}

}  // namespace metaload::core
