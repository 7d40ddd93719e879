// A fixed pool of worker threads running queued closures in FIFO order. Destruction runs what is
// queued, then joins. A task that throws is logged (pool_task_threw) and its worker carries on:
// no exception ends a thread, let alone the daemon. Thread-safe.
#ifndef METALOAD_SERVER_CORE_THREAD_POOL_H_
#define METALOAD_SERVER_CORE_THREAD_POOL_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "server/core/mutex.h"

namespace metaload::core {

class ThreadPool {
 public:
  // `on_thread_start`, when given, runs first on each worker (e.g. per-thread library settings).
  explicit ThreadPool(int threads, std::function<void()> on_thread_start = nullptr);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  void Submit(std::function<void()> task);
  // Tasks queued and not yet started.
  size_t queued() const;

 private:
  void Work();

  mutable Mutex mu_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_THREAD_POOL_H_
