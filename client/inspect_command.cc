#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/args.h"
#include "client/commands.h"
#include "server/core/byte_size.h"
#include "server/core/checkpoint.h"
#include "server/core/checksum_store.h"
#include "server/models/architecture_detector.h"

namespace metaload::client {
namespace {

constexpr int kOk = 0;
constexpr int kInvalid = 2;

// What a TorchScript archive is, in both outputs.
constexpr char kTorchScriptWarning[] =
    "TorchScript: a program, not a state dict; loading it runs the file's code (metaloadd "
    "refuses it unless started with --allow_torchscript)";

int Inspect(const std::vector<std::string>& argv);

}  // namespace

// Hostile files are verdicts, never "internal error": whatever the readers and the JSON
// library throw becomes one line and exit 2. (The CLI links no LibTorch, so this is not
// core::CatchExceptions; there is no c10 exception to tell apart here.)
int RunInspect(const std::vector<std::string>& argv) {
  try {
    return Inspect(argv);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "metaload inspect: invalid: RESOURCE_EXHAUSTED: out of memory\n");
  } catch (const std::exception& e) {
    std::string what = e.what();
    std::fprintf(stderr, "metaload inspect: invalid: FAILED_PRECONDITION: %s\n",
                 what.substr(0, what.find('\n')).c_str());
  }
  return kInvalid;
}

