// The /metrics HTTP endpoint: what it answers to each kind of request, and that a slow, silent
// or oversized client can neither block it for long nor keep it from stopping.
#include "server/metrics/http_endpoint.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

namespace metaload::metrics {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

int Connect(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  return fd;
}

// Sends `request` and returns everything the endpoint answers before it closes.
std::string Exchange(int port, const std::string& request) {
  const int fd = Connect(port);
  EXPECT_EQ(::send(fd, request.data(), request.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(request.size()));
  std::string response;
  char buffer[4096];
  ssize_t n;
  while ((n = ::recv(fd, buffer, sizeof(buffer), 0)) > 0) response.append(buffer, n);
  ::close(fd);
  return response;
}

std::unique_ptr<HttpEndpoint> StartOrDie(std::atomic<int>* calls,
                                         std::chrono::milliseconds io_timeout = 5s) {
  HttpEndpoint::Options options;
  options.listen = "127.0.0.1:0";
  options.io_timeout = io_timeout;
  auto endpoint = HttpEndpoint::Start(options, [calls] {
    ++*calls;
    return std::string("metaload_up 1\n");
  });
  EXPECT_TRUE(endpoint.ok()) << endpoint.status();
  EXPECT_GT((*endpoint)->port(), 0);
  return std::move(*endpoint);
}

TEST(HttpEndpointTest, AnswersEachKindOfRequest) {
  std::atomic<int> calls{0};
  auto endpoint = StartOrDie(&calls);
  const int port = endpoint->port();

  EXPECT_EQ(Exchange(port, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n"),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            "Content-Length: 14\r\nConnection: close\r\n\r\nmetaload_up 1\n");
  EXPECT_EQ(calls.load(), 1);
  // A query string is ignored, HTTP/1.0 and bare newlines are fine.
  EXPECT_EQ(Exchange(port, "GET /metrics?x=1 HTTP/1.0\n\n").rfind("HTTP/1.1 200 OK\r\n", 0), 0u);
  // HEAD: the same headers, no body.
  const std::string head = Exchange(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
  EXPECT_EQ(head.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << head;
  EXPECT_NE(head.find("Content-Length: 14\r\n"), std::string::npos) << head;
  EXPECT_EQ(head.substr(head.size() - 4), "\r\n\r\n");
  EXPECT_EQ(calls.load(), 3);

  const std::string missing = Exchange(port, "GET /metricsx HTTP/1.1\r\n\r\n");
  EXPECT_EQ(missing.rfind("HTTP/1.1 404 Not Found\r\n", 0), 0u) << missing;
  EXPECT_NE(missing.find("not found; see /metrics\n"), std::string::npos) << missing;
  const std::string post = Exchange(port, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
  EXPECT_EQ(post.rfind("HTTP/1.1 405 Method Not Allowed\r\n", 0), 0u) << post;
  EXPECT_NE(post.find("Allow: GET, HEAD\r\n"), std::string::npos) << post;
  for (const char* bad : {"garbage\r\n\r\n", "GET metrics HTTP/1.1\r\n\r\n",
                          "GET /metrics SPDY/3\r\n\r\n", "GET  /metrics HTTP/1.1\r\n\r\n"}) {
    EXPECT_EQ(Exchange(port, bad).rfind("HTTP/1.1 400 Bad Request\r\n", 0), 0u) << bad;
  }
  const std::string huge =
      Exchange(port, "GET /metrics HTTP/1.1\r\nX-Pad: " + std::string(20000, 'a') + "\r\n\r\n");
  EXPECT_EQ(huge.rfind("HTTP/1.1 431 ", 0), 0u) << huge.substr(0, 100);
  EXPECT_EQ(calls.load(), 3);  // none of those produced a body
}

TEST(HttpEndpointTest, ASilentClientHoldsItOnlyUntilTheTimeout) {
  std::atomic<int> calls{0};
  auto endpoint = StartOrDie(&calls, 300ms);
  const int silent = Connect(endpoint->port());  // connects, never sends
  const auto start = Clock::now();
  const std::string answer = Exchange(endpoint->port(), "GET /metrics HTTP/1.1\r\n\r\n");
  const auto waited = Clock::now() - start;
  EXPECT_EQ(answer.rfind("HTTP/1.1 200 OK\r\n", 0), 0u);
  EXPECT_LT(waited, 3s);
  char byte;
  EXPECT_EQ(::recv(silent, &byte, 1, 0), 0);  // closed by the endpoint without an answer
  ::close(silent);
}

TEST(HttpEndpointTest, StopsAtOnceEvenWithAClientConnected) {
  std::atomic<int> calls{0};
  auto endpoint = StartOrDie(&calls, 60s);
  const int silent = Connect(endpoint->port());
  std::this_thread::sleep_for(50ms);  // the endpoint is now waiting on that client
  const auto start = Clock::now();
  endpoint.reset();
  EXPECT_LT(Clock::now() - start, 1s);
  ::close(silent);
}

TEST(HttpEndpointTest, StopsAtOnceWhileAClientDoesNotReadItsAnswer) {
  HttpEndpoint::Options options;
  options.listen = "127.0.0.1:0";
  options.io_timeout = 60s;
  auto endpoint = HttpEndpoint::Start(options, [] {
    return std::string(32 << 20, 'x');  // far more than the socket buffers hold
  });
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  const int reader = Connect((*endpoint)->port());
  const std::string request = "GET /metrics HTTP/1.1\r\n\r\n";
  ASSERT_EQ(::send(reader, request.data(), request.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(request.size()));
  // Once the first bytes arrive the body is built and the endpoint is writing; the buffers fill
  // and it blocks.
  pollfd arrived{reader, POLLIN, 0};
  ASSERT_EQ(::poll(&arrived, 1, 30000), 1);
  std::this_thread::sleep_for(200ms);
  const auto start = Clock::now();
  endpoint->reset();
  EXPECT_LT(Clock::now() - start, 1s);
  ::close(reader);
}

TEST(HttpEndpointTest, BusyAndMalformedAddressesAreNamed) {
  std::atomic<int> calls{0};
  auto first = StartOrDie(&calls);
  HttpEndpoint::Options options;
  options.listen = "127.0.0.1:" + std::to_string(first->port());
  auto second = HttpEndpoint::Start(options, [] { return std::string(); });
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find("cannot listen on " + options.listen +
                                           ": Address already in use"),
            std::string::npos)
      << second.status();
  for (const char* bad : {"9464", "127.0.0.1:http", "127.0.0.1:70000", "[::1]9464"}) {
    options.listen = bad;
    auto refused = HttpEndpoint::Start(options, [] { return std::string(); });
    ASSERT_FALSE(refused.ok()) << bad;
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

}  // namespace
}  // namespace metaload::metrics
