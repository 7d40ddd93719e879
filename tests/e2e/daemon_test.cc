// End to end: the real metaloadd binary on loopback, driven over gRPC and HTTP.
#include <google/protobuf/descriptor.pb.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <set>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1/reflection.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "metaload/v1/metaload.grpc.pb.h"
#include "tests/e2e/daemon_process.h"
#include "tests/test_util.h"

namespace metaload {
namespace {

using namespace std::chrono_literals;

grpc::health::v1::HealthCheckResponse::ServingStatus CheckHealth(
    const std::shared_ptr<grpc::Channel>& channel, grpc::Status* status) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 5s);
  grpc::health::v1::HealthCheckResponse response;
  *status = stub->Check(&context, grpc::health::v1::HealthCheckRequest(), &response);
  return response.status();
}

TEST(DaemonTest, ServesHealthReflectionAndMetricsThenStopsOnSigterm) {
  testing::TempDir dir;
  DaemonProcess daemon(dir);
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  ASSERT_GT(daemon.metrics_port(), 0);
  auto channel = daemon.Channel();

  grpc::Status status;
  EXPECT_EQ(CheckHealth(channel, &status), grpc::health::v1::HealthCheckResponse::SERVING);
  ASSERT_TRUE(status.ok()) << status.error_message();

  // Reflection: list the services, then fetch ModelLoader's file descriptor, as grpcurl does.
  auto reflection = grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 5s);
  auto stream = reflection->ServerReflectionInfo(&context);
  grpc::reflection::v1alpha::ServerReflectionRequest list;
  list.set_list_services("*");
  ASSERT_TRUE(stream->Write(list));
  grpc::reflection::v1alpha::ServerReflectionResponse listed;
  ASSERT_TRUE(stream->Read(&listed));
  std::set<std::string> services;
  for (const auto& s : listed.list_services_response().service()) services.insert(s.name());
  EXPECT_TRUE(services.count("metaload.v1.ModelLoader")) << listed.DebugString();
  EXPECT_TRUE(services.count("grpc.health.v1.Health")) << listed.DebugString();
  EXPECT_TRUE(services.count("grpc.reflection.v1alpha.ServerReflection"));

  grpc::reflection::v1alpha::ServerReflectionRequest describe;
  describe.set_file_containing_symbol("metaload.v1.ModelLoader");
  ASSERT_TRUE(stream->Write(describe));
  grpc::reflection::v1alpha::ServerReflectionResponse described;
  ASSERT_TRUE(stream->Read(&described));
  ASSERT_GE(described.file_descriptor_response().file_descriptor_proto_size(), 1);
  google::protobuf::FileDescriptorProto file;
  ASSERT_TRUE(file.ParseFromString(described.file_descriptor_response().file_descriptor_proto(0)));
  EXPECT_EQ(file.package(), "metaload.v1");
  ASSERT_EQ(file.service_size(), 1);
  std::set<std::string> methods;
  for (const auto& m : file.service(0).method()) methods.insert(m.name());
  EXPECT_EQ(methods, (std::set<std::string>{"LoadModel", "LoadModelStream", "UnloadModel",
                                            "GetModel", "ListModels", "Infer"}));
  // The health service too: a tool without proto files can describe and call it.
  grpc::reflection::v1alpha::ServerReflectionRequest health;
  health.set_file_containing_symbol("grpc.health.v1.Health");
  ASSERT_TRUE(stream->Write(health));
  grpc::reflection::v1alpha::ServerReflectionResponse health_file;
  ASSERT_TRUE(stream->Read(&health_file));
  // The answer holds the file and may hold others (this gRPC resends ModelLoader's); find it.
  google::protobuf::FileDescriptorProto health_proto;
  for (const std::string& f : health_file.file_descriptor_response().file_descriptor_proto()) {
    google::protobuf::FileDescriptorProto candidate;
    if (candidate.ParseFromString(f) && candidate.package() == "grpc.health.v1") {
      health_proto = candidate;
    }
  }
  ASSERT_EQ(health_proto.service_size(), 1) << health_file.DebugString();
  EXPECT_EQ(health_proto.service(0).name(), "Health");
  methods.clear();
  for (const auto& m : health_proto.service(0).method()) methods.insert(m.name());
  EXPECT_EQ(methods, (std::set<std::string>{"Check", "Watch"}));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());

  // grpc.reflection.v1 (what current grpcurl and Postman ask first): the same answers, an
  // unknown symbol an error on the stream, not a failed call.
  {
    auto v1 = grpc::reflection::v1::ServerReflection::NewStub(channel);
    grpc::ClientContext v1_context;
    v1_context.set_deadline(std::chrono::system_clock::now() + 5s);
    auto v1_stream = v1->ServerReflectionInfo(&v1_context);
    grpc::reflection::v1::ServerReflectionRequest q;
    grpc::reflection::v1::ServerReflectionResponse a;
    q.set_list_services("");
    ASSERT_TRUE(v1_stream->Write(q));
    ASSERT_TRUE(v1_stream->Read(&a));
    std::set<std::string> v1_services;
    for (const auto& sv : a.list_services_response().service()) v1_services.insert(sv.name());
    EXPECT_EQ(v1_services,
              (std::set<std::string>{"metaload.v1.ModelLoader", "grpc.health.v1.Health",
                                     "grpc.reflection.v1.ServerReflection",
                                     "grpc.reflection.v1alpha.ServerReflection"}));
    q.set_file_containing_symbol("metaload.v1.ModelLoader.LoadModel");
    ASSERT_TRUE(v1_stream->Write(q));
    ASSERT_TRUE(v1_stream->Read(&a));
    ASSERT_GE(a.file_descriptor_response().file_descriptor_proto_size(), 1) << a.DebugString();
    google::protobuf::FileDescriptorProto last;
    const int n = a.file_descriptor_response().file_descriptor_proto_size();
    ASSERT_TRUE(last.ParseFromString(a.file_descriptor_response().file_descriptor_proto(n - 1)));
    EXPECT_EQ(last.name(), "metaload/v1/metaload.proto");  // its imports come first
    q.set_file_by_filename("grpc/health/v1/health.proto");
    ASSERT_TRUE(v1_stream->Write(q));
    ASSERT_TRUE(v1_stream->Read(&a));
    ASSERT_EQ(a.file_descriptor_response().file_descriptor_proto_size(), 1) << a.DebugString();
    q.set_file_containing_symbol(std::string(4096, 'x'));
    ASSERT_TRUE(v1_stream->Write(q));
    ASSERT_TRUE(v1_stream->Read(&a));
    EXPECT_EQ(a.error_response().error_code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
    EXPECT_EQ(a.original_request().file_containing_symbol().size(), 4096u);
    v1_stream->WritesDone();
    EXPECT_TRUE(v1_stream->Finish().ok());
  }

  // The ModelLoader service answers (with no models yet).
  auto loader = metaload::v1::ModelLoader::NewStub(channel);
  grpc::ClientContext list_context;
  metaload::v1::ListModelsResponse models;
  grpc::Status list_status =
      loader->ListModels(&list_context, metaload::v1::ListModelsRequest(), &models);
  EXPECT_TRUE(list_status.ok()) << list_status.error_message();
  EXPECT_EQ(models.models_size(), 0);

  std::optional<std::string> metrics = testing::HttpGet(daemon.metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.has_value());
  std::optional<double> peak = testing::PromValue(*metrics, "metaload_process_peak_rss_bytes");
  ASSERT_TRUE(peak.has_value()) << *metrics;
  EXPECT_GT(*peak, 4 << 20);
  EXPECT_LT(*peak, 8.0 * (1 << 30));
  std::optional<double> rss = testing::PromValue(*metrics, "metaload_process_resident_bytes");
  ASSERT_TRUE(rss.has_value());
  EXPECT_LE(*rss, *peak);
  EXPECT_EQ(
      testing::PromValue(*metrics, "metaload_build_info", "{version=\"" METALOAD_VERSION "\"}"),
      1.0);

  auto start = std::chrono::steady_clock::now();
  daemon.process().Signal(SIGTERM);
  std::optional<int> exit_status = daemon.process().Wait(5s);
  ASSERT_TRUE(exit_status.has_value()) << "metaloadd did not exit within 5 s of SIGTERM:\n"
                                       << daemon.process().Stderr();
  EXPECT_TRUE(WIFEXITED(*exit_status));
  EXPECT_EQ(WEXITSTATUS(*exit_status), 0);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);

  std::string log = daemon.process().Stderr();
  EXPECT_NE(log.find("info event=serving"), std::string::npos) << log;
  EXPECT_NE(log.find("event=draining signal=SIGTERM"), std::string::npos) << log;
  EXPECT_NE(log.find("event=stopped"), std::string::npos) << log;
}

