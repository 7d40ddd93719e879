// metaload.v1.ModelLoader end to end: the real daemon on loopback, real checkpoints written by
// the synthesizer and by Python, every RPC's happy path and every row of proto/README.md's error
// table.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "grpc/reflection/v1/reflection.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "metaload/v1/metaload.grpc.pb.h"
#include "tests/e2e/daemon_process.h"
#include "tests/test_util.h"

namespace metaload {
namespace {

using metaload::v1::ModelLoader;

class ServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    std::filesystem::create_directories(*dir_ / "models");
    for (const char* arch : {"mlp", "gpt2"}) {
      testing::CommandResult r =
          testing::RunCommand({METALOAD_PYTHON, METALOAD_SOURCE_DIR "/tests/tools/ref_models.py",
                               arch, *dir_ / (std::string("models/ref_") + arch)},
                              *dir_ / "py");
      ASSERT_EQ(r.exit_code, 0) << r.err;
    }
    for (const char* preset : {"small", "tiny"}) {
      testing::CommandResult r = testing::RunCommand(
          {METALOAD_CLI_PATH, "synth", "--arch=mlp", std::string("--preset=") + preset,
           *dir_ / (std::string("models/mlp_") + preset)},
          *dir_ / "synth");
      ASSERT_EQ(r.exit_code, 0) << r.err;
    }
    std::ofstream(*dir_ / "models/corrupt.safetensors", std::ios::binary)
        << std::string("\x0a\0\0\0\0\0\0\0{\"a\": 1}  ", 18);
    std::ofstream(*dir_ / "outside.safetensors") << "x";
    std::filesystem::create_symlink(*dir_ / "outside.safetensors",
                                    *dir_ / "models/escape.safetensors");
    daemon_ = new DaemonProcess(*dir_, {"--model_root=" + (*dir_ / "models")});
  }
  static void TearDownTestSuite() {
    delete daemon_;
    delete dir_;
  }

  void SetUp() override {
    ASSERT_GT(daemon_->grpc_port(), 0) << daemon_->process().Stderr();
    stub_ = ModelLoader::NewStub(daemon_->Channel());
  }

  grpc::Status Load(const std::string& path, metaload::v1::LoadModelResponse* response,
                    const std::function<void(metaload::v1::LoadModelRequest*)>& edit = nullptr) {
    metaload::v1::LoadModelRequest request;
    request.set_path(path);
    if (edit) edit(&request);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 60s);
    return stub_->LoadModel(&context, request, response);
  }
  grpc::Status Unload(const std::string& id) {
    metaload::v1::UnloadModelRequest request;
    request.set_model_id(id);
    metaload::v1::UnloadModelResponse response;
    grpc::ClientContext context;
    return stub_->UnloadModel(&context, request, &response);
  }
  grpc::Status Infer(const metaload::v1::InferRequest& request,
                     metaload::v1::InferResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 30s);
    return stub_->Infer(&context, request, response);
  }

  static testing::TempDir* dir_;
  static DaemonProcess* daemon_;
  std::unique_ptr<ModelLoader::Stub> stub_;
};

testing::TempDir* ServiceTest::dir_ = nullptr;
DaemonProcess* ServiceTest::daemon_ = nullptr;

metaload::v1::Tensor Fp32Tensor(const std::string& name, const std::vector<int64_t>& shape,
                                const std::vector<float>& values, bool raw) {
  metaload::v1::Tensor t;
  t.set_name(name);
  t.set_datatype("FP32");
  for (int64_t d : shape) t.add_shape(d);
  if (raw) {
    t.set_raw_data(std::string(reinterpret_cast<const char*>(values.data()), values.size() * 4));
  } else {
    for (float v : values) t.add_fp32_contents(v);
  }
  return t;
}

// max |got - expected| / max |expected| over two float32 byte strings of the same size.
float MaxRelativeError(const std::string& got, const std::string& expected) {
  float max_err = 0, max_abs = 0;
  for (size_t i = 0; i < expected.size() / 4; ++i) {
    float a, b;
    std::memcpy(&a, got.data() + 4 * i, 4);
    std::memcpy(&b, expected.data() + 4 * i, 4);
    max_err = std::max(max_err, std::fabs(a - b));
    max_abs = std::max(max_abs, std::fabs(b));
  }
  return max_err / max_abs;
}

