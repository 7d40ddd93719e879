#include "server/service/daemon.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/log.h"
#include "server/metrics/metrics_server.h"
#include "server/service/call_tracker.h"
#include "server/service/model_loader_service.h"

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
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({*key, *cert});
  if (!o.tls_client_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadFile(o.tls_client_ca_file, "--tls_client_ca");
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

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
  if (options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError("--max_message_bytes must be positive");
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

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  daemon->model_loader_ = std::make_unique<ModelLoaderService>();
  daemon->calls_ = std::make_unique<CallTracker>();

  grpc::ServerBuilder builder;
  builder.AddListeningPort(o.listen, *creds, &daemon->grpc_port_);
  builder.SetMaxReceiveMessageSize(o.max_message_bytes);
  builder.SetMaxSendMessageSize(o.max_message_bytes);
  builder.RegisterService(daemon->model_loader_.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(daemon->calls_->MakeInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  daemon->server_ = builder.BuildAndStart();
  if (daemon->server_ == nullptr || daemon->grpc_port_ == 0) {
    daemon->server_.reset();
    return absl::UnavailableError(absl::StrCat("grpc: cannot listen on ", o.listen));
  }
  daemon->server_->GetHealthCheckService()->SetServingStatus(true);
  return daemon;
}

void Daemon::Drain(absl::Duration grace) {
  if (drained_) return;
  drained_ = true;
  if (server_ != nullptr) {
    server_->GetHealthCheckService()->SetServingStatus(false);
    // Let in-flight calls finish within the grace, then stop at once: a graceful gRPC shutdown
    // would also wait for idle clients to acknowledge its GOAWAY ping, which can take seconds.
    const bool idle = calls_->WaitIdle(absl::Now() + grace);
    const int64_t cancelled = calls_->active();
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
    core::LogDebug("grpc_stopped").Kv("idle", idle ? "true" : "false").Kv("cancelled", cancelled);
  }
  metrics_.reset();
  core::LogDebug("metrics_stopped");
}

}  // namespace metaload::service
