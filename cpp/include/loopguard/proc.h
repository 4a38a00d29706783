// Reading what the OS says about another thread of this process, without the GIL.
#pragma once

#include <pthread.h>
#include <sys/types.h>

#include <vector>

#include "loopguard/classify.h"
#include "loopguard/clock.h"

namespace loopguard {

class ThreadProbe {
 public:
  virtual ~ThreadProbe() = default;
  virtual OsState state() noexcept = 0;
  // Only where the thread is (running, or in which system call), without the scheduler
  // details: all the watchdog's idle poll needs to tell a waiting loop from a busy one, so a
  // probe may answer it with fewer reads.
  virtual OsState where() noexcept { return state(); }
  // CPU time the thread has used, or -1 when the platform cannot tell.
  virtual Nanos cpu_time() noexcept = 0;
  // Threads of this process running in user space right now, except `exclude`: when the loop
  // waits for the GIL, the thread holding it is among these.
  virtual std::vector<long> running_threads(const std::vector<long>& exclude) {
    (void)exclude;
    return {};
  }
  // The thread holding the pthread mutex the watched thread waits for in `state`, -1 when it
  // waits for something else or the owner cannot be told: the culprit of a lock wait.
  virtual long lock_owner(const OsState& state) noexcept {
    (void)state;
    return -1;
  }
  // Kernel id of the watched thread, -1 when unknown.
  virtual long tid() const noexcept { return -1; }
  // Client connections the kernel holds for this process, not yet taken up by its server (see
  // connections.h); -1 when unknown.
  virtual int waiting_connections() noexcept { return -1; }
};

// Linux: /proc/self/task/<tid>/{syscall,stat} (kept open and re-read with pread, which the proc
// seq_file interface supports) and the thread's CPU clock. Elsewhere: CPU clock only when
// available, state unknown, so kinds degrade to "unknown" while detection keeps working.
class OsThreadProbe final : public ThreadProbe {
 public:
  OsThreadProbe(long tid, pthread_t handle);
  ~OsThreadProbe() override;
  OsThreadProbe(const OsThreadProbe&) = delete;
  OsThreadProbe& operator=(const OsThreadProbe&) = delete;

  OsState state() noexcept override;
  OsState where() noexcept override;  // the syscall file only: one read instead of three
  Nanos cpu_time() noexcept override;
  std::vector<long> running_threads(const std::vector<long>& exclude) override;
  long lock_owner(const OsState& state) noexcept override;
  long tid() const noexcept override { return tid_; }
  int waiting_connections() noexcept override;

 private:
  long tid_ = -1;
  int syscall_fd_ = -1;
  int stat_fd_ = -1;
  int schedstat_fd_ = -1;
  bool have_cpu_clock_ = false;
  clockid_t cpu_clock_{};
};

// The kernel thread id of the calling thread (Linux gettid), or -1 where there is none.
long current_tid() noexcept;

// Reads /proc/self/task/<tid>/syscall once: what another thread is doing right now.
OsState read_thread_syscall(long tid) noexcept;

// Whether a reading is a wait in glibc's low-level lock, as every contended pthread_mutex_lock
// is: futex(&mutex.__lock, FUTEX_WAIT, 2).
bool is_mutex_wait(const OsState& state) noexcept;
// For such a wait, the kernel id of the thread of this process that holds the mutex (glibc
// records it next to the lock word), or -1.
long mutex_owner(const OsState& state) noexcept;

// Parsers, exposed for unit tests.
OsState parse_syscall_line(const char* text) noexcept;
char parse_stat_state(const char* text) noexcept;
long parse_stat_major_faults(const char* text) noexcept;  // -1 when malformed
Nanos parse_schedstat_run_delay(const char* text) noexcept;

}  // namespace loopguard