TEST_F(ServiceTest, LoadInferGetListUnloadMatchPython) {
  metaload::v1::LoadModelResponse loaded;
  grpc::Status s = Load("ref_mlp", &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(loaded.cache_hit());
  EXPECT_EQ(loaded.model().model_id(), "ref_mlp");
  EXPECT_EQ(loaded.model().state(), "READY");
  EXPECT_EQ(loaded.model().architecture(), "mlp");
  EXPECT_EQ(loaded.model().device(), "cpu");
  EXPECT_EQ(loaded.model().parameter_count(), 12 * 24 + 24 + 24 * 24 + 24 + 24 * 5 + 5);
  EXPECT_EQ(loaded.model().resident_bytes(), loaded.model().parameter_count() * 4);
  EXPECT_GT(loaded.stats().total_seconds(), 0);
  EXPECT_EQ(loaded.stats().bytes_read(), loaded.model().resident_bytes());
  ASSERT_EQ(loaded.model().entries_size(), 1);
  EXPECT_EQ(loaded.model().entries(0).name(), "forward");
  EXPECT_EQ(loaded.model().entries(0).inputs(0).name(), "input");

  metaload::v1::LoadModelResponse again;
  ASSERT_TRUE(Load("ref_mlp", &again).ok());
  EXPECT_TRUE(again.cache_hit());

  nlohmann::json inputs =
      nlohmann::json::parse(testing::ReadFileOrEmpty(*dir_ / "models/ref_mlp/inputs.json"));
  std::vector<float> x;
  for (const auto& row : inputs["input"])
    for (const auto& v : row) x.push_back(v.get<float>());
  const std::string expected_bytes =
      testing::ReadFileOrEmpty(*dir_ / "models/ref_mlp/expected.bin");
  std::vector<float> expected(expected_bytes.size() / 4);
  std::memcpy(expected.data(), expected_bytes.data(), expected_bytes.size());
  for (bool raw : {true, false}) {
    metaload::v1::InferRequest request;
    request.set_model_id("ref_mlp");
    *request.add_inputs() = Fp32Tensor("input", {3, 12}, x, raw);
    request.set_typed_outputs(!raw);
    metaload::v1::InferResponse response;
    grpc::Status is = Infer(request, &response);
    ASSERT_TRUE(is.ok()) << is.error_message();
    ASSERT_EQ(response.outputs_size(), 1);
    const metaload::v1::Tensor& out = response.outputs(0);
    EXPECT_EQ(out.name(), "output");
    EXPECT_EQ(out.datatype(), "FP32");
    EXPECT_EQ(std::vector<int64_t>(out.shape().begin(), out.shape().end()),
              (std::vector<int64_t>{3, 5}));
    std::vector<float> got(15);
    if (raw) {
      ASSERT_EQ(out.raw_data().size(), 60u);
      std::memcpy(got.data(), out.raw_data().data(), 60);
    } else {
      ASSERT_EQ(out.fp32_contents_size(), 15);
      got.assign(out.fp32_contents().begin(), out.fp32_contents().end());
    }
    for (size_t i = 0; i < 15; ++i) EXPECT_NEAR(got[i], expected[i], 1e-5) << i;
  }

  metaload::v1::GetModelRequest get;
  get.set_model_id("ref_mlp");
  metaload::v1::ModelInfo info;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->GetModel(&context, get, &info).ok());
  }
  EXPECT_EQ(info.infer_count(), 2);
  EXPECT_GE(info.last_used_unix_ms(), info.loaded_at_unix_ms());
  // The background hash arrives shortly after the load.
  for (int i = 0; i < 100 && info.sha256().empty(); ++i) {
    std::this_thread::sleep_for(50ms);
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->GetModel(&context, get, &info).ok());
  }
  EXPECT_EQ(info.sha256().size(), 64u);
  EXPECT_EQ(info.short_hash(), info.sha256().substr(0, 10));

  metaload::v1::ListModelsResponse list;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->ListModels(&context, metaload::v1::ListModelsRequest(), &list).ok());
  }
  bool listed = false;
  for (const auto& m : list.models()) listed |= m.model_id() == "ref_mlp";
  EXPECT_TRUE(listed);
  EXPECT_GE(list.resident_bytes_by_device().at("cpu"), loaded.model().resident_bytes());

  ASSERT_TRUE(Unload("ref_mlp").ok());
  grpc::ClientContext context;
  EXPECT_EQ(stub_->GetModel(&context, get, &info).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Unload("ref_mlp").error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(ServiceTest, Gpt2ThroughGrpcMatchesPython) {
  metaload::v1::LoadModelResponse loaded;
  ASSERT_TRUE(Load("ref_gpt2", &loaded, [](auto* r) { r->set_model_id("g"); }).ok());
  nlohmann::json inputs =
      nlohmann::json::parse(testing::ReadFileOrEmpty(*dir_ / "models/ref_gpt2/inputs.json"));
  metaload::v1::InferRequest request;
  request.set_model_id("g");
  for (const char* name : {"input_ids", "attention_mask"}) {
    metaload::v1::Tensor* t = request.add_inputs();
    t->set_name(name);
    t->set_datatype("INT64");
    t->add_shape(2);
    t->add_shape(7);
    for (const auto& row : inputs[name])
      for (const auto& v : row) t->add_int64_contents(v.get<int64_t>());
  }
  metaload::v1::InferResponse response;
  grpc::Status s = Infer(request, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  const std::string expected = testing::ReadFileOrEmpty(*dir_ / "models/ref_gpt2/expected.bin");
  ASSERT_EQ(response.outputs(0).raw_data().size(), expected.size());
  EXPECT_LE(MaxRelativeError(response.outputs(0).raw_data(), expected), 1e-4);
  ASSERT_TRUE(Unload("g").ok());
}

// The web UI backend's switch: an SD1 checkpoint loaded with no dtype gets the web UI's
// policy (and is a different model from "keep"); the VAE, kept in float32, runs on the CPU and
// gives the Python reference's image.
TEST_F(ServiceTest, Sd1WithTheWebUiDtypesThroughGrpc) {
  testing::CommandResult sd = testing::RunCommand(
      {METALOAD_PYTHON, METALOAD_SOURCE_DIR "/tests/tools/ref_sd1.py", *dir_ / "models/sd1"},
      *dir_ / "py_sd1");
  ASSERT_EQ(sd.exit_code, 0) << sd.err;
  metaload::v1::LoadModelResponse loaded;
  grpc::Status s = Load("sd1/model.safetensors", &loaded, [](auto* r) { r->set_model_id("sd"); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(loaded.model().architecture(), "sd1");
  EXPECT_EQ(loaded.model().dtype(),
            "default=float16;alphas_cumprod=keep;first_stage_model.=keep;float8=keep");
  ASSERT_EQ(loaded.model().entries_size(), 4);
  EXPECT_EQ(loaded.model().entries(0).name(), "unet");
  EXPECT_EQ(loaded.model().entries(3).name(), "vae_encode");
  // Each network's storage and compute dtypes: float16 networks compute in float32 on a cpu.
  for (int i : {0, 1}) {
    EXPECT_EQ(loaded.model().entries(i).storage_dtype(), "float16") << i;
    EXPECT_EQ(loaded.model().entries(i).compute_dtype(), "float32") << i;
  }
  EXPECT_EQ(loaded.model().entries(2).storage_dtype(), "float32");
  EXPECT_EQ(loaded.model().entries(2).compute_dtype(), "float32");

  const std::string ref = *dir_ / "models/sd1/";
  std::string latents = testing::ReadFileOrEmpty(ref + "vae_decode.latents.bin");
  metaload::v1::InferRequest request;
  request.set_model_id("sd");
  request.set_entry("vae_decode");
  metaload::v1::Tensor* t = request.add_inputs();
  t->set_name("latents");
  t->set_datatype("FP32");
  for (int64_t d : {1, 4, 8, 8}) t->add_shape(d);
  t->set_raw_data(latents);
  metaload::v1::InferResponse response;
  s = Infer(request, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(response.outputs(0).name(), "image");
  EXPECT_EQ(response.outputs(0).datatype(), "FP32");
  const std::string expected = testing::ReadFileOrEmpty(ref + "vae_decode.out.bin");
  ASSERT_EQ(response.outputs(0).raw_data().size(), expected.size());
  EXPECT_LE(MaxRelativeError(response.outputs(0).raw_data(), expected), 1e-4);

  // The float16-stored UNet runs on the CPU, computing in float32.
  request.set_entry("unet");
  request.clear_inputs();
  *request.add_inputs() = Fp32Tensor("x", {1, 4, 8, 8}, std::vector<float>(256, 0.1f), true);
  metaload::v1::Tensor* steps = request.add_inputs();
  steps->set_name("timesteps");
  steps->set_datatype("INT64");
  steps->add_shape(1);
  steps->add_int64_contents(10);
  *request.add_inputs() = Fp32Tensor("context", {1, 2, 128}, std::vector<float>(256, 0.1f), true);
  s = Infer(request, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.outputs(0).datatype(), "FP32");
  const std::string eps16 = response.outputs(0).raw_data();

  // "keep" is another model: no cache hit, the file's float32 everywhere; the same UNet output
  // but for the float16 rounding of the weights.
  metaload::v1::LoadModelResponse kept;
  s = Load("sd1/model.safetensors", &kept, [](auto* r) {
    r->set_model_id("sd32");
    r->set_dtype("keep");
  });
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(kept.cache_hit());
  EXPECT_EQ(kept.model().dtype(), "keep");
  EXPECT_GT(kept.model().resident_bytes(), loaded.model().resident_bytes());
  request.set_model_id("sd32");
  s = Infer(request, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.outputs(0).name(), "eps");
  ASSERT_EQ(response.outputs(0).raw_data().size(), eps16.size());
  const double rounding = MaxRelativeError(eps16, response.outputs(0).raw_data());
  EXPECT_GT(rounding, 0.0);
  EXPECT_LE(rounding, 1e-2);
  ASSERT_TRUE(Unload("sd").ok());
  ASSERT_TRUE(Unload("sd32").ok());
}

// SD2 through gRPC: ModelInfo says what the UNet predicts and how that was told; a request's
// prediction wins and is another model; a bad or misplaced prediction is refused.
TEST_F(ServiceTest, Sd2PredictionThroughGrpc) {
  testing::CommandResult sd = testing::RunCommand(
      {METALOAD_PYTHON, METALOAD_SOURCE_DIR "/tests/tools/ref_sd2.py", *dir_ / "models/sd2", "--v"},
      *dir_ / "py_sd2");
  ASSERT_EQ(sd.exit_code, 0) << sd.err;
  metaload::v1::LoadModelResponse read;
  grpc::Status s = Load("sd2/model.safetensors", &read, [](auto* r) { r->set_model_id("v"); });
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(read.model().architecture(), "sd2");
  EXPECT_EQ(read.model().diffusion().prediction(), "v");
  EXPECT_NE(read.model().diffusion().prediction_source().find("weights: std of"),
            std::string::npos);
  EXPECT_DOUBLE_EQ(read.model().diffusion().vae_scale_factor(), 0.18215);
  EXPECT_EQ(read.model().entries(0).outputs(0).name(), "model_output");

  metaload::v1::LoadModelResponse told;
  s = Load("sd2/model.safetensors", &told, [](auto* r) {
    r->set_model_id("eps");
    r->set_prediction("epsilon");
  });
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(told.cache_hit());
  EXPECT_EQ(told.model().diffusion().prediction(), "epsilon");
  EXPECT_EQ(told.model().diffusion().prediction_source(), "request");
  metaload::v1::GetModelRequest get;
  get.set_model_id("eps");
  metaload::v1::ModelInfo info;
  grpc::ClientContext context;
  ASSERT_TRUE(stub_->GetModel(&context, get, &info).ok());
  EXPECT_EQ(info.diffusion().prediction_source(), "request");

  metaload::v1::LoadModelResponse refused;
  s = Load("sd2/model.safetensors", &refused, [](auto* r) {
    r->set_model_id("bad");
    r->set_prediction(std::string(1 << 20, 'v'));
  });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_LT(s.error_message().size(), 200u);  // the 1 MiB value is not echoed
  s = Load("mlp_small", &refused, [](auto* r) {
    r->set_model_id("mlp_v");
    r->set_prediction("v");
  });
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NE(s.error_message().find("applies to diffusion models"), std::string::npos);
  ASSERT_TRUE(Unload("v").ok());
  ASSERT_TRUE(Unload("eps").ok());
}

// The web UI's VAE swap through gRPC: the VAE from its own file is another model in the cache,
// ModelInfo names the file and keeps the checkpoint's hash; a VAE file that does not fit, or
// is not a VAE, or lies outside the roots, fails naming it.
TEST_F(ServiceTest, Sd1WithAVaeFromAnotherFileThroughGrpc) {
  for (const char* script : {"ref_sd1.py", "ref_sd2.py"}) {
    const std::string name = std::string(script).substr(4, 3);  // "sd1", "sd2"
    testing::CommandResult r = testing::RunCommand(
        {METALOAD_PYTHON, METALOAD_SOURCE_DIR "/tests/tools/" + std::string(script),
         *dir_ / ("models/vae_" + name), "--vae-files"},
        *dir_ / ("py_vae_" + name));
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  metaload::v1::LoadModelResponse own, swapped;
  ASSERT_TRUE(
      Load("vae_sd1/model.safetensors", &own, [](auto* r) { r->set_model_id("own"); }).ok());
  grpc::Status s = Load("vae_sd1/model.safetensors", &swapped, [](auto* r) {
    r->set_model_id("swapped");
    r->set_vae_path("vae_sd2/vae.ckpt");
  });
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(swapped.cache_hit());
  EXPECT_EQ(swapped.model().vae_path(), "vae_sd2/vae.ckpt");
  EXPECT_EQ(own.model().vae_path(), "");
  EXPECT_EQ(swapped.stats().unexpected_keys_size(), 1);  // the VAE file's loss.logvar
  // The swapped VAE decodes as the other file's does.
  const std::string ref = *dir_ / "models/vae_sd2/";
  metaload::v1::InferRequest request;
  request.set_model_id("swapped");
  request.set_entry("vae_decode");
  metaload::v1::Tensor* t = request.add_inputs();
  t->set_name("latents");
  t->set_datatype("FP32");
  for (int64_t d : {1, 4, 8, 8}) t->add_shape(d);
  t->set_raw_data(testing::ReadFileOrEmpty(ref + "vae_decode.latents.bin"));
  metaload::v1::InferResponse response;
  s = Infer(request, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_LE(MaxRelativeError(response.outputs(0).raw_data(),
                             testing::ReadFileOrEmpty(ref + "vae_decode.out.bin")),
            1e-4);
  // Both hash the checkpoint alone.
  auto sha = [&](const std::string& id) {
    metaload::v1::GetModelRequest get;
    get.set_model_id(id);
    metaload::v1::ModelInfo info;
    for (int i = 0; i < 100 && info.sha256().empty(); ++i) {
      std::this_thread::sleep_for(50ms);
      grpc::ClientContext context;
      EXPECT_TRUE(stub_->GetModel(&context, get, &info).ok());
    }
    return info.sha256();
  };
  EXPECT_EQ(sha("swapped"), sha("own"));
  EXPECT_EQ(sha("own").size(), 64u);

  auto refused = [&](const std::string& vae,
                     const std::string& path = "vae_sd1/model.safetensors") {
    metaload::v1::LoadModelResponse ignored;
    return Load(path, &ignored, [&](auto* r) {
      r->set_model_id("bad_vae");
      r->set_vae_path(vae);
    });
  };
  s = refused("mlp_small/model.safetensors");  // keys that are no VAE's
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NE(s.error_message().find("comes from the VAE file 'mlp_small/model.safetensors'"),
            std::string::npos)
      << s.error_message();
  s = refused("corrupt.safetensors");
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.error_message().find("corrupt.safetensors"), std::string::npos) << s.error_message();
  // Named as the caller named it: the daemon's model root stays out of the message.
  EXPECT_EQ(s.error_message().find(*dir_ / "models"), std::string::npos) << s.error_message();
  s = refused("ref_mlp");  // a directory, and no VAE
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  s = refused("../outside.safetensors");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("vae_path"), std::string::npos) << s.error_message();
  s = refused("escape.safetensors");  // a symlink out of the root
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  s = refused("nothing.safetensors");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  EXPECT_NE(s.error_message().find("vae_path: "), std::string::npos) << s.error_message();
  EXPECT_NE(s.error_message().find("nothing.safetensors"), std::string::npos);
  s = refused("vae_sd2/vae.ckpt", "mlp_small");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NE(s.error_message().find("vae_path applies to Stable Diffusion"), std::string::npos);
  ASSERT_TRUE(Unload("own").ok());
  ASSERT_TRUE(Unload("swapped").ok());
}

TEST_F(ServiceTest, StreamReportsProgressThenTheResult) {
  metaload::v1::LoadModelRequest request;
  request.set_path("mlp_small");
  request.set_model_id("streamed");
  grpc::ClientContext context;
  auto reader = stub_->LoadModelStream(&context, request);
  std::vector<metaload::v1::LoadEvent> events;
  metaload::v1::LoadEvent e;
  while (reader->Read(&e)) events.push_back(e);
  grpc::Status s = reader->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.front().phase(), "queued");
  EXPECT_EQ(events.back().phase(), "done");
  EXPECT_EQ(events.back().result().model().state(), "READY");
  EXPECT_EQ(events.back().result().model().model_id(), "streamed");
  for (size_t i = 0; i + 1 < events.size(); ++i) EXPECT_FALSE(events[i].has_result());
  ASSERT_TRUE(Unload("streamed").ok());
}

TEST_F(ServiceTest, ConcurrentIdenticalLoadsShareOne) {
  const std::string series = "{architecture=\"mlp\",device=\"cpu\",outcome=\"ok\"}";
  auto loads = [&] {
    std::optional<std::string> m = testing::HttpGet(daemon_->metrics_port(), "/metrics");
    return m ? testing::PromValue(*m, "metaload_load_duration_seconds_count", series).value_or(0)
             : -1;
  };
  const double before = loads();
  std::vector<std::thread> threads;
  std::atomic<int> ok{0}, hits{0};
  for (int i = 0; i < 32; ++i) {
    threads.emplace_back([&] {
      auto stub = ModelLoader::NewStub(daemon_->Channel());
      metaload::v1::LoadModelRequest request;
      request.set_path("mlp_small");
      request.set_model_id("shared");
      metaload::v1::LoadModelResponse response;
      grpc::ClientContext context;
      if (stub->LoadModel(&context, request, &response).ok()) {
        ++ok;
        hits += response.cache_hit();
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 32);
  // Exactly one load ran: the others coalesced onto it or hit the cache after it.
  EXPECT_EQ(loads() - before, 1.0);
  EXPECT_LE(hits.load(), 31);
  ASSERT_TRUE(Unload("shared").ok());
}

TEST_F(ServiceTest, ErrorTable) {
  struct Case {
    const char* what;
    std::function<void(metaload::v1::LoadModelRequest*)> edit;
    grpc::StatusCode code;
    const char* message;
  };
  const std::string outside = *dir_ / "outside.safetensors";
  std::vector<Case> cases = {
      {"empty path", [](auto* r) { r->set_path(""); }, grpc::StatusCode::INVALID_ARGUMENT,
       "path is empty"},
      {"unknown dtype", [](auto* r) { r->set_dtype("float8"); }, grpc::StatusCode::INVALID_ARGUMENT,
       "float8"},
      {"unknown device", [](auto* r) { r->set_device("tpu"); }, grpc::StatusCode::INVALID_ARGUMENT,
       "tpu"},
      {"unknown compute_dtype", [](auto* r) { r->set_compute_dtype("int8"); },
       grpc::StatusCode::INVALID_ARGUMENT, "compute_dtype 'int8'"},
      {"float16 compute on cpu", [](auto* r) { r->set_compute_dtype("float16"); },
       grpc::StatusCode::FAILED_PRECONDITION, "needs a GPU"},
      {"compute override of no entry",
       [](auto* r) { (*r->mutable_compute_dtype_overrides())["decoder"] = "float32"; },
       grpc::StatusCode::INVALID_ARGUMENT, "no entry 'decoder'"},
      {"compute override to an integer",
       [](auto* r) { (*r->mutable_compute_dtype_overrides())["forward"] = "int64"; },
       grpc::StatusCode::INVALID_ARGUMENT, "compute_dtype_overrides['forward'] 'int64'"},
      {"dot-dot", [](auto* r) { r->set_path("../outside.safetensors"); },
       grpc::StatusCode::INVALID_ARGUMENT, "path '../outside.safetensors' may not contain '..'"},
      {"absolute outside", [outside](auto* r) { r->set_path(outside); },
       grpc::StatusCode::INVALID_ARGUMENT, "outside the model roots"},
      {"/proc", [](auto* r) { r->set_path("/proc/self/environ"); },
       grpc::StatusCode::INVALID_ARGUMENT, "outside the model roots"},
      {"symlink out", [](auto* r) { r->set_path("escape.safetensors"); },
       grpc::StatusCode::INVALID_ARGUMENT, "symlink"},
      {"NUL byte", [](auto* r) { r->set_path(std::string("a\0b", 3)); },
       grpc::StatusCode::INVALID_ARGUMENT, "NUL"},
      {"64 KiB path", [](auto* r) { r->set_path(std::string(65536, 'a')); },
       grpc::StatusCode::INVALID_ARGUMENT, "path: 65536 bytes; at most 4096"},
      {"missing", [](auto* r) { r->set_path("nope.safetensors"); }, grpc::StatusCode::NOT_FOUND,
       "nope.safetensors"},
      {"corrupt", [](auto* r) { r->set_path("corrupt.safetensors"); }, grpc::StatusCode::DATA_LOSS,
       "corrupt.safetensors"},
      {"unknown architecture", [](auto* r) { r->set_architecture("resnet"); },
       grpc::StatusCode::FAILED_PRECONDITION, "resnet"},
      {"shape mismatch",
       [](auto* r) {
         r->set_path("mlp_small");
         r->set_architecture("gpt2");
         r->set_model_id("x");
       },
       grpc::StatusCode::FAILED_PRECONDITION, "gpt2"},
      {"cuda", [](auto* r) { r->set_device("cuda:0"); }, grpc::StatusCode::FAILED_PRECONDITION,
       "CUDA"},
  };
  for (const Case& c : cases) {
    metaload::v1::LoadModelResponse response;
    grpc::Status s = Load("mlp_tiny", &response, c.edit);
    EXPECT_EQ(s.error_code(), c.code) << c.what << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(c.message), std::string::npos)
        << c.what << ": " << s.error_message();
    // Echoing the caller's own path is fine; revealing where a symlink points is not.
    if (std::string(c.what) == "symlink out") {
      EXPECT_EQ(s.error_message().find("outside.safetensors"), std::string::npos)
          << "leaks a path: " << s.error_message();
    }
  }

  // ALREADY_EXISTS: the same id for another checkpoint without replace; with replace it swaps.
  metaload::v1::LoadModelResponse first;
  ASSERT_TRUE(Load("mlp_tiny", &first, [](auto* r) { r->set_model_id("slot"); }).ok());
  metaload::v1::LoadModelResponse second;
  grpc::Status exists = Load("mlp_small", &second, [](auto* r) { r->set_model_id("slot"); });
  EXPECT_EQ(exists.error_code(), grpc::StatusCode::ALREADY_EXISTS) << exists.error_message();
  grpc::Status replaced = Load("mlp_small", &second, [](auto* r) {
    r->set_model_id("slot");
    r->set_replace(true);
  });
  ASSERT_TRUE(replaced.ok()) << replaced.error_message();
  EXPECT_EQ(second.model().path(), "mlp_small");

  // Infer errors.
  metaload::v1::InferRequest bad;
  bad.set_model_id("slot");
  *bad.add_inputs() =
      Fp32Tensor("input", {2, 256}, std::vector<float>(10), true);  // 40 bytes, needs 2048
  metaload::v1::InferResponse out;
  grpc::Status wrong_bytes = Infer(bad, &out);
  EXPECT_EQ(wrong_bytes.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(wrong_bytes.error_message().find("raw_data has 40 bytes"), std::string::npos)
      << wrong_bytes.error_message();
  bad.mutable_inputs(0)->set_datatype("FP8");
  EXPECT_EQ(Infer(bad, &out).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad.mutable_inputs(0)->set_datatype("FP32");
  bad.mutable_inputs(0)->clear_shape();
  bad.mutable_inputs(0)->add_shape(int64_t{1} << 40);
  bad.mutable_inputs(0)->add_shape(int64_t{1} << 40);
  grpc::Status overflow = Infer(bad, &out);
  EXPECT_EQ(overflow.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << overflow.error_message();
  bad.set_model_id("nobody");
  EXPECT_EQ(Infer(bad, &out).error_code(), grpc::StatusCode::NOT_FOUND);
  ASSERT_TRUE(Unload("slot").ok());
}

// The daemon keeps an unloaded model's memory in its host arena (by default as large as the cpu
// budget): the next load fills it, says so in its stats and the CLI's line, and the arena's
// gauges show it.
TEST_F(ServiceTest, ALoadAfterAnUnloadFillsTheArenasMemory) {
  metaload::v1::LoadModelResponse first, second;
  ASSERT_TRUE(Load("mlp_small", &first, [](auto* q) { q->set_model_id("arena"); }).ok());
  EXPECT_EQ(first.stats().arena_reused_bytes(), 0);
  ASSERT_TRUE(Unload("arena").ok());
  std::optional<double> kept;
  for (int i = 0; i < 250; ++i) {  // the model is freed on the release thread
    std::optional<std::string> m = testing::HttpGet(daemon_->metrics_port(), "/metrics");
    kept = m ? testing::PromValue(*m, "metaload_arena_bytes") : std::nullopt;
    if (kept.value_or(0) >= first.model().resident_bytes()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_GE(kept.value_or(0), first.model().resident_bytes());
  ASSERT_TRUE(Load("mlp_small", &second, [](auto* q) { q->set_model_id("arena"); }).ok());
  EXPECT_GE(second.stats().arena_reused_bytes(), second.model().resident_bytes());
  std::optional<std::string> metrics = testing::HttpGet(daemon_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_GE(testing::PromValue(*metrics, "metaload_arena_reused_bytes_total").value_or(0),
            second.model().resident_bytes());
  EXPECT_LT(testing::PromValue(*metrics, "metaload_arena_bytes").value_or(-1),
            second.model().resident_bytes());
  ASSERT_TRUE(Unload("arena").ok());
}

TEST_F(ServiceTest, MetricsReportLoadsAndForgetUnloadedModels) {
  metaload::v1::LoadModelResponse r;
  ASSERT_TRUE(Load("mlp_tiny", &r, [](auto* q) { q->set_model_id("m1"); }).ok());
  ASSERT_TRUE(Load("mlp_small", &r, [](auto* q) { q->set_model_id("m2"); }).ok());
  const int64_t m2_bytes = r.model().resident_bytes();
  ASSERT_TRUE(Unload("m1").ok());
  std::optional<std::string> metrics = testing::HttpGet(daemon_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_FALSE(testing::PromValue(*metrics, "metaload_load_peak_host_bytes", "{model_id=\"m1\"}")
                   .has_value());
  std::optional<double> peak =
      testing::PromValue(*metrics, "metaload_load_peak_host_bytes", "{model_id=\"m2\"}");
  ASSERT_TRUE(peak) << *metrics;
  EXPECT_GE(*peak, 0.9 * m2_bytes);
  EXPECT_TRUE(testing::PromValue(*metrics, "metaload_models", "{device=\"cpu\",state=\"READY\"}")
                  .has_value());
  EXPECT_GT(
      testing::PromValue(*metrics, "metaload_memory_budget_bytes", "{device=\"cpu\"}").value_or(0),
      0);
  EXPECT_GE(testing::PromValue(*metrics, "metaload_rpc_duration_seconds_count",
                               "{code=\"OK\",method=\"LoadModel\"}")
                .value_or(0),
            2);
  ASSERT_TRUE(Unload("m2").ok());
}

TEST(ServiceBudgetTest, EvictsLeastRecentlyUsedThenRefuses) {
  testing::TempDir dir;
  std::filesystem::create_directories(dir / "m");
  for (const char* name : {"a", "b", "c"}) {
    testing::CommandResult r =
        testing::RunCommand({METALOAD_CLI_PATH, "synth", "--arch=mlp", "--preset=small",
                             "--seed=" + std::to_string(name[0]), dir / ("m/" + std::string(name))},
                            dir / "synth");
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  // A small mlp is 6.3 MB: the budget fits two.
  DaemonProcess daemon(dir, {"--model_root=" + (dir / "m"), "--memory_budget=cpu=14MiB"});
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  auto stub = ModelLoader::NewStub(daemon.Channel());
  auto load = [&](const std::string& path, bool pin = false) {
    metaload::v1::LoadModelRequest request;
    request.set_path(path);
    request.set_pin(pin);
    metaload::v1::LoadModelResponse response;
    grpc::ClientContext context;
    return stub->LoadModel(&context, request, &response);
  };
  auto ids = [&] {
    metaload::v1::ListModelsResponse list;
    grpc::ClientContext context;
    stub->ListModels(&context, metaload::v1::ListModelsRequest(), &list);
    std::set<std::string> out;
    for (const auto& m : list.models()) out.insert(m.model_id());
    return out;
  };
  ASSERT_TRUE(load("a").ok());
  ASSERT_TRUE(load("b").ok());
  ASSERT_TRUE(load("a").ok());  // a is now more recently used than b
  ASSERT_TRUE(load("c").ok());
  EXPECT_EQ(ids(), (std::set<std::string>{"a", "c"}));
  std::optional<std::string> metrics = testing::HttpGet(daemon.metrics_port(), "/metrics");
  EXPECT_EQ(testing::PromValue(*metrics, "metaload_cache_evictions_total", "{device=\"cpu\"}"),
            1.0);

  // Pinned models are never evicted; when nothing can go, the answer comes before any allocation.
  testing::TempDir big;
  std::filesystem::create_directories(dir / "m/big");
  ASSERT_EQ(
      testing::RunCommand(
          {METALOAD_CLI_PATH, "synth", "--arch=mlp", "--preset=medium", dir / "m/big"}, dir / "s")
          .exit_code,
      0);
  grpc::Status too_big = load("big");
  EXPECT_EQ(too_big.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << too_big.error_message();
  EXPECT_NE(too_big.error_message().find("budget"), std::string::npos);
  daemon.process().Signal(SIGTERM);
  EXPECT_TRUE(daemon.process().Wait(10s).has_value());
}

TEST(ServiceAuthTest, TokenRequiredExceptForHealth) {
  testing::TempDir dir;
  std::ofstream(dir / "token") << "s3cret\n";
  DaemonProcess daemon(dir, {"--auth_token_file=" + (dir / "token")});
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  auto stub = ModelLoader::NewStub(daemon.Channel());
  for (const char* token : {"", "Bearer wrong", "Bearer s3cret"}) {
    grpc::ClientContext context;
    if (*token) context.AddMetadata("authorization", token);
    metaload::v1::ListModelsResponse list;
    grpc::Status s = stub->ListModels(&context, metaload::v1::ListModelsRequest(), &list);
    if (std::string(token) == "Bearer s3cret") {
      EXPECT_TRUE(s.ok()) << s.error_message();
    } else {
      EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << token;
    }
  }
  testing::CommandResult health = testing::RunCommand(
      {METALOAD_CLI_PATH, "health", "--address=127.0.0.1:" + std::to_string(daemon.grpc_port())},
      dir / "health");
  EXPECT_EQ(health.exit_code, 0) << health.err;
}

// How many services a reflection service lists to a caller without a token, and how the call
// ended (v1 and v1alpha have the same messages under two packages).
template <typename Service, typename Request, typename Response>
std::pair<int, grpc::Status> ListServices(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = Service::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 5s);
  auto stream = stub->ServerReflectionInfo(&context);
  Request list;
  list.set_list_services("");
  stream->Write(list);
  stream->WritesDone();
  Response listed;
  int services = 0;
  while (stream->Read(&listed)) services += listed.list_services_response().service_size();
  return {services, stream->Finish()};
}

// Hostile: with a token, server reflection must not describe the service to a caller without
// it (before the fix it listed every service). Health stays open.
TEST(ServiceAuthTest, ReflectionDoesNotAnswerWithoutTheToken) {
  testing::TempDir dir;
  std::ofstream(dir / "token") << "s3cret\n";
  DaemonProcess daemon(dir, {"--auth_token_file=" + (dir / "token")});
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  namespace v1 = grpc::reflection::v1;
  namespace v1alpha = grpc::reflection::v1alpha;
  auto [services, status] =
      ListServices<v1alpha::ServerReflection, v1alpha::ServerReflectionRequest,
                   v1alpha::ServerReflectionResponse>(daemon.Channel());
  EXPECT_EQ(services, 0);
  EXPECT_FALSE(status.ok());
  // Nor v1 (metaloadd's own).
  auto [v1_services, v1_status] =
      ListServices<v1::ServerReflection, v1::ServerReflectionRequest, v1::ServerReflectionResponse>(
          daemon.Channel());
  EXPECT_EQ(v1_services, 0);
  EXPECT_EQ(v1_status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  testing::CommandResult health = testing::RunCommand(
      {METALOAD_CLI_PATH, "health", "--address=127.0.0.1:" + std::to_string(daemon.grpc_port())},
      dir / "health");
  EXPECT_EQ(health.exit_code, 0) << health.err;
}

// Flags that cannot work stop the start with a message naming them. Before the fix the first
// four started a daemon anyway (this test then timed out), and a bad certificate said only
// "cannot listen".
TEST(DaemonFlagsTest, BadValuesStopTheStartWithAMessage) {
  testing::TempDir dir;
  std::ofstream(dir / "bad.pem") << "not a certificate\n";
  struct Case {
    std::vector<std::string> flags;
    const char* message;
  };
  const std::vector<Case> cases = {
      {{"--max_message_bytes=1"}, "--max_message_bytes"},
      {{"--shutdown_grace=-1s"}, "--shutdown_grace"},
      {{"--memory_budget=cpu=1GiB,cpu=2GiB"}, "twice"},
      {{"--memory_budget=cpu=0"}, "budget of 0"},
      {{"--tls_cert=" + (dir / "bad.pem"), "--tls_key=" + (dir / "bad.pem")}, "--tls_cert"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> argv = {METALOADD_PATH, "--listen=127.0.0.1:0",
                                     "--metrics_listen=127.0.0.1:0", "--model_root=" + dir.path()};
    argv.insert(argv.end(), c.flags.begin(), c.flags.end());
    testing::CommandResult r = testing::RunCommand(argv, dir / "d", 5s);
    EXPECT_EQ(r.exit_code, 1) << c.flags[0] << ": " << r.err;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << c.flags[0] << ": " << r.err;
  }
}

// SIGHUP is logged and ignored; before the fix it ended the daemon at once, without a word.
TEST(DaemonSignalsTest, SighupIsLoggedAndIgnored) {
  testing::TempDir dir;
  DaemonProcess daemon(dir);
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  daemon.process().Signal(SIGHUP);
  EXPECT_FALSE(daemon.process().Wait(1s).has_value()) << "SIGHUP stopped the daemon";
  EXPECT_NE(daemon.process().Stderr().find("sighup_ignored"), std::string::npos);
  daemon.process().Signal(SIGTERM);
  std::optional<int> exit = daemon.process().Wait(10s);
  ASSERT_TRUE(exit.has_value());
  EXPECT_TRUE(WIFEXITED(*exit) && WEXITSTATUS(*exit) == 0) << *exit;
}

// Hostile: LoadModel and LoadModelStream without (or with a wrong) token. Before the fix the
// refusal built absl::StatusOr(OkStatus()), which Debian's Abseil aborts on (exit 134).
TEST(ServiceAuthTest, LoadsWithoutTheTokenAreRefusedAndTheDaemonLives) {
  testing::TempDir dir;
  std::ofstream(dir / "token") << "s3cret\n";
  DaemonProcess daemon(dir, {"--auth_token_file=" + (dir / "token")});
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  auto stub = ModelLoader::NewStub(daemon.Channel());
  metaload::v1::LoadModelRequest request;
  request.set_path("nothing.safetensors");
  for (const char* token : {"", "Bearer wrong"}) {
    {
      grpc::ClientContext context;
      if (*token) context.AddMetadata("authorization", token);
      metaload::v1::LoadModelResponse response;
      grpc::Status s = stub->LoadModel(&context, request, &response);
      EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << token << s.error_message();
    }
    {
      grpc::ClientContext context;
      if (*token) context.AddMetadata("authorization", token);
      auto reader = stub->LoadModelStream(&context, request);
      metaload::v1::LoadEvent event;
      while (reader->Read(&event)) {
      }
      grpc::Status s = reader->Finish();
      EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << token << s.error_message();
    }
  }
  EXPECT_FALSE(daemon.process().Wait(0ms).has_value()) << "the daemon died";
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Bearer s3cret");
  metaload::v1::ListModelsResponse list;
  EXPECT_TRUE(stub->ListModels(&context, metaload::v1::ListModelsRequest(), &list).ok());
  daemon.process().Signal(SIGTERM);
  std::optional<int> exit = daemon.process().Wait(10s);
  ASSERT_TRUE(exit.has_value());
  EXPECT_TRUE(WIFEXITED(*exit) && WEXITSTATUS(*exit) == 0) << *exit;
}

}  // namespace
}  // namespace metaload

namespace metaload {
namespace {

// A fresh daemon, so every counter is exact: two loads, one Infer, one unload.
TEST(ServiceMetricsTest, ExactCountsAndPeakBytes) {
  testing::TempDir dir;
  for (const char* name : {"big", "small"}) {
    testing::CommandResult r = testing::RunCommand(
        {METALOAD_CLI_PATH, "synth", "--arch=mlp",
         std::string("--preset=") + (std::string(name) == "big" ? "medium" : "tiny"), dir / name},
        dir / "synth");
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  DaemonProcess daemon(dir);
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  auto stub = ModelLoader::NewStub(daemon.Channel());
  int64_t big_bytes = 0;
  for (const char* name : {"big", "small"}) {
    metaload::v1::LoadModelRequest request;
    request.set_path(name);
    metaload::v1::LoadModelResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(stub->LoadModel(&context, request, &response).ok());
    if (std::string(name) == "big") big_bytes = response.model().resident_bytes();
  }
  metaload::v1::InferRequest infer;
  infer.set_model_id("small");
  *infer.add_inputs() = Fp32Tensor("input", {1, 16}, std::vector<float>(16, 0.5f), false);
  metaload::v1::InferResponse out;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub->Infer(&context, infer, &out).ok());
  }
  {
    metaload::v1::UnloadModelRequest unload;
    unload.set_model_id("small");
    metaload::v1::UnloadModelResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(stub->UnloadModel(&context, unload, &response).ok());
  }
  // The unloaded model's memory is freed on the cache's release thread, after Unload returns;
  // until then it still counts as resident.
  std::optional<std::string> m;
  for (int i = 0; i < 500; ++i) {
    m = testing::HttpGet(daemon.metrics_port(), "/metrics");
    ASSERT_TRUE(m);
    if (testing::PromValue(*m, "metaload_resident_bytes", "{device=\"cpu\"}") ==
        static_cast<double>(big_bytes)) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(testing::PromValue(*m, "metaload_cache_requests_total", "{result=\"miss\"}"), 2.0);
  EXPECT_EQ(testing::PromValue(*m, "metaload_cache_requests_total", "{result=\"hit\"}"), 0.0);
  EXPECT_EQ(testing::PromValue(*m, "metaload_load_duration_seconds_count",
                               "{architecture=\"mlp\",device=\"cpu\",outcome=\"ok\"}"),
            2.0);
  EXPECT_EQ(testing::PromValue(*m, "metaload_rpc_duration_seconds_count",
                               "{code=\"OK\",method=\"Infer\"}"),
            1.0);
  EXPECT_EQ(testing::PromValue(*m, "metaload_models", "{device=\"cpu\",state=\"READY\"}"), 1.0);
  EXPECT_EQ(testing::PromValue(*m, "metaload_resident_bytes", "{device=\"cpu\"}"),
            static_cast<double>(big_bytes));
  std::optional<double> peak =
      testing::PromValue(*m, "metaload_load_peak_host_bytes", "{model_id=\"big\"}");
  ASSERT_TRUE(peak);
  EXPECT_GE(*peak, static_cast<double>(big_bytes));
  EXPECT_LE(*peak, static_cast<double>(big_bytes) + (96 << 20));
  EXPECT_FALSE(
      testing::PromValue(*m, "metaload_load_peak_host_bytes", "{model_id=\"small\"}").has_value());
  EXPECT_FALSE(
      testing::PromValue(*m, "metaload_infer_duration_seconds_count", "{model_id=\"small\"}")
          .has_value());
  EXPECT_EQ(testing::PromValue(*m, "metaload_loaded_bytes_total", "{device=\"cpu\"}"),
            static_cast<double>(big_bytes + 1864 * 4));
  daemon.process().Signal(SIGTERM);
  EXPECT_TRUE(daemon.process().Wait(10s).has_value());
}

}  // namespace
}  // namespace metaload

namespace metaload {
namespace {

// Hostile model roots: what someone who can write a model directory (a downloaded checkpoint)
// can plant there. One daemon, one directory per attack.
class HostileRootTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    const std::string root = *dir_ / "models";
    const std::string outside = *dir_ / "outside";
    std::filesystem::create_directories(root);
    auto synth = [](const std::string& out, const std::vector<std::string>& extra = {}) {
      std::vector<std::string> argv = {METALOAD_CLI_PATH, "synth", "--arch=mlp"};
      argv.insert(argv.end(), extra.begin(), extra.end());
      argv.push_back(out);
      return testing::RunCommand(argv, out + ".synth").exit_code;
    };
    ASSERT_EQ(synth(outside), 0);
    ASSERT_EQ(synth(*dir_ / "outside_sharded", {"--shards=2"}), 0);
    // model.safetensors, config.json, a shard, pytorch_model.bin: each a symlink out.
    ASSERT_EQ(synth(root + "/link_weights"), 0);
    std::filesystem::remove(root + "/link_weights/model.safetensors");
    std::filesystem::create_symlink(outside + "/model.safetensors",
                                    root + "/link_weights/model.safetensors");
    ASSERT_EQ(synth(root + "/link_config"), 0);
    std::filesystem::remove(root + "/link_config/config.json");
    std::filesystem::create_symlink(outside + "/config.json", root + "/link_config/config.json");
    ASSERT_EQ(synth(root + "/link_shard", {"--shards=2"}), 0);
    for (const auto& e : std::filesystem::directory_iterator(root + "/link_shard")) {
      const std::string name = e.path().filename().string();
      if (name.rfind("model-00002", 0) == 0) {
        std::filesystem::remove(e.path());
        std::filesystem::create_symlink(*dir_ / ("outside_sharded/" + name), e.path());
      }
    }
    std::filesystem::create_directories(root + "/link_bin");
    std::filesystem::copy_file(outside + "/config.json", root + "/link_bin/config.json");
    std::filesystem::create_symlink(outside + "/model.safetensors",
                                    root + "/link_bin/pytorch_model.bin");
    // A FIFO where a shard should be: opening it for reading blocks until a writer comes.
    ASSERT_EQ(synth(root + "/fifo_shard", {"--shards=2"}), 0);
    for (const auto& e : std::filesystem::directory_iterator(root + "/fifo_shard")) {
      const std::string name = e.path().filename().string();
      if (name.rfind("model-00002", 0) == 0) {
        std::filesystem::remove(e.path());
        ASSERT_EQ(::mkfifo(e.path().c_str(), 0644), 0);
      }
    }
    ASSERT_EQ(synth(root + "/fifo_weights"), 0);
    std::filesystem::remove(root + "/fifo_weights/model.safetensors");
    ASSERT_EQ(::mkfifo((root + "/fifo_weights/model.safetensors").c_str(), 0644), 0);
    // A text file named like a checkpoint: its first 8 bytes must not come back in the error.
    std::ofstream(root + "/notes.safetensors") << "secret-token-1234567890 and more text\n";
    daemon_ = new DaemonProcess(*dir_, {"--model_root=" + root});
  }
  static void TearDownTestSuite() {
    delete daemon_;
    delete dir_;
  }
  void SetUp() override {
    ASSERT_GT(daemon_->grpc_port(), 0) << daemon_->process().Stderr();
    stub_ = v1::ModelLoader::NewStub(daemon_->Channel());
  }
  grpc::Status Load(const std::string& path) {
    v1::LoadModelRequest request;
    request.set_path(path);
    v1::LoadModelResponse response;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 10s);
    return stub_->LoadModel(&context, request, &response);
  }

  static testing::TempDir* dir_;
  static DaemonProcess* daemon_;
  std::unique_ptr<v1::ModelLoader::Stub> stub_;
};

testing::TempDir* HostileRootTest::dir_ = nullptr;
DaemonProcess* HostileRootTest::daemon_ = nullptr;

// Before the fix each of these loaded the outside file (OK), and Infer returned its bytes.
TEST_F(HostileRootTest, FilesInsideAModelDirectoryMayNotLinkOutOfTheRoots) {
  struct Case {
    const char* path;
    const char* names;  // the file the message must name
  };
  for (const Case& c : {Case{"link_weights", "link_weights/model.safetensors"},
                        Case{"link_config", "link_config/config.json"},
                        Case{"link_shard", "link_shard/model-00002-of-00002.safetensors"},
                        Case{"link_bin", "link_bin/pytorch_model.bin"}}) {
    grpc::Status s = Load(c.path);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << c.path << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(c.names), std::string::npos) << s.error_message();
    EXPECT_NE(s.error_message().find("outside the model roots"), std::string::npos)
        << s.error_message();
    // Neither where the link points nor the daemon's own roots.
    EXPECT_EQ(s.error_message().find(dir_->path()), std::string::npos) << s.error_message();
    EXPECT_EQ(s.error_message().find("outside/"), std::string::npos) << s.error_message();
  }
}

// Before the fix a FIFO shard blocked the load (and a load thread) forever.
TEST_F(HostileRootTest, AFifoIsRefusedAtOnce) {
  for (const char* path : {"fifo_shard", "fifo_weights"}) {
    const auto start = std::chrono::steady_clock::now();
    grpc::Status s = Load(path);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION)
        << path << ": " << s.error_message();
    EXPECT_NE(s.error_message().find("not a regular file"), std::string::npos) << s.error_message();
    EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  }
}

// Before the fix: "header length 8389754676633367923" (the file's first 8 bytes) and the
// daemon's absolute path.
TEST_F(HostileRootTest, ErrorsNeverQuoteFileBytesAndNamePathsAsGiven) {
  grpc::Status s = Load("notes.safetensors");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DATA_LOSS) << s.error_message();
  uint64_t first8 = 0;
  std::memcpy(&first8, "secret-t", 8);
  EXPECT_EQ(s.error_message().find(std::to_string(first8)), std::string::npos) << s.error_message();
  EXPECT_EQ(s.error_message().find("secret"), std::string::npos) << s.error_message();
  EXPECT_NE(s.error_message().find("notes.safetensors"), std::string::npos) << s.error_message();
  EXPECT_EQ(s.error_message().find(dir_->path()), std::string::npos) << s.error_message();
  EXPECT_FALSE(daemon_->process().Wait(0ms).has_value());
}

// TorchScript archives are programs: refused unless the daemon runs with --allow_torchscript,
// whatever the file is called. Before the fix each loaded (and would have run its code).
TEST(TorchScriptPolicyTest, RefusedByDefaultAndLoadedWithTheOptIn) {
  testing::TempDir dir;
  std::filesystem::create_directories(dir / "models/hf");
  const std::string script =
      "import sys, torch\n"
      "m = torch.jit.script(torch.nn.Linear(3, 2))\n"
      "m.save(sys.argv[1] + '/scripted.pt')\n"
      "m.save(sys.argv[1] + '/innocent.ckpt')\n"
      "m.save(sys.argv[1] + '/hf/pytorch_model.bin')\n"
      "class Sparse(torch.nn.Module):\n"
      "    def forward(self, x):\n"
      "        return x.to_sparse()\n"
      "torch.jit.script(Sparse()).save(sys.argv[1] + '/sparse.pt')\n"
      "open(sys.argv[1] + '/hf/config.json', 'w').write('{\"model_type\": \"mlp\"}')\n";
  std::ofstream(dir / "make.py") << script;
  testing::CommandResult made =
      testing::RunCommand({METALOAD_PYTHON, dir / "make.py", dir / "models"}, dir / "py");
  ASSERT_EQ(made.exit_code, 0) << made.err;
  auto load = [](DaemonProcess& daemon, const std::string& path) {
    auto stub = v1::ModelLoader::NewStub(daemon.Channel());
    v1::LoadModelRequest request;
    request.set_path(path);
    v1::LoadModelResponse response;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 30s);
    return stub->LoadModel(&context, request, &response);
  };
  {
    DaemonProcess daemon(dir, {"--model_root=" + (dir / "models")});
    ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
    for (const char* path : {"scripted.pt", "innocent.ckpt", "hf"}) {
      grpc::Status s = load(daemon, path);
      EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION)
          << path << ": " << s.error_message();
      EXPECT_NE(s.error_message().find("TorchScript"), std::string::npos) << s.error_message();
      EXPECT_NE(s.error_message().find("--allow_torchscript"), std::string::npos)
          << s.error_message();
      EXPECT_NE(s.error_message().find(path), std::string::npos) << s.error_message();
    }
    // Asking for the architecture by name is no way around it.
    auto stub = v1::ModelLoader::NewStub(daemon.Channel());
    v1::LoadModelRequest request;
    request.set_path("scripted.pt");
    request.set_architecture("torchscript");
    v1::LoadModelResponse response;
    grpc::ClientContext context;
    EXPECT_EQ(stub->LoadModel(&context, request, &response).error_code(),
              grpc::StatusCode::FAILED_PRECONDITION);
  }
  {
    DaemonProcess daemon(dir, {"--model_root=" + (dir / "models"), "--allow_torchscript"});
    ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
    grpc::Status s = load(daemon, "scripted.pt");
    EXPECT_TRUE(s.ok()) << s.error_message();
    // A forward that returns a sparse tensor: before the fix the encoder threw on the infer
    // pool and the daemon aborted. Now FAILED_PRECONDITION naming the output, daemon alive.
    ASSERT_TRUE(load(daemon, "sparse.pt").ok());
    auto stub = v1::ModelLoader::NewStub(daemon.Channel());
    v1::InferRequest infer;
    infer.set_model_id("sparse");
    v1::Tensor* x = infer.add_inputs();
    x->set_name("x");
    x->set_datatype("FP32");
    x->add_shape(2);
    x->add_shape(2);
    for (float v : {1.f, 0.f, 0.f, 2.f}) x->add_fp32_contents(v);
    v1::InferResponse out;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 30s);
    grpc::Status sparse = stub->Infer(&context, infer, &out);
    EXPECT_EQ(sparse.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << sparse.error_message();
    EXPECT_NE(sparse.error_message().find("Sparse"), std::string::npos) << sparse.error_message();
    EXPECT_FALSE(daemon.process().Wait(0ms).has_value()) << "the daemon died";
    // It can still be unloaded (the failed Infer holds nothing).
    v1::UnloadModelRequest unload;
    unload.set_model_id("sparse");
    v1::UnloadModelResponse unloaded;
    grpc::ClientContext unload_context;
    EXPECT_TRUE(stub->UnloadModel(&unload_context, unload, &unloaded).ok());
  }
}

}  // namespace
}  // namespace metaload