namespace {

int Inspect(const std::vector<std::string>& argv) {
  absl::StatusOr<Args> args = Args::Parse(argv, {}, {"json", "tensors", "sha256"});
  if (!args.ok() || args->positionals().size() != 1) {
    std::fprintf(
        stderr,
        "metaload inspect: %s\nusage: metaload inspect PATH [--json] [--tensors] [--sha256]\n",
        args.ok() ? "needs exactly one PATH" : std::string(args.status().message()).c_str());
    return 2;
  }
  const std::string path = args->positionals()[0];
  const bool json = args->Has("json");
  absl::StatusOr<std::unique_ptr<core::CheckpointSource>> source =
      core::CheckpointSource::Open(path);
  if (!source.ok()) {
    if (json) {
      std::cout << nlohmann::json{{"path", path},
                                  {"valid", false},
                                  {"error",
                                   {{"code", absl::StatusCodeToString(source.status().code())},
                                    {"message", std::string(source.status().message())}}}}
                       .dump()
                << "\n";
    } else {
      std::fprintf(stderr, "metaload inspect: invalid: %s: %s\n",
                   absl::StatusCodeToString(source.status().code()).c_str(),
                   std::string(source.status().message()).c_str());
    }
    return kInvalid;
  }
  const core::CheckpointIndex& index = (*source)->index();
  const models::DetectedArchitecture arch = models::DetectArchitecture(index);
  uint64_t file_bytes = 0;
  for (const core::CheckpointFile& f : index.files) file_bytes += f.size;
  std::string sha256;
  if (args->Has("sha256")) {
    absl::StatusOr<std::unique_ptr<core::ChecksumStore>> store = core::ChecksumStore::Create({});
    absl::StatusOr<std::string> sha =
        store.ok() ? (*store)->Compute(index.files) : absl::StatusOr<std::string>(store.status());
    if (!sha.ok()) {
      std::fprintf(stderr, "metaload inspect: invalid: %s: %s\n",
                   absl::StatusCodeToString(sha.status().code()).c_str(),
                   std::string(sha.status().message()).c_str());
      return kInvalid;
    }
    sha256 = *sha;
  }
  const bool runs_code = index.format == core::CheckpointFormat::kTorchScript;
  std::map<core::DType, int> tensors_by_dtype;
  for (const core::TensorInfo& t : index.tensors) ++tensors_by_dtype[t.dtype];

  if (json) {
    nlohmann::ordered_json out;
    out["path"] = path;
    out["valid"] = true;
    out["format"] = std::string(core::CheckpointFormatName(index.format));
    nlohmann::ordered_json files = nlohmann::ordered_json::array();
    for (const core::CheckpointFile& f : index.files) {
      files.push_back({{"path", f.path}, {"bytes", f.size}});
    }
    out["files"] = files;
    out["tensors"] = index.tensors.size();
    out["parameters"] = index.parameter_count();
    out["bytes"] = index.total_bytes();
    nlohmann::ordered_json by_dtype = nlohmann::ordered_json::object();
    for (const auto& [dtype, bytes] : index.bytes_by_dtype()) {
      by_dtype[std::string(core::DTypeName(dtype))] = bytes;
    }
    out["bytes_by_dtype"] = by_dtype;
    out["metadata"] = index.metadata;
    out["architecture"] =
        arch.name.empty() ? nlohmann::ordered_json() : nlohmann::ordered_json(arch.name);
    out["architecture_evidence"] = arch.evidence;
    out["skipped_entries"] = index.skipped_entries;
    out["runs_code"] = runs_code;
    if (runs_code) out["warning"] = kTorchScriptWarning;
    if (!sha256.empty()) {
      out["sha256"] = sha256;
      out["short_hash"] = core::ChecksumStore::ShortHash(sha256);
    }
    if (args->Has("tensors")) {
      nlohmann::ordered_json list = nlohmann::ordered_json::array();
      for (const core::TensorInfo& t : index.tensors) {
        list.push_back({{"name", t.name},
                        {"dtype", std::string(core::DTypeName(t.dtype))},
                        {"shape", t.shape},
                        {"bytes", t.nbytes}});
      }
      out["tensor_list"] = list;
    }
    std::cout << out.dump() << "\n";
    return kOk;
  }

  std::printf("path:          %s\n", path.c_str());
  std::printf("format:        %s\n", std::string(core::CheckpointFormatName(index.format)).c_str());
  std::printf("files:         %zu (%s)\n", index.files.size(),
              core::HumanBytes(file_bytes).c_str());
  std::printf("tensors:       %zu\n", index.tensors.size());
  std::printf("parameters:    %lld\n", static_cast<long long>(index.parameter_count()));
  std::printf("tensor bytes:  %llu (%s)\n", static_cast<unsigned long long>(index.total_bytes()),
              core::HumanBytes(index.total_bytes()).c_str());
  for (const auto& [dtype, bytes] : index.bytes_by_dtype()) {
    std::printf("  %-10s   %llu (%s) in %d tensors\n", std::string(core::DTypeName(dtype)).c_str(),
                static_cast<unsigned long long>(bytes), core::HumanBytes(bytes).c_str(),
                tensors_by_dtype[dtype]);
  }
  if (!index.metadata.empty()) {
    std::vector<std::string> kv;
    for (const auto& [k, v] : index.metadata) kv.push_back(absl::StrCat(k, "=", v));
    std::printf("metadata:      %s\n", absl::StrJoin(kv, ", ").c_str());
  }
  std::printf("architecture:  %s\n",
              arch.name.empty() ? "unknown"
                                : absl::StrCat(arch.name, " (from ", arch.evidence, ")").c_str());
  if (!index.skipped_entries.empty()) {
    std::printf("skipped:       %s\n", absl::StrJoin(index.skipped_entries, ", ").c_str());
  }
  if (runs_code) std::printf("warning:       %s\n", kTorchScriptWarning);
  if (!sha256.empty()) {
    std::printf("sha256:        %s (short hash %s)\n", sha256.c_str(),
                core::ChecksumStore::ShortHash(sha256).c_str());
  }
  if (args->Has("tensors")) {
    for (const core::TensorInfo& t : index.tensors) {
      std::printf("  %-60s %-9s [%s]\n", t.name.c_str(),
                  std::string(core::DTypeName(t.dtype)).c_str(),
                  absl::StrJoin(t.shape, ", ").c_str());
    }
  }
  std::printf("valid:         yes\n");
  return kOk;
}

}  // namespace

}  // namespace metaload::client
