// libFuzzer target: serialized metaload.v1.LoadModelRequest messages through MakeLoadSpec, with
// a model root holding a file, a directory and a symlink that points out of the root. An
// accepted request always names something inside the root, under a bounded, printable id.
#include <google/protobuf/stubs/logging.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "metaload/v1/metaload.pb.h"
#include "server/service/path_resolver.h"
#include "server/service/request_codec.h"

namespace {

std::string* root = nullptr;
std::string* outside = nullptr;
metaload::service::PathResolver* resolver = nullptr;

void MakeRoot() {
  google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 in a string field is logged
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/metaload-fuzz-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
  const std::filesystem::path top = std::filesystem::canonical(tmpl);
  std::filesystem::create_directories(top / "models/sd");
  std::filesystem::create_directories(top / "outside");
  std::ofstream(top / "models/model.safetensors") << "x";
  std::ofstream(top / "models/sd/v1-5.ckpt") << "x";
  std::ofstream(top / "outside/secret") << "x";
  std::filesystem::create_symlink(top / "outside/secret", top / "models/escape.safetensors");
  static std::string top_dir = top.string();
  std::atexit([] {
    std::error_code ec;
    std::filesystem::remove_all(top_dir, ec);
  });
  root = new std::string((top / "models").string());
  outside = new std::string((top / "outside").string());
  resolver = new metaload::service::PathResolver({*root});
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (resolver == nullptr) MakeRoot();
  metaload::v1::LoadModelRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  absl::StatusOr<metaload::cache::LoadSpec> spec =
      metaload::service::MakeLoadSpec(request, *resolver);
  if (!spec.ok()) {
    if (!absl::IsInvalidArgument(spec.status()) && !absl::IsNotFound(spec.status())) {
      __builtin_trap();
    }
    // Where the symlink points is never revealed, unless the caller wrote it in the request
    // (libFuzzer learns the random path from the comparison below and sends it back).
    if (spec.status().message().find(*outside) != absl::string_view::npos &&
        std::string(reinterpret_cast<const char*>(data), size).find(*outside) ==
            std::string::npos) {
      __builtin_trap();
    }
    return 0;
  }
  if (spec->path.rfind(*root + "/", 0) != 0 && spec->path != *root) __builtin_trap();
  if (spec->model_id.size() > 256) __builtin_trap();
  for (unsigned char c : spec->model_id) {
    if (c < 0x20 || c == 0x7f) __builtin_trap();
  }
  if (spec->device != "cpu" && spec->device.rfind("cuda", 0) != 0) __builtin_trap();
  return 0;
}
