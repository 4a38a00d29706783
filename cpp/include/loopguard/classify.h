// What kind of blocking a sample shows, decided from what the OS says the loop thread is doing.
//
// The decision is made from two readings taken *before* the sampler asks for the GIL (once it
// asks, the loop thread may be parked on the GIL's futex because of us):
//   - /proc/self/task/<tid>/syscall: "running" (user space) or the number of the system call the
//     thread is blocked in;
//   - /proc/self/task/<tid>/stat: the scheduler state letter (R, S, D, ...).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "loopguard/clock.h"

namespace loopguard {

enum class Kind : std::uint8_t {
  kUnknown = 0,
  kSleep,       // clock_nanosleep/nanosleep: time.sleep and friends
  kIo,          // blocked in a read/write/recv/send/connect/poll/select style call or in disk wait
  kCpu,         // running Python or native code in user space
  kLock,        // blocked on a futex: threading.Lock, queue.get, a condition variable
  kGil,         // waiting for the GIL while another thread holds it
  kNative,      // running native code that holds the GIL (the sampler cannot get it)
  kGc,          // inside a cyclic garbage collection
  kStarved,     // runnable but not scheduled: CPU throttling or an overloaded host
  kIdle,        // back in epoll_wait/select of the loop itself: not a culprit, discard the sample
  kCumulative,  // many short steps of one request (cumulative.h); never an OS classification
};

const char* kind_name(Kind kind) noexcept;

struct OsState {
  enum class Where : std::uint8_t { kUnknown, kRunning, kSyscall };
  Where where = Where::kUnknown;
  long syscall = -1;       // valid when where == kSyscall
  std::uint64_t arg0 = 0;  // first syscall argument (for futex: the address waited on)
  char sched_state = 0;    // 'R', 'S', 'D', ... or 0 when unknown
  Nanos run_delay = -1;    // total time spent runnable but not running (schedstat), -1 unknown
};

// Classify one reading. Waiting in epoll (both the selector loop and libuv wait there) means the
// loop is idle again, so such a sample is kIdle.
Kind classify(const OsState& state) noexcept;

// The kind of a run of samples: the most frequent one, ignoring kUnknown and kIdle when anything
// better was seen. Ties go to the earlier kind in the run (the blocker that was found first).
Kind majority_kind(const std::vector<Kind>& kinds) noexcept;

}  // namespace loopguard
