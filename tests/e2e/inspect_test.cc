// `metaload inspect` end to end: the right verdict on every fixture, machine-readable output
// that matches the files, and one-line errors (never a crash) on broken ones.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace metaload {
namespace {

using namespace std::chrono_literals;

class InspectTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    testing::CommandResult r = testing::RunCommand(
        {METALOAD_PYTHON, METALOAD_SOURCE_DIR "/tests/tools/make_checkpoints.py", dir_->path()},
        *dir_ / "make");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = testing::RunCommand({METALOAD_CLI_PATH, "synth", "--arch=mlp", "--shards=2", *dir_ / "mlp"},
                            *dir_ / "synth");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    for (const char* arch : {"gpt2", "llama"}) {
      r = testing::RunCommand({METALOAD_CLI_PATH, "synth", std::string("--arch=") + arch,
                               "--preset=tiny", "--dtype=bfloat16", *dir_ / arch},
                              *dir_ / "synth");
      ASSERT_EQ(r.exit_code, 0) << r.err;
    }
  }
  static void TearDownTestSuite() { delete dir_; }

  static testing::CommandResult Inspect(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {METALOAD_CLI_PATH, "inspect"};
    argv.insert(argv.end(), args.begin(), args.end());
    return testing::RunCommand(argv, *dir_ / "inspect");
  }

  static testing::TempDir* dir_;
};

testing::TempDir* InspectTest::dir_ = nullptr;

TEST_F(InspectTest, ValidFixturesExitZeroWithTheRightSummary) {
  struct Case {
    const char* path;
    const char* format;
    int tensors;
    const char* architecture;  // "" for unknown
  };
  for (const Case& c :
       {Case{"mixed.safetensors", "safetensors", 10, ""},
        Case{"state_dict.pt", "torch-zip", 10, ""}, Case{"one_entry.pt", "torch-zip", 1, ""},
        Case{"lightning.ckpt", "torch-zip", 2, "sd1"},
        Case{"scripted.pt", "torchscript", 0, "torchscript"},
        Case{"hf_sharded", "safetensors-sharded", 4, ""},
        Case{"mlp", "safetensors-sharded", 6, "mlp"}}) {
    testing::CommandResult r = Inspect({*dir_ / c.path, "--json"});
    ASSERT_EQ(r.exit_code, 0) << c.path << ": " << r.err;
    nlohmann::json j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["valid"], true);
    EXPECT_EQ(j["format"], c.format) << c.path;
    EXPECT_EQ(j["tensors"], c.tensors) << c.path;
    if (*c.architecture) {
      EXPECT_EQ(j["architecture"], c.architecture) << c.path;
    } else {
      EXPECT_TRUE(j["architecture"].is_null()) << c.path;
    }
  }
  nlohmann::json mixed =
      nlohmann::json::parse(Inspect({*dir_ / "mixed.safetensors", "--json"}).out);
  EXPECT_EQ(mixed["bytes_by_dtype"]["float32"], (15 + 1) * 4);
  EXPECT_EQ(mixed["bytes_by_dtype"]["bfloat16"], 7 * 2);
  EXPECT_EQ(mixed["metadata"]["format"], "pt");
  nlohmann::json sd =
      nlohmann::json::parse(Inspect({*dir_ / "state_dict.pt", "--json", "--sha256"}).out);
  testing::CommandResult py = testing::RunCommand(
      {METALOAD_PYTHON, "-c",
       "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())",
       *dir_ / "state_dict.pt"},
      *dir_ / "sha");
  EXPECT_EQ(sd["sha256"], py.out.substr(0, 64));
  EXPECT_EQ(sd["short_hash"], py.out.substr(0, 10));
  EXPECT_EQ(sd["skipped_entries"], nlohmann::json({"version (int)", "note (str)"}));
}

