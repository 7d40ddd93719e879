#include "client/npy.h"

#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace metaload::client {
namespace {

struct Kind {
  const char* descr;
  const char* datatype;
  int size;
};
constexpr Kind kKinds[] = {{"<f4", "FP32", 4},  {"<f2", "FP16", 2},  {"<f8", "FP64", 8},
                           {"<i8", "INT64", 8}, {"<i4", "INT32", 4}, {"|i1", "INT8", 1},
                           {"|u1", "UINT8", 1}, {"|b1", "BOOL", 1}};

// The value of 'key': ... in the header dict, up to the next top-level comma.
std::string Field(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) return "";
  at = header.find(':', at);
  if (at == std::string::npos) return "";
  size_t end = at + 1;
  int depth = 0;
  for (; end < header.size(); ++end) {
    char c = header[end];
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if ((c == ',' && depth == 0) || c == '}') break;
  }
  return std::string(absl::StripAsciiWhitespace(header.substr(at + 1, end - at - 1)));
}

}  // namespace

absl::Status ReadNpy(const std::string& path, metaload::v1::Tensor* tensor) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat(path, ": cannot read"));
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string bytes = ss.str();
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a .npy file"));
  }
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, offset = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    offset = 10;
  } else if ((major == 2 || major == 3) && bytes.size() >= 12) {
    for (int i = 3; i >= 0; --i)
      header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + i]);
    offset = 12;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(path, ": unsupported .npy version ", major));
  }
  if (bytes.size() < offset + header_len)
    return absl::InvalidArgumentError(absl::StrCat(path, ": truncated header"));
  const std::string header = bytes.substr(offset, header_len);
  std::string descr = Field(header, "descr");
  descr = std::string(absl::StripPrefix(absl::StripSuffix(descr, "'"), "'"));
  if (Field(header, "fortran_order") != "False") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": Fortran-ordered arrays are not supported"));
  }
  const Kind* kind = nullptr;
  for (const Kind& k : kKinds) {
    if (descr == k.descr) kind = &k;
  }
  if (kind == nullptr)
    return absl::InvalidArgumentError(absl::StrCat(path, ": unsupported dtype ", descr));
  std::string shape = Field(header, "shape");
  shape = std::string(absl::StripSuffix(absl::StripPrefix(shape, "("), ")"));
  int64_t numel = 1;
  tensor->clear_shape();
  for (absl::string_view d : absl::StrSplit(shape, ',', absl::SkipWhitespace())) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(d), &v) || v < 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": bad shape (", shape, ")"));
    }
    tensor->add_shape(v);
    numel *= v;
  }
  const size_t data = offset + header_len;
  if (bytes.size() - data != static_cast<size_t>(numel * kind->size)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", bytes.size() - data, " data bytes for shape (", shape, ")"));
  }
  tensor->set_datatype(kind->datatype);
  tensor->set_raw_data(bytes.substr(data));
  return absl::OkStatus();
}

absl::Status WriteNpy(const metaload::v1::Tensor& tensor, const std::string& path) {
  std::string data;
  std::string datatype = tensor.datatype();
  if (tensor.fp32_contents_size() > 0) {
    data.assign(reinterpret_cast<const char*>(tensor.fp32_contents().data()),
                tensor.fp32_contents_size() * 4);
    datatype = "FP32";
  } else if (tensor.int64_contents_size() > 0) {
    data.assign(reinterpret_cast<const char*>(tensor.int64_contents().data()),
                tensor.int64_contents_size() * 8);
    datatype = "INT64";
  } else {
    data = tensor.raw_data();
  }
  const Kind* kind = nullptr;
  for (const Kind& k : kKinds) {
    if (datatype == k.datatype) kind = &k;
  }
  if (kind == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("output '", tensor.name(), "': ", datatype, " has no .npy dtype"));
  }
  std::string shape = absl::StrJoin(tensor.shape(), ", ");
  if (tensor.shape_size() == 1) shape += ",";
  std::string header = absl::StrCat("{'descr': '", kind->descr,
                                    "', 'fortran_order': False, 'shape': (", shape, "), }");
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << "\x93NUMPY" << '\x01' << '\x00' << static_cast<char>(header.size() & 0xff)
    << static_cast<char>((header.size() >> 8) & 0xff) << header << data;
  f.close();
  if (!f) return absl::InternalError(absl::StrCat(path, ": cannot write"));
  return absl::OkStatus();
}

}  // namespace metaload::client
