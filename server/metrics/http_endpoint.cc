#include "server/metrics/http_endpoint.h"

#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace metaload::metrics {
namespace {

// Splits "host:port" or "[v6]:port"; false when it is neither.
bool SplitHostPort(const std::string& listen, std::string* host, std::string* port) {
  if (!listen.empty() && listen[0] == '[') {
    const size_t close = listen.find("]:");
    if (close == std::string::npos) return false;
    *host = listen.substr(1, close - 1);
    *port = listen.substr(close + 2);
  } else {
    const size_t colon = listen.rfind(':');
    if (colon == std::string::npos) return false;
    *host = listen.substr(0, colon);
    *port = listen.substr(colon + 1);
  }
  int number = 0;
  return absl::SimpleAtoi(*port, &number) && number >= 0 && number <= 65535;
}

void DeleteString(void* body) { delete static_cast<std::string*>(body); }

}  // namespace

struct HttpEndpoint::Callbacks {
  static MHD_Result Access(void* cls, MHD_Connection* connection, const char* url,
                           const char* method, const char* /*version*/, const char* /*upload_data*/,
                           size_t* /*upload_data_size*/, void** /*request_state*/) {
    // No exception may cross into libmicrohttpd's C: out of memory closes the connection.
    try {
      return Queue(*static_cast<const HttpEndpoint*>(cls), connection, url, method);
    } catch (...) {
      return MHD_NO;
    }
  }

  // Answers on the first call, before any request body is read (none is wanted).
  static MHD_Result Queue(const HttpEndpoint& endpoint, MHD_Connection* connection, const char* url,
                          const char* method) {
    Answer answer = endpoint.Route(url, method);
    auto body = std::make_unique<std::string>(std::move(answer.body));
    MHD_Response* response = MHD_create_response_from_buffer_with_free_callback_cls(
        body->size(), body->data(), &DeleteString, body.get());
    if (response == nullptr) return MHD_NO;  // closes the connection
    body.release();                          // the response frees it
    MHD_add_response_header(
        response, MHD_HTTP_HEADER_CONTENT_TYPE,
        answer.code == MHD_HTTP_OK ? endpoint.options_.content_type.c_str() : "text/plain");
    MHD_add_response_header(response, MHD_HTTP_HEADER_CONNECTION, "close");
    if (answer.code == MHD_HTTP_METHOD_NOT_ALLOWED) {
      MHD_add_response_header(response, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    }
    const MHD_Result queued = MHD_queue_response(connection, answer.code, response);
    MHD_destroy_response(response);  // the connection holds it until it is sent
    return queued;
  }
};

absl::StatusOr<std::unique_ptr<HttpEndpoint>> HttpEndpoint::Start(Options options, BodyFn body) {
  if (options.connection_timeout < std::chrono::seconds(1) || options.threads == 0) {
    return absl::InvalidArgumentError(
        "metrics endpoint: connection_timeout under 1 s or no threads");
  }
  std::string host, port;
  if (!SplitHostPort(options.listen, &host, &port)) {
    return absl::InvalidArgumentError(
        absl::StrCat("address '", options.listen, "': expected HOST:PORT"));
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const int gai =
      ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &found);
  if (gai != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen, ": ", ::gai_strerror(gai)));
  }
  std::unique_ptr<HttpEndpoint> endpoint(new HttpEndpoint(std::move(options), std::move(body)));
  int listen_fd = -1;
  int error = 0;
  for (addrinfo* a = found; a != nullptr && listen_fd < 0; a = a->ai_next) {
    const int fd =
        ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      error = errno;
      continue;
    }
    const int one = 1;
    (void)::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, SOMAXCONN) != 0) {
      error = errno;
      ::close(fd);
      continue;
    }
    listen_fd = fd;
  }
  ::freeaddrinfo(found);
  if (listen_fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", endpoint->options_.listen, ": ", std::strerror(error)));
  }
  sockaddr_storage bound{};
  socklen_t length = sizeof(bound);
  if (::getsockname(listen_fd, reinterpret_cast<sockaddr*>(&bound), &length) == 0) {
    endpoint->port_ =
        ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                          : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  }
  const Options& o = endpoint->options_;
  // libmicrohttpd owns the socket from here (MHD_stop_daemon closes it), or we close it below.
  endpoint->daemon_ = MHD_start_daemon(
      MHD_USE_EPOLL_INTERNAL_THREAD | MHD_USE_ITC, /*port=*/0, /*apc=*/nullptr, nullptr,
      &Callbacks::Access, endpoint.get(), MHD_OPTION_LISTEN_SOCKET, listen_fd,
      MHD_OPTION_THREAD_POOL_SIZE, o.threads, MHD_OPTION_THREAD_STACK_SIZE, o.thread_stack_bytes,
      MHD_OPTION_CONNECTION_TIMEOUT, static_cast<unsigned>(o.connection_timeout.count()),
      MHD_OPTION_CONNECTION_LIMIT, o.connection_limit, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
      o.max_request_bytes, MHD_OPTION_END);
  if (endpoint->daemon_ == nullptr) {
    ::close(listen_fd);
    return absl::UnavailableError(
        absl::StrCat("cannot serve ", o.listen, ": libmicrohttpd did not start"));
  }
  return endpoint;
}

HttpEndpoint::~HttpEndpoint() {
  if (daemon_ != nullptr) MHD_stop_daemon(daemon_);
}

HttpEndpoint::Answer HttpEndpoint::Route(const char* url, const char* method) const {
  const bool get = std::strcmp(method, MHD_HTTP_METHOD_GET) == 0;
  if (!get && std::strcmp(method, MHD_HTTP_METHOD_HEAD) != 0) {
    return {MHD_HTTP_METHOD_NOT_ALLOWED, "only GET and HEAD\n"};
  }
  // libmicrohttpd hands over the path without its query string.
  if (options_.path != url) {
    return {MHD_HTTP_NOT_FOUND, absl::StrCat("not found; see ", options_.path, "\n")};
  }
  try {
    return {MHD_HTTP_OK, body_()};
  } catch (const std::exception& e) {
    return {MHD_HTTP_INTERNAL_SERVER_ERROR, absl::StrCat(e.what(), "\n")};
  }
}

}  // namespace metaload::metrics
