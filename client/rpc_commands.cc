// The `metaload` subcommands that talk to the daemon: load, unload, get, list, infer.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/args.h"
#include "client/commands.h"
#include "client/npy.h"
#include "metaload/v1/metaload.grpc.pb.h"
#include "server/core/byte_size.h"

namespace metaload::client {

std::string JsonQuote(const std::string& s);  // JSON string literal, defined below

namespace {

constexpr int kOk = 0;
constexpr int kFailed = 1;
constexpr int kUsage = 2;

const std::set<std::string> kConnectionFlags = {"address", "timeout",  "token_file",
                                                "tls_ca",  "tls_cert", "tls_key"};

// "NOT_FOUND", ...: gRPC and Abseil share the code numbering.
std::string CodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

std::set<std::string> With(std::set<std::string> extra) {
  extra.insert(kConnectionFlags.begin(), kConnectionFlags.end());
  return extra;
}

int Usage(const std::string& command, const std::string& message) {
  std::fprintf(stderr, "metaload %s: %s\n(run 'metaload help' for usage)\n", command.c_str(),
               message.c_str());
  return kUsage;
}

int RpcError(const std::string& command, const grpc::Status& s, bool json) {
  if (json) {
    std::printf("{\"error\":{\"code\":\"%s\",\"message\":%s}}\n", CodeName(s.error_code()).c_str(),
                JsonQuote(s.error_message()).c_str());
  } else {
    std::fprintf(stderr, "metaload %s: %s: %s\n", command.c_str(), CodeName(s.error_code()).c_str(),
                 s.error_message().c_str());
  }
  return kFailed;
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Connection settings shared by every RPC command.
struct Connection {
  std::shared_ptr<grpc::Channel> channel;
  std::string token;
  long long timeout_seconds = 0;

  void Prepare(grpc::ClientContext* context) const {
    if (timeout_seconds > 0) {
      context->set_deadline(std::chrono::system_clock::now() +
                            std::chrono::seconds(timeout_seconds));
    }
    if (!token.empty()) context->AddMetadata("authorization", "Bearer " + token);
  }
};

absl::StatusOr<Connection> Connect(const Args& args, long long default_timeout) {
  Connection c;
  absl::StatusOr<long long> timeout = args.GetInt("timeout", default_timeout);
  if (!timeout.ok()) return timeout.status();
  c.timeout_seconds = *timeout;
  if (args.Has("token_file")) {
    std::string token = ReadFile(args.Get("token_file"));
    while (!token.empty() && (token.back() == '\n' || token.back() == '\r' || token.back() == ' '))
      token.pop_back();
    if (token.empty()) return absl::InvalidArgumentError("--token_file is empty or unreadable");
    c.token = token;
  }
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (args.Has("tls_ca")) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = ReadFile(args.Get("tls_ca"));
    if (args.Has("tls_cert")) {
      ssl.pem_cert_chain = ReadFile(args.Get("tls_cert"));
      ssl.pem_private_key = ReadFile(args.Get("tls_key"));
    }
    creds = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(1 << 30);
  channel_args.SetMaxSendMessageSize(1 << 30);
  c.channel =
      grpc::CreateCustomChannel(args.Get("address", "127.0.0.1:50051"), creds, channel_args);
  return c;
}

std::string Json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, options);
  return out;
}

std::string Ago(int64_t unix_ms) {
  if (unix_ms <= 0) return "-";
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  const int64_t s = std::max<int64_t>(0, (now - unix_ms) / 1000);
  if (s < 60) return absl::StrCat(s, "s ago");
  if (s < 3600) return absl::StrCat(s / 60, "m ago");
  return absl::StrCat(s / 3600, "h ago");
}

void PrintModel(const metaload::v1::ModelInfo& m) {
  std::printf("model_id:      %s\n", m.model_id().c_str());
  std::printf("state:         %s\n", m.state().c_str());
  std::printf("path:          %s\n", m.path().c_str());
  std::printf("architecture:  %s\n", m.architecture().c_str());
  std::printf("device/dtype:  %s / %s\n", m.device().c_str(), m.dtype().c_str());
  std::printf("parameters:    %lld (%s resident)\n", static_cast<long long>(m.parameter_count()),
              core::HumanBytes(m.resident_bytes()).c_str());
  if (!m.sha256().empty())
    std::printf("sha256:        %s [%s]\n", m.sha256().c_str(), m.short_hash().c_str());
  for (const auto& e : m.entries()) {
    std::vector<std::string> ins;
    for (const auto& t : e.inputs()) {
      ins.push_back(absl::StrCat(t.name(), ":", t.datatype().empty() ? "float" : t.datatype(), "[",
                                 absl::StrJoin(t.shape(), ","), "]"));
    }
    std::printf("entry:         %s(%s)", e.name().c_str(), absl::StrJoin(ins, ", ").c_str());
    if (!e.storage_dtype().empty()) {
      std::printf(" stored %s, computes in %s", e.storage_dtype().c_str(),
                  e.compute_dtype().c_str());
    }
    std::printf("\n");
  }
  if (!m.vae_path().empty()) std::printf("vae:           %s\n", m.vae_path().c_str());
  if (m.has_diffusion()) {
    std::printf("diffusion:     predicts %s (%s), VAE scale %g\n",
                m.diffusion().prediction().c_str(), m.diffusion().prediction_source().c_str(),
                m.diffusion().vae_scale_factor());
  }
  std::printf("infers:        %lld, last used %s\n", static_cast<long long>(m.infer_count()),
              Ago(m.last_used_unix_ms()).c_str());
}

}  // namespace

