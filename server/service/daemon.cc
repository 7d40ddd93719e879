#include "server/service/daemon.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/security/server_credentials.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "grpc/health/v1/health.pb.h"
#include "server/cache/model_cache.h"
#include "server/core/byte_size.h"
#include "server/core/checksum_store.h"
#include "server/core/cuda_memory.h"
#include "server/core/host_arena.h"
#include "server/core/log.h"
#include "server/core/torch_runtime.h"
#include "server/metrics/loader_metrics.h"
#include "server/metrics/metrics_server.h"
#include "server/service/call_tracker.h"
#include "server/service/model_loader_service.h"
#include "server/service/path_resolver.h"
#include "server/service/reflection_v1.h"
#include "server/service/request_codec.h"

namespace metaload::service {
namespace {

namespace fs = std::filesystem;

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::InvalidArgumentError(absl::StrCat(what, ": cannot read ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// gRPC only says "cannot listen" when it cannot use a certificate: check the PEM first, with
// OpenSSL, and name the flag that is wrong.
absl::Status CheckPem(const std::string& cert, const std::string& key, const std::string& ca) {
  auto bio = [](const std::string& text) {
    return std::unique_ptr<BIO, decltype(&BIO_free)>(
        BIO_new_mem_buf(text.data(), static_cast<int>(text.size())), BIO_free);
  };
  auto cert_bio = bio(cert);
  std::unique_ptr<X509, decltype(&X509_free)> x509(
      PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr), X509_free);
  if (x509 == nullptr) {
    return absl::InvalidArgumentError("--tls_cert: not a PEM certificate");
  }
  auto key_bio = bio(key);
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> pkey(
      PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr), EVP_PKEY_free);
  if (pkey == nullptr) {
    return absl::InvalidArgumentError("--tls_key: not a PEM private key (or it has a passphrase)");
  }
  if (X509_check_private_key(x509.get(), pkey.get()) != 1) {
    return absl::InvalidArgumentError("--tls_key does not belong to the --tls_cert certificate");
  }
  if (!ca.empty()) {
    auto ca_bio = bio(ca);
    std::unique_ptr<X509, decltype(&X509_free)> ca_x509(
        PEM_read_bio_X509(ca_bio.get(), nullptr, nullptr, nullptr), X509_free);
    if (ca_x509 == nullptr) {
      return absl::InvalidArgumentError("--tls_client_ca: not a PEM certificate");
    }
  }
  ERR_clear_error();
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeCredentials(const Daemon::Options& o) {
  if (o.tls_cert_file.empty() && o.tls_key_file.empty()) {
    if (!o.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (o.tls_cert_file.empty() || o.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key must be given together");
  }
  absl::StatusOr<std::string> cert = ReadFile(o.tls_cert_file, "--tls_cert");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadFile(o.tls_key_file, "--tls_key");
  if (!key.ok()) return key.status();
  std::string ca_pem;
  if (!o.tls_client_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadFile(o.tls_client_ca_file, "--tls_client_ca");
    if (!ca.ok()) return ca.status();
    ca_pem = *ca;
  }
  if (absl::Status pem = CheckPem(*cert, *key, ca_pem); !pem.ok()) return pem;
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({*key, *cert});
  if (!o.tls_client_ca_file.empty()) {
    ssl.pem_root_certs = ca_pem;
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

// Removes gRPC's reflection plugin from one server (linking it registers it for every server).
class WithoutReflection : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [](const std::unique_ptr<grpc::ServerBuilderPlugin>& p) {
                                    return p->name() == "proto_server_reflection";
                                  }),
                   plugins->end());
  }
};

}  // namespace

Daemon::Daemon(Options options) : options_(std::move(options)) {}

Daemon::~Daemon() {
  if (!drained_) Drain(absl::ZeroDuration());
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Create(Options options) {
  for (std::string& root : options.model_roots) {
    std::error_code ec;
    fs::path canonical = fs::canonical(root, ec);
    if (ec || !fs::is_directory(canonical, ec)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--model_root=", root, ": not an existing directory"));
    }
    root = canonical.string();
  }
  if (options.max_message_bytes < kMinMessageBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_message_bytes=", options.max_message_bytes, ": must be at least ",
                     kMinMessageBytes, " (64 KiB; a smaller limit refuses every real request)"));
  }
  if (options.max_infer_input_bytes < 0 || options.max_infer_batch < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_infer_input_bytes=", options.max_infer_input_bytes,
        " --max_infer_batch=", options.max_infer_batch, ": must be 0 (no limit) or positive"));
  }
  if (options.host_arena_bytes < -1 || options.arena_idle_release < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--host_arena=", options.host_arena_bytes, " --arena_idle_release=",
                     absl::FormatDuration(options.arena_idle_release), ": must not be negative"));
  }
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> creds = MakeCredentials(options);
  if (!creds.ok()) return creds.status();

  std::unique_ptr<Daemon> daemon(new Daemon(std::move(options)));
  const Options& o = daemon->options_;

  metrics::MetricsServer::Options metrics_options;
  metrics_options.listen = o.metrics_listen;
  metrics_options.version = o.version;
  absl::StatusOr<std::unique_ptr<metrics::MetricsServer>> metrics =
      metrics::MetricsServer::Create(metrics_options);
  if (!metrics.ok()) return metrics.status();
  daemon->metrics_ = std::move(*metrics);
  daemon->metrics_port_ = daemon->metrics_->port();

  daemon->loader_metrics_ =
      std::make_unique<metrics::LoaderMetrics>(daemon->metrics_->shared_registry());

  core::ChecksumStore::Options checksum_options;
  checksum_options.state_dir = o.state_dir;
  absl::StatusOr<std::unique_ptr<core::ChecksumStore>> checksums =
      core::ChecksumStore::Create(checksum_options);
  if (!checksums.ok()) return checksums.status();
  daemon->checksums_ = *std::move(checksums);
  daemon->resolver_ = std::make_unique<PathResolver>(o.model_roots);

  cache::ModelCache::Options cache_options;
  cache_options.budgets = o.memory_budgets;
  if (!cache_options.budgets.count("cpu")) {
    // 80% of what is free at start, and at each admission at most what the models hold plus
    // 80% of what is free then (other processes may have taken memory since).
    const int64_t available = core::MemAvailableBytes();
    if (available > 0) cache_options.budgets["cpu"] = available / 10 * 8;
    cache_options.budget_follows_available.insert("cpu");
  }
  if (core::CudaAvailable()) {
    for (const core::CudaDeviceMemory& m : core::ReadCudaDeviceMemory()) {
      const std::string device = absl::StrCat("cuda:", m.index);
      if (!cache_options.budgets.count(device)) {
        cache_options.budgets[device] = core::DefaultCudaBudget(m);
      }
    }
  }
  core::SetIntraOpThreads(o.intra_op_threads);
  core::LogInfo("threads")
      .Kv("load", o.load_threads)
      .Kv("infer", o.infer_threads)
      .Kv("intra_op", core::IntraOpThreads());
  // The host arena: by default as large as the cpu budget (admission trims it to what the
  // models leave of the budget, so it never holds memory the budget did not grant).
  const int64_t arena_bytes =
      o.host_arena_bytes >= 0
          ? o.host_arena_bytes
          : (cache_options.budgets.count("cpu") ? cache_options.budgets["cpu"] : 0);
  if (arena_bytes > 0) {
    core::HostArena::Options arena_options;
    arena_options.capacity = static_cast<uint64_t>(arena_bytes);
    // "inf" means never on idle, as 0 does; anything longer than a year is a year (a deadline
    // beyond that would overflow the clock).
    const absl::Duration idle = o.arena_idle_release == absl::InfiniteDuration()
                                    ? absl::ZeroDuration()
                                    : std::min(o.arena_idle_release, absl::Hours(24 * 365));
    arena_options.idle_release = std::chrono::milliseconds(absl::ToInt64Milliseconds(idle));
    daemon->arena_ = std::make_unique<core::HostArena>(arena_options);
    cache_options.host_arena = daemon->arena_.get();
  }
  core::LogInfo("host_arena")
      .Kv("bytes", arena_bytes)
      .Kv("human", core::HumanBytes(arena_bytes))
      .Kv("idle_release", absl::FormatDuration(o.arena_idle_release));
  cache_options.load_threads = std::max(1, o.load_threads);
  cache_options.infer_threads = std::max(1, o.infer_threads);
  cache_options.checksums = daemon->checksums_.get();
  cache_options.model_roots = o.model_roots;
  cache_options.infer_limits.max_reply_bytes = o.max_message_bytes;
  cache_options.infer_limits.max_input_bytes = o.max_infer_input_bytes;
  cache_options.infer_limits.max_batch = o.max_infer_batch;
  cache_options.allow_torchscript = o.allow_torchscript;
  cache_options.observer = daemon->loader_metrics_.get();
  for (const auto& [device, bytes] : cache_options.budgets) {
    core::LogInfo("memory_budget")
        .Kv("device", device)
        .Kv("bytes", bytes)
        .Kv("human", core::HumanBytes(bytes));
  }
  daemon->cache_ = std::make_unique<cache::ModelCache>(cache_options);
  daemon->metrics_->AddCollectable(daemon->loader_metrics_->CacheCollector(daemon->cache_.get()));
  // Before the server starts: a bad preload file stops the start without ever serving.
  if (absl::Status preload = daemon->Preload(); !preload.ok()) return preload;

  grpc::EnableDefaultHealthCheckService(true);
  // The health service's descriptor in the pool reflection serves, so that a tool without
  // proto files can `describe` and call grpc.health.v1.Health (referenced here, or the linker
  // leaves the registering object file out).
  grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  ModelLoaderService::Options service_options;
  service_options.auth_token = o.auth_token;
  daemon->model_loader_ = std::make_unique<ModelLoaderService>(
      daemon->cache_.get(), daemon->resolver_.get(), service_options);
  daemon->calls_ = std::make_unique<CallTracker>();
  metrics::LoaderMetrics* loader_metrics = daemon->loader_metrics_.get();
  daemon->calls_->SetObserver(
      [loader_metrics](const std::string& method, const std::string& code, double s) {
        loader_metrics->ObserveRpc(method, code, s);
      });

  grpc::ServerBuilder builder;
  // gRPC's reflection service is a sync service metaloadd cannot put behind its token check;
  // with a token it is not served at all (README "Threat model"). Health stays open.
  if (!o.auth_token.empty()) builder.SetOption(std::make_unique<WithoutReflection>());
  builder.AddListeningPort(o.listen, *creds, &daemon->grpc_port_);
  builder.SetMaxReceiveMessageSize(o.max_message_bytes);
  builder.SetMaxSendMessageSize(o.max_message_bytes);
  if (o.keepalive_time > absl::ZeroDuration()) {
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                               static_cast<int>(absl::ToInt64Milliseconds(o.keepalive_time)));
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                               static_cast<int>(absl::ToInt64Milliseconds(o.keepalive_timeout)));
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  }
  builder.RegisterService(daemon->model_loader_.get());
  if (o.auth_token.empty()) {
    // grpc.reflection.v1 beside gRPC's v1alpha; the same rule: not served with a token.
    daemon->reflection_v1_ = std::make_unique<ReflectionV1>(std::vector<std::string>{
        metaload::v1::ModelLoader::service_full_name(), "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"});
    builder.RegisterService(daemon->reflection_v1_.get());
  }
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(daemon->calls_->MakeInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  daemon->server_ = builder.BuildAndStart();
  if (daemon->server_ == nullptr || daemon->grpc_port_ == 0) {
    daemon->server_.reset();
    return absl::UnavailableError(absl::StrCat("grpc: cannot listen on ", o.listen));
  }
  daemon->server_->GetHealthCheckService()->SetServingStatus(true);
  if (o.load_stall_timeout > absl::ZeroDuration()) {
    Daemon* d = daemon.get();
    daemon->monitor_ = std::thread([d] { d->MonitorLoads(); });
  }
  return daemon;
}