TEST(DaemonTest, SigintAlsoStopsCleanly) {
  testing::TempDir dir;
  DaemonProcess daemon(dir, {"--shutdown_grace=2s"});
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  daemon.process().Signal(SIGINT);
  std::optional<int> exit_status = daemon.process().Wait(5s);
  ASSERT_TRUE(exit_status.has_value());
  EXPECT_EQ(WEXITSTATUS(*exit_status), 0);
}

TEST(DaemonTest, ServesOnAUnixSocket) {
  testing::TempDir dir;
  const std::string socket = dir / "metaload.sock";
  ASSERT_EQ(testing::RunCommand({METALOAD_CLI_PATH, "synth", "--arch=mlp", dir / "m"}, dir / "s")
                .exit_code,
            0);
  DaemonProcess daemon(dir, {"--listen=unix:" + socket});
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  EXPECT_TRUE(std::filesystem::is_socket(socket));
  auto cli = [&](std::vector<std::string> args) {
    args.insert(args.begin(), METALOAD_CLI_PATH);
    args.push_back("--address=unix:" + socket);
    return testing::RunCommand(args, dir / "cli");
  };
  EXPECT_EQ(cli({"health"}).out, "SERVING\n");
  testing::CommandResult load = cli({"load", "m", "--quiet"});
  ASSERT_EQ(load.exit_code, 0) << load.err;
  testing::CommandResult infer =
      cli({"infer", "m", "--input=input=FP32:1x16:1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16"});
  ASSERT_EQ(infer.exit_code, 0) << infer.err;
  EXPECT_NE(infer.out.find("output FP32[1x8]"), std::string::npos) << infer.out;
  daemon.process().Signal(SIGTERM);
  ASSERT_TRUE(daemon.process().Wait(5s).has_value());
  EXPECT_NE(daemon.process().Stderr().find("grpc=unix:" + socket + " "), std::string::npos)
      << daemon.process().Stderr();
  EXPECT_FALSE(std::filesystem::exists(socket));
}

