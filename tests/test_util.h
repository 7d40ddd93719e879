// Helpers shared by the tests: temporary directories, child processes, the Python reference
// interpreter, and a tiny HTTP GET for /metrics. Header-only; test code only.
#ifndef METALOAD_TESTS_TEST_UTIL_H_
#define METALOAD_TESTS_TEST_UTIL_H_

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace metaload::testing {

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/metaload-test-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (::mkdtemp(buf.data()) == nullptr) std::abort();
    path_ = buf.data();
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Which sanitizer this build runs under (GCC defines __SANITIZE_*, clang has __has_feature).
inline bool UnderAddressSanitizer() {
#if defined(__SANITIZE_ADDRESS__)
  return true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  return true;
#endif
#endif
  return false;
}
inline bool UnderThreadSanitizer() {
#if defined(__SANITIZE_THREAD__)
  return true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
  return true;
#endif
#endif
  return false;
}
inline bool UnderSanitizer() { return UnderAddressSanitizer() || UnderThreadSanitizer(); }

inline std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A child process with stdout and stderr sent to files. Killed (SIGKILL) on destruction if it
// is still running.
class Subprocess {
 public:
  Subprocess(const std::vector<std::string>& argv, const std::string& log_prefix)
      : stdout_path_(log_prefix + ".stdout"), stderr_path_(log_prefix + ".stderr") {
    pid_ = ::fork();
    if (pid_ == 0) {
      int out = ::open(stdout_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      int err = ::open(stderr_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(out, 1);
      ::dup2(err, 2);
      int devnull = ::open("/dev/null", O_RDONLY);
      ::dup2(devnull, 0);
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
  }
  ~Subprocess() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

  pid_t pid() const { return pid_; }
  void Signal(int sig) { ::kill(pid_, sig); }

  // Waits up to `timeout` for the child to exit; its wait status, or nullopt on timeout.
  std::optional<int> Wait(std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      int status = 0;
      pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        exited_ = true;
        return status;
      }
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  std::string Stdout() const { return ReadFileOrEmpty(stdout_path_); }
  std::string Stderr() const { return ReadFileOrEmpty(stderr_path_); }

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  std::string stdout_path_;
  std::string stderr_path_;
};

struct CommandResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Runs argv to completion (at most `timeout`); exit_code is -1 when it was killed or timed out.
inline CommandResult RunCommand(const std::vector<std::string>& argv, const std::string& log_prefix,
                                std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
  Subprocess p(argv, log_prefix);
  std::optional<int> status = p.Wait(timeout);
  CommandResult r;
  if (status && WIFEXITED(*status)) r.exit_code = WEXITSTATUS(*status);
  r.out = p.Stdout();
  r.err = p.Stderr();
  return r;
}

// Plain HTTP/1.0 GET on loopback; the body, or nullopt on any failure.
inline std::optional<std::string> HttpGet(int port, const std::string& path) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return std::nullopt;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return std::nullopt;
  }
  std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (::write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    ::close(fd);
    return std::nullopt;
  }
  std::string resp;
  char buf[8192];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0) resp.append(buf, static_cast<size_t>(n));
  ::close(fd);
  size_t body = resp.find("\r\n\r\n");
  if (resp.rfind("HTTP/1.", 0) != 0 || resp.find(" 200 ") == std::string::npos ||
      body == std::string::npos) {
    return std::nullopt;
  }
  return resp.substr(body + 4);
}

// The value of the first sample of `metric` whose label set equals `labels` ("" for none,
// or e.g. `{version="0.1.0"}`) in Prometheus text format; nullopt when absent.
inline std::optional<double> PromValue(const std::string& text, const std::string& metric,
                                       const std::string& labels = "") {
  std::istringstream in(text);
  std::string line;
  const std::string prefix = metric + labels + " ";
  while (std::getline(in, line)) {
    if (line.rfind(prefix, 0) == 0) return std::stod(line.substr(prefix.size()));
  }
  return std::nullopt;
}

}  // namespace metaload::testing

#endif  // METALOAD_TESTS_TEST_UTIL_H_
