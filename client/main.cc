// metaload: the command-line client of metaloadd.
//
// Exit codes: 0 ok, 1 the RPC or the operation failed (message carries the gRPC code name),
// 2 usage error.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "client/args.h"
#include "client/commands.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/models/architectures.h"
#include "server/models/synth.h"

namespace {

using metaload::client::Args;

constexpr int kOk = 0;
constexpr int kFailed = 1;
constexpr int kUsage = 2;

const char kUsageHead[] =
    "metaload: command-line client of the metaload daemon\n"
    "\n"
    "Usage: metaload COMMAND [flags]\n"
    "\n"
    "Commands:\n"
    "  health [--address=HOST:PORT] [--service=NAME] [--timeout=SECONDS] [--json]\n"
    "      Asks grpc.health.v1.Health; exit 0 when SERVING.\n"
    "  load PATH [--id=ID] [--arch=A] [--device=cpu|cuda:N] [--dtype=D] [--override=prefix=D,...]\n"
    "       [--compute_dtype=D] [--compute_override=entry=D,...] [--prediction=epsilon|v]\n"
    "       [--vae=PATH] [--allow_missing_keys] [--zero_copy] [--replace] [--pin] [--json]\n"
    "       [--quiet]\n"
    "      Loads a checkpoint (path relative to a model root) with a progress bar on a TTY;\n"
    "      --vae takes a Stable Diffusion model's VAE from another file.\n"
    "  list | get ID | unload ID [--json]\n"
    "      The loaded models: an aligned table, one model's details, or unloading one.\n"
    "  infer ID --input=NAME=TYPE:DIMS:VALUES|NAME=@FILE.npy ... [--entry=E] [--output_dir=D] "
    "[--json]\n"
    "      Runs a forward pass, e.g. --input=input_ids=INT64:1x4:1,5,42,7 (TYPE: FP32, INT64);\n"
    "      --output_dir saves each output as D/NAME.npy.\n"
    "  bench infer --model=ID --input=... | load-hit --path=P | switch --paths=A,B\n"
    "        [--concurrency=N] [--duration=S | --requests=N] [--json]\n"
    "      Load tester: requests/s, p50/p90/p99/max latency, errors by code.\n"
    "  inspect PATH [--json] [--tensors] [--sha256]\n"
    "      Validates a checkpoint offline (safetensors file or HF directory, torch.save zip,\n"
    "      TorchScript) and prints its format, tensors, bytes per dtype, metadata and\n"
    "      architecture (--sha256: and the web UI's hash). Exit 0 when valid, 2 otherwise.\n";

// The synth lines derive from the architecture table (server/models/architectures.h).
std::string SynthUsage() {
  std::vector<std::string> presets;
  for (const metaload::models::ArchitectureInfo& row : metaload::models::Architectures()) {
    if (row.synth != nullptr) {
      presets.push_back(absl::StrCat(row.name, " ", absl::StrJoin(row.synth_presets, "|")));
    }
  }
  return absl::StrCat(
      "  synth --arch=A [--preset=P] [--dtype=float32|float16|bfloat16|float8_e4m3fn|float8_e5m2]\n"
      "        [--shards=N] [--seed=N] [--json] OUT_DIR\n"
      "      Writes a synthetic Hugging Face style checkpoint (config.json + safetensors); for\n"
      "      single-file layouts (Stable Diffusion) OUT_DIR/model.safetensors.\n"
      "      A: ",
      absl::StrJoin(metaload::models::SynthArchitectureNames(), "|"),
      "\n      P: ", absl::StrJoin(presets, "; "), "\n");
}

const char kUsageTail[] =
    "\n"
    "Common flags: --address (default 127.0.0.1:50051), --timeout=SECONDS, --token_file=F,\n"
    "  --tls_ca=F [--tls_cert=F --tls_key=F], --json.\n";

std::string UsageText() { return absl::StrCat(kUsageHead, SynthUsage(), kUsageTail); }

int UsageError(const std::string& message) {
  std::fprintf(stderr, "metaload: %s\n(run 'metaload help' for usage)\n", message.c_str());
  return kUsage;
}

int Health(const std::vector<std::string>& argv) {
  absl::StatusOr<Args> args = Args::Parse(argv, {"address", "service", "timeout"}, {"json"});
  if (!args.ok()) return UsageError(std::string(args.status().message()));
  absl::StatusOr<long long> timeout = args->GetInt("timeout", 10);
  if (!timeout.ok()) return UsageError(std::string(timeout.status().message()));
  const std::string address = args->Get("address", "127.0.0.1:50051");
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(*timeout));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(args->Get("service"));
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  const bool json = args->Has("json");
  if (!status.ok()) {
    if (json) {
      std::cout << nlohmann::json{{"address", address},
                                  {"error",
                                   {{"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(
                                                 status.error_code()))},
                                    {"message", status.error_message()}}}}
                       .dump()
                << "\n";
    } else {
      std::fprintf(
          stderr, "metaload health: %s: %s: %s\n", address.c_str(),
          absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())).c_str(),
          status.error_message().c_str());
    }
    return kFailed;
  }
  const std::string name =
      grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
  if (json) {
    std::cout << nlohmann::json{{"address", address}, {"status", name}}.dump() << "\n";
  } else {
    std::cout << name << "\n";
  }
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? kOk : kFailed;
}