int RunLoad(const std::vector<std::string>& argv) {
  absl::StatusOr<Args> args =
      Args::Parse(argv,
                  With({"id", "arch", "device", "dtype", "compute_dtype", "override",
                        "compute_override", "prediction", "vae"}),
                  {"json", "allow_missing_keys", "zero_copy", "replace", "pin", "quiet"});
  if (!args.ok()) return Usage("load", std::string(args.status().message()));
  if (args->positionals().size() != 1)
    return Usage("load", "needs exactly one PATH (relative to a model root)");
  absl::StatusOr<Connection> conn = Connect(*args, 0);
  if (!conn.ok()) return Usage("load", std::string(conn.status().message()));
  metaload::v1::LoadModelRequest request;
  request.set_path(args->positionals()[0]);
  request.set_model_id(args->Get("id"));
  request.set_architecture(args->Get("arch"));
  request.set_device(args->Get("device"));
  request.set_dtype(args->Get("dtype"));
  request.set_compute_dtype(args->Get("compute_dtype"));
  request.set_prediction(args->Get("prediction"));
  request.set_vae_path(args->Get("vae"));
  // --override=prefix=dtype,... and --compute_override=entry=dtype,...
  for (auto [flag, map] :
       {std::make_pair("override", request.mutable_dtype_overrides()),
        std::make_pair("compute_override", request.mutable_compute_dtype_overrides())}) {
    for (absl::string_view item : absl::StrSplit(args->Get(flag), ',', absl::SkipEmpty())) {
      std::pair<std::string, std::string> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
      if (kv.second.empty()) {
        return Usage("load", absl::StrCat("--", flag, " takes name=dtype[,name=dtype]"));
      }
      (*map)[kv.first] = kv.second;
    }
  }
  request.set_allow_missing_keys(args->Has("allow_missing_keys"));
  request.set_zero_copy(args->Has("zero_copy"));
  request.set_replace(args->Has("replace"));
  request.set_pin(args->Has("pin"));
  const bool json = args->Has("json");
  const bool tty = ::isatty(STDERR_FILENO) && !json && !args->Has("quiet");

  auto stub = metaload::v1::ModelLoader::NewStub(conn->channel);
  grpc::ClientContext context;
  conn->Prepare(&context);
  auto reader = stub->LoadModelStream(&context, request);
  metaload::v1::LoadEvent event;
  metaload::v1::LoadModelResponse result;
  const auto start = std::chrono::steady_clock::now();
  auto last_line = start - std::chrono::seconds(10);
  while (reader->Read(&event)) {
    if (event.has_result()) {
      result = event.result();
      continue;
    }
    if (json || args->Has("quiet")) continue;
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const int64_t done = event.bytes_done(), total = event.bytes_total();
    if (tty) {
      const double fraction = total > 0 ? static_cast<double>(done) / total : 0;
      const int width = 30, filled = static_cast<int>(fraction * width);
      const double rate = elapsed > 0 ? done / elapsed : 0;
      const double eta = rate > 0 && total > done ? (total - done) / rate : 0;
      std::fprintf(stderr, "\r%-6s [%s%s] %3.0f%% %s / %s  %s/s  ETA %.0fs   ",
                   event.phase().c_str(), std::string(filled, '#').c_str(),
                   std::string(width - filled, ' ').c_str(), 100 * fraction,
                   core::HumanBytes(done).c_str(), core::HumanBytes(total).c_str(),
                   core::HumanBytes(static_cast<int64_t>(rate)).c_str(), eta);
    } else if (total > 0 &&
               std::chrono::steady_clock::now() - last_line >= std::chrono::seconds(1)) {
      last_line = std::chrono::steady_clock::now();
      std::fprintf(stderr, "%s %lld/%lld bytes\n", event.phase().c_str(),
                   static_cast<long long>(done), static_cast<long long>(total));
    }
  }
  if (tty) std::fprintf(stderr, "\r%*s\r", 100, "");
  grpc::Status status = reader->Finish();
  if (!status.ok()) return RpcError("load", status, json);
  if (json) {
    std::printf("%s\n", Json(result).c_str());
    return kOk;
  }
  const auto& m = result.model();
  std::printf(
      "%s %s: %s on %s (%s), %lld parameters, %s in %.2f s, peak host %s%s%s\n",
      result.cache_hit() ? "cached" : "loaded", m.model_id().c_str(), m.architecture().c_str(),
      m.device().c_str(), m.dtype().c_str(), static_cast<long long>(m.parameter_count()),
      core::HumanBytes(m.resident_bytes()).c_str(), result.stats().total_seconds(),
      core::HumanBytes(result.stats().peak_host_bytes()).c_str(),
      result.stats().arena_reused_bytes() > 0
          ? absl::StrCat(" (", core::HumanBytes(result.stats().arena_reused_bytes()),
                         " reused from the arena)")
                .c_str()
          : "",
      result.stats().unexpected_keys_size() > 0
          ? absl::StrCat(", ", result.stats().unexpected_keys_size(), " unexpected keys").c_str()
          : "");
  return kOk;
}

