#include "server/core/thread_pool.h"

#include <algorithm>
#include <exception>

#include "server/core/log.h"

namespace metaload::core {

ThreadPool::ThreadPool(int threads, std::function<void()> on_thread_start) {
  for (int i = 0; i < std::max(1, threads); ++i) {
    workers_.emplace_back([this, on_thread_start] {
      if (on_thread_start) on_thread_start();
      Work();
    });
  }
}

ThreadPool::~ThreadPool() {
  {
    MutexLock lock(&mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& w : workers_) w.join();
}

void ThreadPool::Submit(std::function<void()> task) {
  {
    MutexLock lock(&mu_);
    tasks_.push_back(std::move(task));
  }
  wake_.notify_one();
}

size_t ThreadPool::queued() const {
  MutexLock lock(&mu_);
  return tasks_.size();
}

void ThreadPool::Work() {
  while (true) {
    std::function<void()> task;
    {
      MutexLock lock(&mu_);
      lock.Wait(wake_, [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !tasks_.empty();
      });
      if (tasks_.empty()) return;
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    // The last line of defence: tasks return errors through their callbacks, and callers wrap
    // LibTorch and JSON calls in core::CatchExceptions. One that still throws is a bug, logged;
    // the worker (and the daemon) goes on.
    try {
      task();
    } catch (const std::exception& e) {
      LogError("pool_task_threw").Kv("error", e.what());
    } catch (...) {
      LogError("pool_task_threw").Kv("error", "an exception that is no std::exception");
    }
  }
}

}  // namespace metaload::core