int Synth(const std::vector<std::string>& argv) {
  absl::StatusOr<Args> args =
      Args::Parse(argv, {"arch", "preset", "dtype", "shards", "seed"}, {"json"});
  if (!args.ok()) return UsageError(std::string(args.status().message()));
  if (args->positionals().size() != 1) return UsageError("synth needs exactly one OUT_DIR");
  if (!args->Has("arch")) return UsageError("synth needs --arch");
  metaload::models::SynthOptions options;
  options.architecture = args->Get("arch");
  options.preset = args->Get("preset", options.preset);
  options.dtype = args->Get("dtype", options.dtype);
  absl::StatusOr<long long> shards = args->GetInt("shards", 1);
  absl::StatusOr<long long> seed = args->GetInt("seed", 0);
  if (!shards.ok()) return UsageError(std::string(shards.status().message()));
  if (!seed.ok()) return UsageError(std::string(seed.status().message()));
  options.shards = static_cast<int>(*shards);
  options.seed = static_cast<uint64_t>(*seed);
  const std::string out_dir = args->positionals()[0];
  absl::StatusOr<metaload::models::SynthResult> result =
      metaload::models::Synthesize(options, out_dir);
  if (!result.ok()) {
    if (absl::IsInvalidArgument(result.status())) {
      return UsageError(std::string(result.status().message()));
    }
    std::fprintf(stderr, "metaload synth: %s\n", std::string(result.status().message()).c_str());
    return kFailed;
  }
  if (args->Has("json")) {
    std::cout << nlohmann::json{{"dir", out_dir},
                                {"architecture", options.architecture},
                                {"preset", options.preset},
                                {"dtype", options.dtype},
                                {"files", result->files},
                                {"tensors", result->tensor_count},
                                {"parameters", result->parameter_count},
                                {"bytes", result->data_bytes}}
                     .dump()
              << "\n";
  } else {
    std::printf("wrote %s: %s %s %s, %lld tensors, %lld parameters, %lld bytes in %zu files\n",
                out_dir.c_str(), options.architecture.c_str(), options.preset.c_str(),
                options.dtype.c_str(), static_cast<long long>(result->tensor_count),
                static_cast<long long>(result->parameter_count),
                static_cast<long long>(result->data_bytes), result->files.size());
  }
  return kOk;
}

}  // namespace

int Main(int argc, char** argv) {
  // As in the daemon: Debian's Abseil is built with mutex deadlock detection, which serialises
  // every lock gRPC takes on one global lock; `bench` would measure that.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  if (argc < 2) {
    std::fputs(UsageText().c_str(), stderr);
    return kUsage;
  }
  const std::string command = argv[1];
  std::vector<std::string> rest(argv + 2, argv + argc);
  if (command == "help" || command == "--help" || command == "-h") {
    std::fputs(UsageText().c_str(), stdout);
    return kOk;
  }
  if (command == "health") return Health(rest);
  if (command == "synth") return Synth(rest);
  if (command == "inspect") return metaload::client::RunInspect(rest);
  if (command == "load") return metaload::client::RunLoad(rest);
  if (command == "unload") return metaload::client::RunUnload(rest);
  if (command == "get") return metaload::client::RunGet(rest);
  if (command == "list") return metaload::client::RunList(rest);
  if (command == "infer") return metaload::client::RunInfer(rest);
  if (command == "bench") return metaload::client::RunBench(rest);
  return UsageError(absl::StrCat("unknown command '", command, "'"));
}

int main(int argc, char** argv) {
  // No stack traces for users: anything unexpected becomes one line and exit code 1.
  try {
    return Main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "metaload: internal error: %s\n", e.what());
    return kFailed;
  }
}