int RunUnload(const std::vector<std::string>& argv) {
  absl::StatusOr<Args> args = Args::Parse(argv, With({}), {"json"});
  if (!args.ok()) return Usage("unload", std::string(args.status().message()));
  if (args->positionals().size() != 1) return Usage("unload", "needs exactly one MODEL_ID");
  absl::StatusOr<Connection> conn = Connect(*args, 30);
  if (!conn.ok()) return Usage("unload", std::string(conn.status().message()));
  auto stub = metaload::v1::ModelLoader::NewStub(conn->channel);
  metaload::v1::UnloadModelRequest request;
  request.set_model_id(args->positionals()[0]);
  metaload::v1::UnloadModelResponse response;
  grpc::ClientContext context;
  conn->Prepare(&context);
  grpc::Status s = stub->UnloadModel(&context, request, &response);
  if (!s.ok()) return RpcError("unload", s, args->Has("json"));
  if (args->Has("json")) {
    std::printf("%s\n", Json(response).c_str());
  } else {
    std::printf("unloaded %s (%s)\n", request.model_id().c_str(), response.model().state().c_str());
  }
  return kOk;
}

int RunGet(const std::vector<std::string>& argv) {
  absl::StatusOr<Args> args = Args::Parse(argv, With({}), {"json"});
  if (!args.ok()) return Usage("get", std::string(args.status().message()));
  if (args->positionals().size() != 1) return Usage("get", "needs exactly one MODEL_ID");
  absl::StatusOr<Connection> conn = Connect(*args, 30);
  if (!conn.ok()) return Usage("get", std::string(conn.status().message()));
  auto stub = metaload::v1::ModelLoader::NewStub(conn->channel);
  metaload::v1::GetModelRequest request;
  request.set_model_id(args->positionals()[0]);
  metaload::v1::ModelInfo info;
  grpc::ClientContext context;
  conn->Prepare(&context);
  grpc::Status s = stub->GetModel(&context, request, &info);
  if (!s.ok()) return RpcError("get", s, args->Has("json"));
  if (args->Has("json")) {
    std::printf("%s\n", Json(info).c_str());
  } else {
    PrintModel(info);
  }
  return kOk;
}

