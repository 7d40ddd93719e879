// TLS and mutual TLS end to end, with certificates made by openssl in the test.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "grpc/health/v1/health.grpc.pb.h"
#include "metaload/v1/metaload.grpc.pb.h"
#include "tests/e2e/daemon_process.h"
#include "tests/test_util.h"

namespace metaload {
namespace {

// A CA, and a server and a client certificate signed by it (server valid for 127.0.0.1).
void MakeCertificates(const testing::TempDir& dir) {
  const std::string script =
      "set -e; cd '" + dir.path() +
      "'\n"
      "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj "
      "/CN=test-ca 2>/dev/null\n"
      "for n in server client; do\n"
      "  openssl req -newkey rsa:2048 -nodes -keyout $n.key -out $n.csr -subj /CN=$n 2>/dev/null\n"
      "  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > $n.ext\n"
      "  openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $n.pem -days 1 "
      "-extfile $n.ext 2>/dev/null\n"
      "done\n";
  testing::CommandResult r = testing::RunCommand({"/bin/bash", "-c", script}, dir / "openssl");
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

grpc::Status List(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = metaload::v1::ModelLoader::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 10s);
  metaload::v1::ListModelsResponse response;
  return stub->ListModels(&context, metaload::v1::ListModelsRequest(), &response);
}

std::shared_ptr<grpc::Channel> TlsChannel(const testing::TempDir& dir, int port, bool client_cert) {
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = testing::ReadFileOrEmpty(dir / "ca.pem");
  if (client_cert) {
    ssl.pem_cert_chain = testing::ReadFileOrEmpty(dir / "client.pem");
    ssl.pem_private_key = testing::ReadFileOrEmpty(dir / "client.key");
  }
  return grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::SslCredentials(ssl));
}

TEST(TlsTest, ServerTlsAndMutualTls) {
  testing::TempDir dir;
  MakeCertificates(dir);
  {
    DaemonProcess daemon(
        dir, {"--tls_cert=" + (dir / "server.pem"), "--tls_key=" + (dir / "server.key")});
    ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
    EXPECT_TRUE(List(TlsChannel(dir, daemon.grpc_port(), false)).ok());
    // A plaintext client cannot talk to a TLS server.
    grpc::Status plain = List(daemon.Channel());
    EXPECT_EQ(plain.error_code(), grpc::StatusCode::UNAVAILABLE) << plain.error_message();
    EXPECT_NE(daemon.process().Stderr().find("tls=on"), std::string::npos);
  }
  {
    DaemonProcess daemon(dir,
                         {"--tls_cert=" + (dir / "server.pem"), "--tls_key=" + (dir / "server.key"),
                          "--tls_client_ca=" + (dir / "ca.pem")});
    ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
    grpc::Status with_cert = List(TlsChannel(dir, daemon.grpc_port(), true));
    EXPECT_TRUE(with_cert.ok()) << with_cert.error_message();
    grpc::Status without = List(TlsChannel(dir, daemon.grpc_port(), false));
    EXPECT_EQ(without.error_code(), grpc::StatusCode::UNAVAILABLE) << without.error_message();
  }
}

}  // namespace
}  // namespace metaload
