// The `metaload` RPC subcommands against the real daemon: output, --json and exit codes.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "tests/e2e/daemon_process.h"
#include "tests/test_util.h"

namespace metaload {
namespace {

// Runs `metaload ARGS --address=<daemon>`, logging under `dir`.
auto CliFor(DaemonProcess& daemon, const testing::TempDir& dir) {
  const std::string address = "--address=127.0.0.1:" + std::to_string(daemon.grpc_port());
  const std::string log = dir / "cli";
  return [address, log](std::vector<std::string> args) {
    args.insert(args.begin(), METALOAD_CLI_PATH);
    args.push_back(address);
    return testing::RunCommand(args, log);
  };
}

TEST(CliTest, LoadListGetInferUnloadAndErrors) {
  testing::TempDir dir;
  ASSERT_EQ(testing::RunCommand({METALOAD_CLI_PATH, "synth", "--arch=gpt2", dir / "g"}, dir / "s")
                .exit_code,
            0);
  DaemonProcess daemon(dir);
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  auto cli = CliFor(daemon, dir);
  const std::string address = "--address=127.0.0.1:" + std::to_string(daemon.grpc_port());

  testing::CommandResult load = cli({"load", "g", "--id=tiny", "--dtype=bfloat16"});
  ASSERT_EQ(load.exit_code, 0) << load.err;
  EXPECT_NE(load.out.find("loaded tiny: gpt2 on cpu (bfloat16)"), std::string::npos) << load.out;
  EXPECT_EQ(load.err.find('\r'), std::string::npos) << "progress bar on a non-TTY";

  // On a terminal (util-linux `script` provides one) the same command draws a progress bar.
  testing::CommandResult tty = testing::RunCommand(
      {"/usr/bin/script", "-qec", std::string(METALOAD_CLI_PATH) + " load g --id=tty " + address,
       "/dev/null"},
      dir / "tty");
  ASSERT_EQ(tty.exit_code, 0) << tty.out << tty.err;
  EXPECT_NE(tty.out.find('\r'), std::string::npos) << tty.out;
  EXPECT_NE(tty.out.find("] "), std::string::npos) << tty.out;
  EXPECT_NE(tty.out.find("loaded tty: gpt2"), std::string::npos) << tty.out;

  testing::CommandResult again = cli({"load", "g", "--id=tiny", "--dtype=bfloat16", "--json"});
  ASSERT_EQ(again.exit_code, 0);
  nlohmann::json j = nlohmann::json::parse(again.out);
  EXPECT_EQ(j["cache_hit"], true);
  EXPECT_EQ(j["model"]["architecture"], "gpt2");

  testing::CommandResult list = cli({"list"});
  ASSERT_EQ(list.exit_code, 0);
  EXPECT_NE(list.out.find("ID    ARCH  DEVICE  DTYPE     STATE"), std::string::npos) << list.out;
  EXPECT_NE(list.out.find("tiny  gpt2  cpu     bfloat16  READY"), std::string::npos) << list.out;

  testing::CommandResult get = cli({"get", "tiny", "--json"});
  ASSERT_EQ(get.exit_code, 0);
  EXPECT_EQ(nlohmann::json::parse(get.out)["state"], "READY");

  testing::CommandResult infer =
      cli({"infer", "tiny", "--input=input_ids=INT64:1x3:1,2,3", "--json"});
  ASSERT_EQ(infer.exit_code, 0) << infer.err;
  nlohmann::json out = nlohmann::json::parse(infer.out);
  EXPECT_EQ(out["outputs"][0]["name"], "logits");
  EXPECT_EQ(out["outputs"][0]["shape"], nlohmann::json({"1", "3", "128"}));
  EXPECT_EQ(out["outputs"][0]["fp32_contents"].size(), 3u * 128u);

  testing::CommandResult bench =
      cli({"bench", "infer", "--model=tiny", "--input=input_ids=INT64:1x3:1,2,3", "--concurrency=2",
           "--duration=2", "--json"});
  ASSERT_EQ(bench.exit_code, 0) << bench.err;
  nlohmann::json b = nlohmann::json::parse(bench.out);
  EXPECT_GT(b["requests"].get<int>(), 10);
  EXPECT_EQ(b["ok"], b["requests"]);
  EXPECT_GE(b["seconds"].get<double>(), 2.0);
  EXPECT_LT(b["seconds"].get<double>(), 10.0);
  EXPECT_GT(b["latency_ms"]["p50"].get<double>(), 0.0);
  EXPECT_LE(b["latency_ms"]["p50"].get<double>(), b["latency_ms"]["p99"].get<double>());
  EXPECT_LE(b["latency_ms"]["p99"].get<double>(), b["latency_ms"]["max"].get<double>());
  EXPECT_TRUE(b["errors"].empty());
  testing::CommandResult bench_hits =
      cli({"bench", "load-hit", "--path=g", "--model=tiny", "--requests=50", "--json"});
  EXPECT_EQ(bench_hits.exit_code, 1);  // different dtype policy: ALREADY_EXISTS, counted by code
  EXPECT_EQ(nlohmann::json::parse(bench_hits.out)["errors"]["ALREADY_EXISTS"], 50);
  // Open loop: 60 cache hits due at 100/s take their 0.6 s whatever the daemon's speed.
  testing::CommandResult paced = cli({"bench", "load-hit", "--path=g", "--model=tiny", "--rate=100",
                                      "--requests=60", "--concurrency=64", "--json"});
  nlohmann::json p = nlohmann::json::parse(paced.out);
  EXPECT_EQ(p["rate"], 100);
  EXPECT_EQ(p["requests"], 60);
  EXPECT_EQ(p["errors"]["ALREADY_EXISTS"], 60);
  EXPECT_GE(p["seconds"].get<double>(), 0.59);
  EXPECT_LT(p["seconds"].get<double>(), 5.0);
  EXPECT_EQ(cli({"bench", "load-hit", "--path=g", "--rate=-1"}).exit_code, 2);

  testing::CommandResult missing = cli({"get", "nobody"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_NE(missing.err.find("NOT_FOUND"), std::string::npos) << missing.err;
  testing::CommandResult bad_input = cli({"infer", "tiny", "--input=input_ids=INT64:1x3:1,2"});
  EXPECT_EQ(bad_input.exit_code, 2);
  EXPECT_EQ(cli({"load"}).exit_code, 2);
  EXPECT_EQ(cli({"list", "--bogus"}).exit_code, 2);

  testing::CommandResult unload = cli({"unload", "tiny"});
  ASSERT_EQ(unload.exit_code, 0);
  EXPECT_EQ(cli({"get", "tiny"}).exit_code, 1);
  daemon.process().Signal(SIGTERM);
  EXPECT_TRUE(daemon.process().Wait(10s).has_value());
}

// float8 as a user meets it: synth writes an F8_E4M3 checkpoint, inspect names the dtype, the
// daemon loads it as stored (one byte per weight), says so in ModelInfo and runs it; a float32
// file loads with its weights converted by `--dtype=float8_e5m2`.
TEST(CliTest, Float8CheckpointsSynthInspectLoadAndInfer) {
  testing::TempDir dir;
  ASSERT_EQ(testing::RunCommand(
                {METALOAD_CLI_PATH, "synth", "--arch=gpt2", "--dtype=float8_e4m3fn", dir / "f8"},
                dir / "s")
                .exit_code,
            0);
  ASSERT_EQ(testing::RunCommand({METALOAD_CLI_PATH, "synth", "--arch=gpt2", dir / "f32"}, dir / "s")
                .exit_code,
            0);
  testing::CommandResult inspect =
      testing::RunCommand({METALOAD_CLI_PATH, "inspect", dir / "f8", "--json"}, dir / "i");
  ASSERT_EQ(inspect.exit_code, 0) << inspect.err;
  nlohmann::json index = nlohmann::json::parse(inspect.out);
  ASSERT_TRUE(index["bytes_by_dtype"].contains("float8_e4m3fn")) << inspect.out;
  EXPECT_GT(index["bytes_by_dtype"]["float8_e4m3fn"].get<int64_t>(),
            index["bytes_by_dtype"]["float16"].get<int64_t>());

  DaemonProcess daemon(dir);
  ASSERT_GT(daemon.grpc_port(), 0) << daemon.process().Stderr();
  auto cli = CliFor(daemon, dir);
  testing::CommandResult load = cli({"load", "f8", "--id=f8", "--json"});
  ASSERT_EQ(load.exit_code, 0) << load.err;
  nlohmann::json m = nlohmann::json::parse(load.out)["model"];
  EXPECT_EQ(m["entries"][0]["storage_dtype"], "float8_e4m3fn") << load.out;
  EXPECT_EQ(m["entries"][0]["compute_dtype"], "float32") << load.out;
  EXPECT_EQ(std::stoll(m["resident_bytes"].get<std::string>()), index["bytes"].get<int64_t>())
      << load.out;

  testing::CommandResult converted =
      cli({"load", "f32", "--id=e5m2", "--dtype=float8_e5m2", "--json"});
  ASSERT_EQ(converted.exit_code, 0) << converted.err;
  nlohmann::json c = nlohmann::json::parse(converted.out)["model"];
  EXPECT_EQ(c["entries"][0]["storage_dtype"], "float8_e5m2") << converted.out;
  EXPECT_EQ(cli({"load", "f32", "--id=bad", "--compute_dtype=float8_e4m3fn"}).exit_code, 1);

  for (const char* id : {"f8", "e5m2"}) {
    testing::CommandResult infer =
        cli({"infer", id, "--input=input_ids=INT64:1x3:1,2,3", "--json"});
    ASSERT_EQ(infer.exit_code, 0) << infer.err;
    nlohmann::json out = nlohmann::json::parse(infer.out);
    ASSERT_EQ(out["outputs"][0]["fp32_contents"].size(), 3u * 128u) << id;
    for (const auto& v : out["outputs"][0]["fp32_contents"]) {
      ASSERT_TRUE(v.is_number()) << id;  // JSON has no NaN or inf: each logit is finite
    }
  }
  daemon.process().Signal(SIGTERM);
  EXPECT_TRUE(daemon.process().Wait(10s).has_value());
}

}  // namespace
}  // namespace metaload