int RunList(const std::vector<std::string>& argv) {
  absl::StatusOr<Args> args = Args::Parse(argv, With({}), {"json"});
  if (!args.ok()) return Usage("list", std::string(args.status().message()));
  absl::StatusOr<Connection> conn = Connect(*args, 30);
  if (!conn.ok()) return Usage("list", std::string(conn.status().message()));
  auto stub = metaload::v1::ModelLoader::NewStub(conn->channel);
  metaload::v1::ListModelsResponse list;
  grpc::ClientContext context;
  conn->Prepare(&context);
  grpc::Status s = stub->ListModels(&context, metaload::v1::ListModelsRequest(), &list);
  if (!s.ok()) return RpcError("list", s, args->Has("json"));
  if (args->Has("json")) {
    std::printf("%s\n", Json(list).c_str());
    return kOk;
  }
  std::vector<std::vector<std::string>> rows = {
      {"ID", "ARCH", "DEVICE", "DTYPE", "STATE", "RESIDENT", "LAST USED"}};
  for (const auto& m : list.models()) {
    rows.push_back({m.model_id(), m.architecture(), m.device(), m.dtype(), m.state(),
                    core::HumanBytes(m.resident_bytes()), Ago(m.last_used_unix_ms())});
  }
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& r : rows)
    for (size_t i = 0; i < r.size(); ++i) width[i] = std::max(width[i], r[i].size());
  for (const auto& r : rows) {
    std::string line;
    for (size_t i = 0; i < r.size(); ++i)
      absl::StrAppend(&line, absl::StrFormat("%-*s", width[i] + 2, r[i]));
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::printf("%s\n", line.c_str());
  }
  return kOk;
}

// --input name=TYPE:DIMS:VALUES, e.g. input_ids=INT64:1x6:1,5,42,7,99,3
absl::Status ParseInputSpec(const std::string& spec, metaload::v1::Tensor* t) {
  std::pair<std::string, std::string> nv = absl::StrSplit(spec, absl::MaxSplits('=', 1));
  std::vector<std::string> parts = absl::StrSplit(nv.second, absl::MaxSplits(':', 2));
  if (nv.first.empty() || (parts.size() != 3 && (nv.second.empty() || nv.second[0] != '@'))) {
    return absl::InvalidArgumentError(
        absl::StrCat("--input '", spec, "': expected name=TYPE:DIMS:VALUES"));
  }
  t->set_name(nv.first);
  if (!nv.second.empty() && nv.second[0] == '@') {  // name=@file.npy
    absl::Status s = ReadNpy(nv.second.substr(1), t);
    if (!s.ok())
      return absl::InvalidArgumentError(absl::StrCat("--input '", spec, "': ", s.message()));
    return absl::OkStatus();
  }
  t->set_datatype(parts[0]);
  int64_t numel = 1;
  for (absl::string_view d : absl::StrSplit(parts[1], 'x', absl::SkipEmpty())) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(d, &v) || v < 0)
      return absl::InvalidArgumentError(
          absl::StrCat("--input '", spec, "': bad dimension '", d, "'"));
    t->add_shape(v);
    numel *= v;
  }
  std::vector<std::string> values = absl::StrSplit(parts[2], ',', absl::SkipEmpty());
  if (static_cast<int64_t>(values.size()) != numel) {
    return absl::InvalidArgumentError(
        absl::StrCat("--input '", spec, "': ", values.size(), " values for ", numel, " elements"));
  }
  for (const std::string& v : values) {
    if (parts[0] == "FP32") {
      float f = 0;
      if (!absl::SimpleAtof(v, &f))
        return absl::InvalidArgumentError(
            absl::StrCat("--input '", spec, "': bad value '", v, "'"));
      t->add_fp32_contents(f);
    } else if (parts[0] == "INT64") {
      int64_t i = 0;
      if (!absl::SimpleAtoi(v, &i))
        return absl::InvalidArgumentError(
            absl::StrCat("--input '", spec, "': bad value '", v, "'"));
      t->add_int64_contents(i);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--input '", spec, "': the command line takes FP32 or INT64"));
    }
  }
  return absl::OkStatus();
}

