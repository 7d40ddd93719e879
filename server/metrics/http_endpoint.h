// A small HTTP/1.x server for one read-only endpoint (Prometheus's GET /metrics), so that the
// daemon needs no web framework. prometheus-cpp's exposer uses civetweb, whose Debian build gives
// its threads 100 KiB stacks; glibc puts every library's static TLS on each thread's stack, and
// with OpenBLAS (60 KiB of it) beside LibTorch's libraries civetweb cannot start a thread.
//
// One thread accepts connections and answers them one at a time, then closes each (Prometheus
// opens a connection per scrape when told to close). GET and HEAD of the path get the body;
// other paths 404, other methods 405, malformed requests 400, requests over 16 KiB 431. Reading
// a request and writing its answer each have a deadline, so a slow or silent client holds the
// endpoint for at most that long. Destruction stops at once.
#ifndef METALOAD_SERVER_METRICS_HTTP_ENDPOINT_H_
#define METALOAD_SERVER_METRICS_HTTP_ENDPOINT_H_

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace metaload::metrics {

class HttpEndpoint {
 public:
  struct Options {
    // host:port or [v6-host]:port; an empty host means every interface; port 0 picks one.
    std::string listen = "127.0.0.1:9464";
    std::string path = "/metrics";
    std::string content_type = "text/plain; version=0.0.4; charset=utf-8";
    // For reading one request, and again for writing its answer.
    std::chrono::milliseconds io_timeout{5000};
  };
  // Produces the body for each GET; runs on the endpoint's thread.
  using BodyFn = std::function<std::string()>;

  // Binds and starts serving. UNAVAILABLE naming the address when it cannot be bound,
  // INVALID_ARGUMENT when it is not HOST:PORT.
  static absl::StatusOr<std::unique_ptr<HttpEndpoint>> Start(Options options, BodyFn body);
  ~HttpEndpoint();

  HttpEndpoint(const HttpEndpoint&) = delete;
  HttpEndpoint& operator=(const HttpEndpoint&) = delete;

  // The bound port (the real one when the address asked for port 0).
  int port() const { return port_; }

 private:
  HttpEndpoint(Options options, BodyFn body)
      : options_(std::move(options)), body_(std::move(body)) {}
  struct Reply {
    int code;
    const char* reason;
    std::string body;  // text/plain unless the code is 200
  };
  void Serve();
  // Reads one request from `fd` and answers it.
  void Answer(int fd);
  // The reply to `request_line`; `head` is set for a HEAD request (headers only).
  Reply Route(const std::string& request_line, bool* head) const;

  const Options options_;
  const BodyFn body_;
  int listen_fd_ = -1;
  int stop_pipe_[2] = {-1, -1};  // written once by the destructor
  int port_ = 0;
  std::thread thread_;
};

}  // namespace metaload::metrics

#endif  // METALOAD_SERVER_METRICS_HTTP_ENDPOINT_H_