TEST_F(InspectTest, HumanOutputListsTensorsOnRequest) {
  testing::CommandResult r = Inspect({*dir_ / "mlp", "--tensors"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("format:        safetensors-sharded"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("architecture:  mlp (from config.json)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("layers.0.weight"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[32, 16]"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("valid:         yes"), std::string::npos);
}

TEST_F(InspectTest, BrokenFilesExitTwoWithOneLine) {
  const std::string good = testing::ReadFileOrEmpty(*dir_ / "mixed.safetensors");
  std::ofstream(*dir_ / "truncated.safetensors", std::ios::binary)
      << good.substr(0, good.size() - 5);
  std::ofstream(*dir_ / "garbage.bin", std::ios::binary) << std::string(100, '\xff');
  std::ofstream(*dir_ / "empty.safetensors", std::ios::binary) << "";
  struct Case {
    const char* path;
    const char* code;
  };
  for (const Case& c :
       {Case{"truncated.safetensors", "DATA_LOSS"}, Case{"garbage.bin", "DATA_LOSS"},
        Case{"empty.safetensors", "DATA_LOSS"}, Case{"legacy.pt", "FAILED_PRECONDITION"},
        Case{"module.pt", "FAILED_PRECONDITION"}, Case{"transposed.pt", "FAILED_PRECONDITION"},
        Case{"plain.zip", "DATA_LOSS"}, Case{"does-not-exist", "NOT_FOUND"},
        Case{"expected", "FAILED_PRECONDITION"}}) {
    testing::CommandResult r = Inspect({*dir_ / c.path});
    EXPECT_EQ(r.exit_code, 2) << c.path << ": " << r.out << r.err;
    EXPECT_TRUE(r.out.empty()) << c.path << ": " << r.out;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.path << ": " << r.err;
    EXPECT_NE(r.err.find(std::string("invalid: ") + c.code), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(*dir_ / c.path), std::string::npos) << r.err;

    testing::CommandResult j = Inspect({*dir_ / c.path, "--json"});
    EXPECT_EQ(j.exit_code, 2);
    nlohmann::json parsed = nlohmann::json::parse(j.out);
    EXPECT_EQ(parsed["valid"], false);
    EXPECT_EQ(parsed["error"]["code"], c.code) << c.path;
  }
  EXPECT_EQ(Inspect({}).exit_code, 2);
}

// Hostile files: never "internal error", never a hang. Before the fix a non-string model_type
// threw out of the detector ("metaload: internal error", exit 1) and a FIFO shard blocked
// inspect for ever.
TEST_F(InspectTest, HostileFilesGetAVerdictNotACrashOrAHang) {
  const std::string odd = *dir_ / "odd_config";
  ASSERT_EQ(
      testing::RunCommand({METALOAD_CLI_PATH, "synth", "--arch=mlp", odd}, *dir_ / "s").exit_code,
      0);
  std::ofstream(odd + "/config.json", std::ios::trunc)
      << R"({"model_type": 1, "architectures": [5, "GPT2LMHeadModel"]})";
  testing::CommandResult r = Inspect({odd, "--json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err.find("internal error"), std::string::npos) << r.err;

  const std::string fifo = *dir_ / "fifo_shard";
  ASSERT_EQ(testing::RunCommand({METALOAD_CLI_PATH, "synth", "--arch=mlp", "--shards=2", fifo},
                                *dir_ / "s")
                .exit_code,
            0);
  const std::string shard = fifo + "/model-00002-of-00002.safetensors";
  std::filesystem::remove(shard);
  ASSERT_EQ(::mkfifo(shard.c_str(), 0644), 0);
  testing::CommandResult f =
      testing::RunCommand({METALOAD_CLI_PATH, "inspect", fifo}, *dir_ / "inspect", 10s);
  EXPECT_EQ(f.exit_code, 2) << f.err;
  EXPECT_NE(f.err.find("not a regular file"), std::string::npos) << f.err;
}

// Inspect says what TorchScript is: a program that runs when loaded.
TEST_F(InspectTest, TorchScriptIsNamedAsCodeThatRunsWhenLoaded) {
  testing::CommandResult r = Inspect({*dir_ / "scripted.pt"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("TorchScript"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("runs the file's code"), std::string::npos) << r.out;
  nlohmann::json j = nlohmann::json::parse(Inspect({*dir_ / "scripted.pt", "--json"}).out);
  EXPECT_EQ(j["runs_code"], true);
  nlohmann::json st = nlohmann::json::parse(Inspect({*dir_ / "mixed.safetensors", "--json"}).out);
  EXPECT_EQ(st["runs_code"], false);
}

}  // namespace
}  // namespace metaload