namespace {

// "id (path) 12.3 s, ..." of the loads running now.
std::string DescribeLoads(const std::vector<cache::ModelCache::RunningLoad>& loads) {
  return absl::StrJoin(loads, ", ", [](std::string* out, const cache::ModelCache::RunningLoad& l) {
    absl::StrAppend(out, l.model_id, " (", l.display_path, ") ", absl::StrFormat("%.1f", l.seconds),
                    " s");
  });
}

}  // namespace

void Daemon::MonitorLoads() {
  const absl::Duration timeout = options_.load_stall_timeout;
  const auto interval = std::chrono::milliseconds(
      std::clamp<int64_t>(absl::ToInt64Milliseconds(timeout) / 4, 50, 1000));
  bool wedged = false;
  std::unique_lock<std::mutex> lock(monitor_mu_);
  while (!monitor_cv_.wait_for(lock, interval, [this] { return monitor_stop_; })) {
    const cache::ModelCache::LoadActivity a = cache_->Activity();
    // Every thread busy, and the youngest of their loads older than the timeout.
    const bool now_wedged = a.threads > 0 && static_cast<int>(a.running.size()) >= a.threads &&
                            a.running.back().seconds >= absl::ToDoubleSeconds(timeout);
    if (now_wedged == wedged) continue;
    wedged = now_wedged;
    server_->GetHealthCheckService()->SetServingStatus(!wedged);
    if (wedged) {
      core::LogError("load_pool_wedged")
          .Kv("threads", a.threads)
          .Kv("queued", a.queued)
          .Kv("stall_timeout", absl::FormatDuration(timeout))
          .Kv("loads", DescribeLoads(a.running))
          .Kv("health", "NOT_SERVING");
    } else {
      core::LogInfo("load_pool_recovered").Kv("health", "SERVING");
    }
  }
}