int RunInfer(const std::vector<std::string>& argv) {
  // --input may repeat: collect them before the generic parser sees the last one only.
  std::vector<std::string> inputs, rest;
  for (size_t i = 0; i < argv.size(); ++i) {
    if (argv[i].rfind("--input=", 0) == 0) {
      inputs.push_back(argv[i].substr(8));
    } else if (argv[i] == "--input" && i + 1 < argv.size()) {
      inputs.push_back(argv[++i]);
    } else {
      rest.push_back(argv[i]);
    }
  }
  absl::StatusOr<Args> args = Args::Parse(rest, With({"entry", "output_dir"}), {"json"});
  if (!args.ok()) return Usage("infer", std::string(args.status().message()));
  if (args->positionals().size() != 1) return Usage("infer", "needs exactly one MODEL_ID");
  absl::StatusOr<Connection> conn = Connect(*args, 60);
  if (!conn.ok()) return Usage("infer", std::string(conn.status().message()));
  metaload::v1::InferRequest request;
  request.set_model_id(args->positionals()[0]);
  request.set_entry(args->Get("entry"));
  request.set_typed_outputs(true);
  for (const std::string& spec : inputs) {
    absl::Status s = ParseInputSpec(spec, request.add_inputs());
    if (!s.ok()) return Usage("infer", std::string(s.message()));
  }
  auto stub = metaload::v1::ModelLoader::NewStub(conn->channel);
  metaload::v1::InferResponse response;
  grpc::ClientContext context;
  conn->Prepare(&context);
  const auto start = std::chrono::steady_clock::now();
  grpc::Status s = stub->Infer(&context, request, &response);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (!s.ok()) return RpcError("infer", s, args->Has("json"));
  if (args->Has("json")) {
    std::printf("%s\n", Json(response).c_str());
    return kOk;
  }
  std::printf("%s: %d output(s) in %.1f ms\n", response.model_id().c_str(), response.outputs_size(),
              ms);
  for (const auto& out : response.outputs()) {
    double lo = 0, hi = 0, sum = 0;
    int64_t n = out.fp32_contents_size() > 0 ? out.fp32_contents_size() : out.int64_contents_size();
    std::vector<std::string> head;
    for (int64_t i = 0; i < n; ++i) {
      double v = out.fp32_contents_size() > 0 ? out.fp32_contents(i)
                                              : static_cast<double>(out.int64_contents(i));
      lo = i == 0 ? v : std::min(lo, v);
      hi = i == 0 ? v : std::max(hi, v);
      sum += v;
      if (i < 6) head.push_back(absl::StrFormat("%.5g", v));
    }
    std::printf("  %s %s[%s] min %.5g max %.5g mean %.5g first [%s%s]\n", out.name().c_str(),
                out.datatype().c_str(), absl::StrJoin(out.shape(), "x").c_str(), lo, hi,
                n ? sum / n : 0.0, absl::StrJoin(head, ", ").c_str(), n > 6 ? ", ..." : "");
  }
  return kOk;
}

std::string JsonQuote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += absl::StrFormat("\\u%04x", c);
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace metaload::client
