#include "server/core/float8_convert.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
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

// `format`'s table on `device`, copied there once (a copy per forward would wait on the stream).
at::Tensor DeviceTable(DType format, c10::Device device) {
  static std::mutex mu;
  static auto* tables = new std::map<std::pair<int, std::string>, at::Tensor>();  // never freed:
  std::lock_guard<std::mutex> lock(mu);  // device memory must outlive static destruction order
  at::Tensor& table = (*tables)[{static_cast<int>(format), device.str()}];
  if (!table.defined()) {
    const std::array<float, 256>& values = Float8Table(format);
    table = at::from_blob(const_cast<float*>(values.data()), {256}, at::kFloat).to(device);
  }
  return table;
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
    case at::kDouble:  // rounds twice (to float32, then float8): a value within float32's
                       // precision of a float8 tie may round the other way
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
  if (src_dtype == dst_dtype || (!IsFloat8(src_dtype) && !IsFloat8(dst_dtype))) {
    dst.copy_(src);  // the same bytes, or a conversion LibTorch knows
  } else if (!IsFloat8(src_dtype)) {
    EncodeFloat8(src, dst_dtype, dst);
  } else if (!IsFloat8(dst_dtype)) {
    DecodeFloat8(src, src_dtype, dst);
  } else if (src.is_cpu() && src.is_contiguous() && dst.is_contiguous()) {
    CheckSameCount(src, dst);
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
  const Float8Format& f = Float8FormatOf(format);
  const int64_t mantissa = f.mantissa_bits;
  const int64_t bias = f.bias;
  const at::Tensor x = src.to(at::kFloat);
  const at::Tensor nan = x.isnan();
  // |x| = m * 2^e with m in [0.5, 1): the float8 exponent is e - 1, at least the subnormals' own.
  // NaN lanes compute on 0 (their code is set below) so no NaN meets an integer conversion.
  const at::Tensor a = at::where(nan, at::zeros_like(x), x.abs())
                           .clamp_max(f.max_value);  // saturates (and maps +-inf to +-max)
  at::Tensor exponent = std::get<1>(at::frexp(a)).sub(1).clamp_min(1 - bias);
  // The value's multiple of its binade's step, rounded half to even (at::round does).
  const at::Tensor steps = at::round(at::ldexp(a, exponent.neg().add(mantissa)));
  at::Tensor code = exponent.add(bias)
                        .mul(int64_t{1} << mantissa)
                        .add(steps.to(at::kInt))
                        .sub(int64_t{1} << mantissa)
                        .clamp_max(static_cast<int64_t>(f.max_finite));
  code = at::where(a.eq(0), at::zeros_like(code), code);  // frexp(0) has exponent 0, not -inf
  if (f.has_infinity) code = at::where(x.isinf(), at::full_like(code, 0x7c), code);
  code = at::where(nan, at::full_like(code, 0x7f), code);
  code = code.add(at::signbit(x).to(at::kInt).mul(0x80));
  return code.to(at::kByte);
}

at::Tensor DecodeFloat8WithTensorOps(const at::Tensor& src, DType format, at::ScalarType dtype) {
  CheckFormat(format);
  return DeviceTable(format, src.device())
      .index_select(0, src.reshape({-1}).to(at::kInt))
      .view(src.sizes())
      .to(dtype);
}

}  // namespace metaload::core