void Daemon::StopMonitor() {
  {
    std::lock_guard<std::mutex> lock(monitor_mu_);
    monitor_stop_ = true;
  }
  monitor_cv_.notify_all();
  if (monitor_.joinable()) monitor_.join();
}

void Daemon::NoteStillRunning(const char* event) {
  if (cache_ == nullptr) return;
  const cache::ModelCache::LoadActivity a = cache_->Activity();
  std::string running;
  if (!a.running.empty() || a.infers_running > 0) {
    running = absl::StrCat("loads: ", a.running.empty() ? "none" : DescribeLoads(a.running),
                           "; infers: ", a.infers_running);
    core::LogWarning(event).Kv("still_running", running);
  }
  std::lock_guard<std::mutex> lock(still_running_mu_);
  still_running_ = std::move(running);
}

std::string Daemon::StillRunning() const {
  std::lock_guard<std::mutex> lock(still_running_mu_);
  return still_running_;
}

void Daemon::Drain(absl::Duration grace) {
  if (drained_) return;
  drained_ = true;
  StopMonitor();  // before health turns NOT_SERVING for good, and before the cache goes
  if (server_ != nullptr) {
    server_->GetHealthCheckService()->SetServingStatus(false);
    model_loader_->SetDraining();
    // Let in-flight calls finish within the grace, then stop at once: a graceful gRPC shutdown
    // would also wait for idle clients to acknowledge its GOAWAY ping, which can take seconds.
    const bool idle = calls_->WaitIdle(absl::Now() + grace);
    const int64_t cancelled = calls_->active();
    // Stopping the servers waits for every call's handler, and an Infer's waits for its
    // forward: say now what is still running, in case that never ends.
    NoteStillRunning("drain_grace_over");
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
    core::LogDebug("grpc_stopped").Kv("idle", idle ? "true" : "false").Kv("cancelled", cancelled);
  }
  // A scrape from now on must not reach the cache, which goes next.
  if (loader_metrics_) loader_metrics_->Detach();
  NoteStillRunning("drain_cancelling");
  cache_.reset();  // cancels loads in flight and frees every model
  metrics_.reset();
  core::LogDebug("metrics_stopped");
}