TEST(DaemonTest, RepeatedModelRootsAreAllUsed) {
  testing::TempDir dir;
  std::filesystem::create_directory(dir / "a");
  std::filesystem::create_directory(dir / "b");
  DaemonProcess daemon(dir, {"--model_root=" + (dir / "a"), "--model_root", dir / "b",
                             "--intra_op_threads=1", "--infer_threads=3"});
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  daemon.process().Signal(SIGTERM);
  ASSERT_TRUE(daemon.process().Wait(5s).has_value());
  std::string log = daemon.process().Stderr();
  EXPECT_NE(log.find("model_roots=2"), std::string::npos) << log;
  EXPECT_NE(log.find("event=model_root path=" + (dir / "b")), std::string::npos) << log;
  EXPECT_NE(log.find("event=threads load=2 infer=3 intra_op=1"), std::string::npos) << log;
}

TEST(DaemonTest, BadStartupOptionsExitWithAMessage) {
  testing::TempDir dir;
  testing::CommandResult missing_root =
      testing::RunCommand({METALOADD_PATH, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                           "--model_root=" + (dir / "nope")},
                          dir / "missing_root", 30s);
  EXPECT_EQ(missing_root.exit_code, 1);
  EXPECT_NE(missing_root.err.find("--model_root=" + (dir / "nope") + ": not an existing directory"),
            std::string::npos)
      << missing_root.err;

  testing::CommandResult half_tls =
      testing::RunCommand({METALOADD_PATH, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                           "--tls_cert=" + (dir / "cert.pem")},
                          dir / "half_tls", 30s);
  EXPECT_EQ(half_tls.exit_code, 1);
  EXPECT_NE(half_tls.err.find("--tls_cert and --tls_key must be given together"), std::string::npos)
      << half_tls.err;

  testing::CommandResult bad_level =
      testing::RunCommand({METALOADD_PATH, "--log_level=loud"}, dir / "bad_level", 30s);
  EXPECT_EQ(bad_level.exit_code, 2);
}

