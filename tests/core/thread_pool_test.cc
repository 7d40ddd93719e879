// ThreadPool: FIFO order, queued work finished on destruction, the per-thread start hook, and
// a worker that outlives a throwing task.
#include "server/core/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

namespace metaload::core {
namespace {

TEST(ThreadPoolTest, OneWorkerRunsTasksInOrderAndFinishesTheQueueOnDestruction) {
  std::vector<int> order;
  {
    ThreadPool pool(1);
    for (int i = 0; i < 100; ++i) pool.Submit([&order, i] { order.push_back(i); });
  }
  ASSERT_EQ(order.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(order[i], i);
}

TEST(ThreadPoolTest, TheStartHookRunsOnEachWorkerBeforeItsFirstTask) {
  std::mutex mu;
  std::set<std::thread::id> hooked;
  std::atomic<int> unhooked_tasks{0}, tasks{0};
  {
    ThreadPool pool(3, [&] {
      std::lock_guard<std::mutex> lock(mu);
      hooked.insert(std::this_thread::get_id());
    });
    for (int i = 0; i < 300; ++i) {
      pool.Submit([&] {
        std::lock_guard<std::mutex> lock(mu);
        if (!hooked.count(std::this_thread::get_id())) ++unhooked_tasks;
        ++tasks;
      });
    }
  }
  EXPECT_EQ(tasks.load(), 300);
  EXPECT_EQ(unhooked_tasks.load(), 0);
  EXPECT_EQ(hooked.size(), 3u);
}

// Hostile: a task that throws (a std::exception or anything else) is logged; its worker goes on.
// Before the fix the exception left the worker thread: std::terminate, the daemon gone.
TEST(ThreadPoolTest, AThrowingTaskIsLoggedAndItsWorkerSurvives) {
  std::vector<int> ran;
  {
    ThreadPool pool(1);
    pool.Submit([] { throw std::runtime_error("task failed"); });
    pool.Submit([&ran] { ran.push_back(1); });
    pool.Submit([] { throw 42; });
    pool.Submit([&ran] { ran.push_back(2); });
  }
  EXPECT_EQ(ran, (std::vector<int>{1, 2}));
}

}  // namespace
}  // namespace metaload::core