absl::Status Daemon::Preload() {
  if (options_.preload_file.empty()) return absl::OkStatus();
  const std::string& file = options_.preload_file;
  std::ifstream in(file);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--preload=", file, ": cannot read"));
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json list = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (!list.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--preload=", file, ": expected a JSON list of LoadModel requests"));
  }
  // Check every entry before loading any, so a typo stops the start instead of half a preload.
  std::vector<cache::LoadSpec> specs;
  for (size_t i = 0; i < list.size(); ++i) {
    metaload::v1::LoadModelRequest request;
    if (!google::protobuf::util::JsonStringToMessage(list[i].dump(), &request).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--preload=", file, ": entry ", i, " is not a LoadModel request: ", list[i].dump()));
    }
    absl::StatusOr<cache::LoadSpec> spec = MakeLoadSpec(request, *resolver_);
    if (absl::IsNotFound(spec.status())) {
      // A model not there (yet) is the operator's to fix; the daemon serves the others.
      core::LogError("preload_failed")
          .Kv("path", request.path())
          .Kv("error", spec.status().ToString());
      continue;
    }
    if (!spec.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--preload=", file, ": entry ", i, ": ", spec.status().message()));
    }
    specs.push_back(*std::move(spec));
  }
  for (const cache::LoadSpec& spec : specs) {
    const std::string id = spec.model_id;
    cache_->Load(spec, nullptr, [id](absl::StatusOr<cache::LoadResult> r) {
      if (r.ok()) {
        core::LogInfo("preloaded").Kv("model_id", id);
      } else {
        core::LogError("preload_failed").Kv("model_id", id).Kv("error", r.status().ToString());
      }
    });
  }
  return absl::OkStatus();
}

}  // namespace metaload::service