TEST(DaemonTest, BusyPortIsReportedByAddress) {
  testing::TempDir dir;
  DaemonProcess first(dir);
  ASSERT_GT(first.grpc_port(), 0) << first.process().Stderr();
  const std::string taken = "127.0.0.1:" + std::to_string(first.metrics_port());
  testing::CommandResult second = testing::RunCommand(
      {METALOADD_PATH, "--listen=127.0.0.1:0", "--metrics_listen=" + taken}, dir / "second", 30s);
  EXPECT_EQ(second.exit_code, 1);
  EXPECT_NE(second.err.find("cannot listen on " + taken), std::string::npos) << second.err;
  first.process().Signal(SIGTERM);
  EXPECT_TRUE(first.process().Wait(5s).has_value());
}

}  // namespace
}  // namespace metaload

namespace metaload {
namespace {

// --preload: the listed models load at start (pin honoured); a missing one is logged and the
// others still load; a malformed file or entry stops the start with a message naming it.
TEST(DaemonTest, PreloadLoadsTheListAtStart) {
  testing::TempDir dir;
  for (const char* preset : {"tiny", "small"}) {
    testing::CommandResult r =
        testing::RunCommand({METALOAD_CLI_PATH, "synth", "--arch=mlp",
                             std::string("--preset=") + preset, dir / (std::string("m/") + preset)},
                            dir / "synth");
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  std::ofstream(dir / "preload.json") << R"([
    {"path": "tiny", "modelId": "first", "pin": true},
    {"path": "small", "model_id": "second", "dtype": "bfloat16"},
    {"path": "gone.safetensors"}
  ])";
  DaemonProcess daemon(dir, {"--model_root=" + (dir / "m"), "--preload=" + (dir / "preload.json")});
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  auto stub = metaload::v1::ModelLoader::NewStub(daemon.Channel());
  std::map<std::string, metaload::v1::ModelInfo> models;
  for (int i = 0; i < 500; ++i) {
    grpc::ClientContext context;
    metaload::v1::ListModelsResponse list;
    ASSERT_TRUE(stub->ListModels(&context, metaload::v1::ListModelsRequest(), &list).ok());
    models.clear();
    int ready = 0;
    for (const auto& m : list.models()) {
      models[m.model_id()] = m;
      ready += m.state() == "READY";
    }
    if (ready == 2) break;
    std::this_thread::sleep_for(20ms);
  }
  ASSERT_EQ(models.size(), 2u) << daemon.process().Stderr();
  EXPECT_EQ(models["first"].state(), "READY");
  EXPECT_EQ(models["first"].path(), "tiny");
  EXPECT_EQ(models["second"].dtype(), "bfloat16");
  const std::string log = daemon.process().Stderr();
  EXPECT_NE(log.find("event=preloaded model_id=first"), std::string::npos) << log;
  EXPECT_NE(log.find("error event=preload_failed path=gone.safetensors"), std::string::npos) << log;

  for (const auto& [name, text] : std::vector<std::pair<std::string, std::string>>{
           {"object", R"({"path": "tiny"})"},
           {"field", R"([{"path": "tiny", "colour": "red"}])"},
           {"dtype", R"([{"path": "tiny"}, {"path": "small", "dtype": "float8"}])"},
       }) {
    std::ofstream(dir / (name + ".json")) << text;
    testing::CommandResult bad = testing::RunCommand(
        {METALOADD_PATH, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
         "--model_root=" + (dir / "m"), "--preload=" + (dir / (name + ".json"))},
        dir / ("bad_" + name), 30s);
    EXPECT_EQ(bad.exit_code, 1) << name << ": " << bad.err;
    EXPECT_NE(bad.err.find("--preload=" + (dir / (name + ".json"))), std::string::npos)
        << name << ": " << bad.err;
  }
}

}  // namespace
}  // namespace metaload
