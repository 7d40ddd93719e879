// core::Mutex and core::MutexLock: std::mutex with clang's thread-safety annotations, so that
// `ABSL_GUARDED_BY(mu_)` on a member and `ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_)` on a function are
// checked at compile time (`make thread-safety`, part of `make test`: clang with
// -Werror=thread-safety over every file that includes this header).
//
// Why not absl::Mutex, which carries these annotations already: Debian's libabsl is not built
// with ThreadSanitizer, so TSan would not see its synchronization and the TSan run (also part of
// `make test`) would report every guarded access as a race. std::mutex goes through pthreads,
// which TSan intercepts. The annotation macros are Abseil's (absl/base/thread_annotations.h,
// header only); under GCC they expand to nothing.
//
// Waiting on a condition: MutexLock::Wait / WaitFor / WaitUntil take a std::condition_variable
// and a predicate. The predicate runs with the lock held, but the analysis cannot see that
// through the standard library; annotate it `[&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {...}`.
//
// Thread-safe (it is a mutex).
#ifndef METALOAD_SERVER_CORE_MUTEX_H_
#define METALOAD_SERVER_CORE_MUTEX_H_

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "absl/base/thread_annotations.h"

namespace metaload::core {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }
  // Takes the lock only if nobody holds it; then adopt it with MutexLock(mu, kAdoptLock).
  bool TryLock() ABSL_EXCLUSIVE_TRYLOCK_FUNCTION(true) { return mu_.try_lock(); }
  // Tells the analysis the caller holds the lock where it cannot see it (a callback the
  // caller documents as running under it). Checks nothing at run time.
  void AssertHeld() const ABSL_ASSERT_EXCLUSIVE_LOCK() {}

 private:
  friend class MutexLock;
  std::mutex mu_;
};

struct AdoptLock {};
inline constexpr AdoptLock kAdoptLock{};

// Holds a Mutex for its scope (or until Unlock).
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : lock_(mu->mu_) {}
  // Takes over a lock the caller already holds (after a successful TryLock).
  MutexLock(Mutex* mu, AdoptLock) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu)
      : lock_(mu->mu_, std::adopt_lock) {}
  ~MutexLock() ABSL_UNLOCK_FUNCTION() {}
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  // Releases early, e.g. before notifying or freeing; the destructor then does nothing.
  void Unlock() ABSL_UNLOCK_FUNCTION() { lock_.unlock(); }

  // Blocks until `done()` holds, releasing the lock while it waits.
  template <typename Predicate>
  void Wait(std::condition_variable& cv, Predicate done) {
    cv.wait(lock_, done);
  }
  // As Wait, up to `timeout`; returns done().
  template <typename Rep, typename Period, typename Predicate>
  bool WaitFor(std::condition_variable& cv, std::chrono::duration<Rep, Period> timeout,
               Predicate done) {
    return cv.wait_for(lock_, timeout, done);
  }
  template <typename Clock, typename Duration, typename Predicate>
  bool WaitUntil(std::condition_variable& cv, std::chrono::time_point<Clock, Duration> deadline,
                 Predicate done) {
    return cv.wait_until(lock_, deadline, done);
  }

 private:
  std::unique_lock<std::mutex> lock_;
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_MUTEX_H_
