// A metaloadd child process on kernel-chosen ports, for end-to-end tests.
#ifndef METALOAD_TESTS_E2E_DAEMON_PROCESS_H_
#define METALOAD_TESTS_E2E_DAEMON_PROCESS_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "tests/test_util.h"

namespace metaload {

using namespace std::chrono_literals;

// A metaloadd on ports chosen by the kernel, found through --port_file.
class DaemonProcess {
 public:
  explicit DaemonProcess(const testing::TempDir& dir, std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {METALOADD_PATH, "--listen=127.0.0.1:0",
                                     "--metrics_listen=127.0.0.1:0",
                                     "--port_file=" + (dir / "ports"), "--log_level=debug"};
    // The test directory is the model root unless the test names its own.
    bool own_root = false;
    for (const std::string& e : extra) own_root |= e.rfind("--model_root", 0) == 0;
    if (!own_root) argv.push_back("--model_root=" + dir.path());
    argv.insert(argv.end(), extra.begin(), extra.end());
    ::unlink((dir / "ports").c_str());  // a previous daemon's ports must not be read
    process_ = std::make_unique<testing::Subprocess>(argv, dir / "metaloadd");
    auto deadline = std::chrono::steady_clock::now() + 30s;
    while (std::chrono::steady_clock::now() < deadline) {
      std::string ports = testing::ReadFileOrEmpty(dir / "ports");
      for (absl::string_view line : absl::StrSplit(ports, '\n', absl::SkipEmpty())) {
        std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(line, '=');
        if (kv.first == "grpc_port") (void)absl::SimpleAtoi(kv.second, &grpc_port_);
        if (kv.first == "metrics_port") (void)absl::SimpleAtoi(kv.second, &metrics_port_);
      }
      if (grpc_port_ > 0 && metrics_port_ > 0) break;
      if (process_->Wait(20ms)) break;  // exited early: the test will show its stderr
    }
  }

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }
  testing::Subprocess& process() { return *process_; }
  std::shared_ptr<grpc::Channel> Channel() const {
    return grpc::CreateChannel("127.0.0.1:" + std::to_string(grpc_port_),
                               grpc::InsecureChannelCredentials());
  }

 private:
  std::unique_ptr<testing::Subprocess> process_;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
};

}  // namespace metaload

#endif  // METALOAD_TESTS_E2E_DAEMON_PROCESS_H_
