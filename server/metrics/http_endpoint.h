// A read-only HTTP endpoint for one path (Prometheus's GET /metrics), on GNU libmicrohttpd.
//
// Why libmicrohttpd and not prometheus-cpp's exposer: the exposer uses civetweb, whose Debian
// build gives its threads fixed 100 KiB stacks; glibc puts every library's static TLS on each
// thread's stack, and with OpenBLAS (60 KiB of it) beside LibTorch's libraries civetweb cannot
// start a thread. libmicrohttpd lets the stack be set (MHD_OPTION_THREAD_STACK_SIZE; 1 MiB here).
// libmicrohttpd polls every connection (epoll), so a silent or slow client delays no one (a
// server that answers one connection at a time lets 10 silent ones delay a scrape by 50 s).
//
// Threads: `Options::threads` polling threads (each with its own epoll set) accept, read and
// answer connections; BodyFn runs on them. GET and HEAD of the path get the body; other paths
// 404, other methods 405, HTTP versions other than 1.x 505, malformed requests 400, request
// headers over `max_request_bytes` 431 (all but 404/405 answered by libmicrohttpd itself). Every
// answer closes its connection. A connection idle for `connection_timeout` is closed; beyond
// `connection_limit` open connections, new ones are closed on accept. Destruction stops at once,
// whatever the clients do, and waits for a BodyFn that is running.
//
// Memory: at most connection_limit x max_request_bytes for requests, plus the bodies being sent.
#ifndef METALOAD_SERVER_METRICS_HTTP_ENDPOINT_H_
#define METALOAD_SERVER_METRICS_HTTP_ENDPOINT_H_

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

struct MHD_Daemon;
struct MHD_Connection;

namespace metaload::metrics {

class HttpEndpoint {
 public:
  struct Options {
    // host:port or [v6-host]:port; an empty host means every interface; port 0 picks one.
    std::string listen = "127.0.0.1:9464";
    std::string path = "/metrics";
    std::string content_type = "text/plain; version=0.0.4; charset=utf-8";
    // A connection that sends or accepts nothing for this long is closed (whole seconds: the
    // library's granularity; at least 1).
    std::chrono::seconds connection_timeout{5};
    // Open connections at most; more are closed as soon as they are accepted.
    unsigned connection_limit = 512;
    // Largest request (line and headers) read; larger ones get 431.
    size_t max_request_bytes = 16 << 10;
    // Polling threads, and each one's stack (glibc carves the libraries' static TLS out of it).
    unsigned threads = 2;
    size_t thread_stack_bytes = 1 << 20;
  };
  // Produces the body for each GET or HEAD; runs on a polling thread. An exception becomes 500.
  using BodyFn = std::function<std::string()>;

  // Binds and starts serving. UNAVAILABLE naming the address when it cannot be bound or the
  // server cannot start, INVALID_ARGUMENT when it is not HOST:PORT.
  static absl::StatusOr<std::unique_ptr<HttpEndpoint>> Start(Options options, BodyFn body);
  ~HttpEndpoint();

  HttpEndpoint(const HttpEndpoint&) = delete;
  HttpEndpoint& operator=(const HttpEndpoint&) = delete;

  // The bound port (the real one when the address asked for port 0).
  int port() const { return port_; }

 private:
  HttpEndpoint(Options options, BodyFn body)
      : options_(std::move(options)), body_(std::move(body)) {}
  struct Callbacks;  // libmicrohttpd's C callbacks, defined beside them in the .cc
  // The answer to one request: the status code and, but for 200, a text/plain body.
  struct Answer {
    unsigned code;
    std::string body;
  };
  Answer Route(const char* url, const char* method) const;

  const Options options_;
  const BodyFn body_;
  int port_ = 0;
  MHD_Daemon* daemon_ = nullptr;  // owns the listening socket and the polling threads
};

}  // namespace metaload::metrics

#endif  // METALOAD_SERVER_METRICS_HTTP_ENDPOINT_H_
