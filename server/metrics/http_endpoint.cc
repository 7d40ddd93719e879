#include "server/metrics/http_endpoint.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace metaload::metrics {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMaxRequestBytes = 16 << 10;

// Milliseconds left until `deadline`, for poll(); 0 once it has passed.
int MsLeft(Clock::time_point deadline) {
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left > 0 ? static_cast<int>(left) : 0;
}

// Writes all of `data` before `deadline`; false when the peer is gone or too slow, or when
// `stop_fd` becomes readable (the endpoint is stopping).
bool WriteAll(int fd, const std::string& data, Clock::time_point deadline, int stop_fd) {
  size_t done = 0;
  while (done < data.size()) {
    pollfd p[2] = {{fd, POLLOUT, 0}, {stop_fd, POLLIN, 0}};
    if (::poll(p, 2, MsLeft(deadline)) <= 0 || p[1].revents != 0) return false;
    const ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

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

}  // namespace

absl::StatusOr<std::unique_ptr<HttpEndpoint>> HttpEndpoint::Start(Options options, BodyFn body) {
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
  int error = 0;
  for (addrinfo* a = found; a != nullptr && endpoint->listen_fd_ < 0; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      error = errno;
      continue;
    }
    const int one = 1;
    (void)::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, 64) != 0) {
      error = errno;
      ::close(fd);
      continue;
    }
    endpoint->listen_fd_ = fd;
  }
  ::freeaddrinfo(found);
  if (endpoint->listen_fd_ < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", endpoint->options_.listen, ": ", std::strerror(error)));
  }
  sockaddr_storage bound{};
  socklen_t length = sizeof(bound);
  if (::getsockname(endpoint->listen_fd_, reinterpret_cast<sockaddr*>(&bound), &length) == 0) {
    endpoint->port_ =
        ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                          : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  }
  if (::pipe2(endpoint->stop_pipe_, O_CLOEXEC) != 0) {
    return absl::UnavailableError(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  endpoint->thread_ = std::thread([e = endpoint.get()] { e->Serve(); });
  return endpoint;
}

HttpEndpoint::~HttpEndpoint() {
  if (thread_.joinable()) {
    const char byte = 0;
    while (::write(stop_pipe_[1], &byte, 1) < 0 && errno == EINTR) {
    }
    thread_.join();
  }
  for (int fd : {listen_fd_, stop_pipe_[0], stop_pipe_[1]}) {
    if (fd >= 0) ::close(fd);
  }
}

void HttpEndpoint::Serve() {
  while (true) {
    pollfd p[2] = {{listen_fd_, POLLIN, 0}, {stop_pipe_[0], POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (p[1].revents != 0) return;
    if (p[0].revents == 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      // Out of descriptors: the connection stays queued; try again a little later.
      if (errno == EMFILE || errno == ENFILE)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;  // or the client gave up before we got to it
    }
    Answer(fd);
    ::close(fd);
  }
}

void HttpEndpoint::Answer(int fd) {
  const auto read_deadline = Clock::now() + options_.io_timeout;
  std::string request;
  char buffer[4096];
  size_t end;  // where the request's header ends
  while ((end = std::min(request.find("\r\n\r\n"), request.find("\n\n"))) == std::string::npos &&
         request.size() <= kMaxRequestBytes) {
    pollfd p[2] = {{fd, POLLIN, 0}, {stop_pipe_[0], POLLIN, 0}};
    if (::poll(p, 2, MsLeft(read_deadline)) <= 0 || p[1].revents != 0) return;
    const ssize_t n = ::recv(fd, buffer, sizeof(buffer), 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return;
    request.append(buffer, static_cast<size_t>(n));
  }
  bool head = false;
  const Reply reply = end == std::string::npos || end > kMaxRequestBytes
                          ? Reply{431, "Request Header Fields Too Large", "request over 16 KiB\n"}
                          : Route(request.substr(0, request.find_first_of("\r\n")), &head);
  const std::string header =
      absl::StrCat("HTTP/1.1 ", reply.code, " ", reply.reason,
                   "\r\nContent-Type: ", reply.code == 200 ? options_.content_type : "text/plain",
                   "\r\nContent-Length: ", reply.body.size(), "\r\nConnection: close\r\n",
                   reply.code == 405 ? "Allow: GET, HEAD\r\n" : "", "\r\n");
  const auto write_deadline = Clock::now() + options_.io_timeout;
  if (WriteAll(fd, header, write_deadline, stop_pipe_[0]) && !head) {
    WriteAll(fd, reply.body, write_deadline, stop_pipe_[0]);
  }
}

HttpEndpoint::Reply HttpEndpoint::Route(const std::string& request_line, bool* head) const {
  const std::vector<std::string> parts = absl::StrSplit(request_line, ' ');
  if (parts.size() != 3 || parts[1].empty() || parts[1][0] != '/' ||
      parts[2].rfind("HTTP/1.", 0) != 0) {
    return {400, "Bad Request", "malformed request line\n"};
  }
  *head = parts[0] == "HEAD";
  if (parts[0] != "GET" && !*head) return {405, "Method Not Allowed", "only GET and HEAD\n"};
  if (parts[1].substr(0, parts[1].find('?')) != options_.path) {
    return {404, "Not Found", absl::StrCat("not found; see ", options_.path, "\n")};
  }
  try {
    return {200, "OK", body_()};
  } catch (const std::exception& e) {
    return {500, "Internal Server Error", e.what()};
  }
}

}  // namespace metaload::metrics
