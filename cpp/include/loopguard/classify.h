// What kind of blocking a sample shows, decided from what the OS says the loop thread is doing.
//
// The decision is made from readings taken *before* the sampler asks for the GIL (once it asks,
// the loop thread may be parked on the GIL's futex because of us):
//   - /proc/self/task/<tid>/syscall: "running" (user space), the number of the system call the
//     thread is blocked in, or -1 when it is blocked in the kernel outside any (a page fault);
//   - /proc/self/task/<tid>/stat: the scheduler state letter (R, S, D, ...) and the count of
//     major page faults;
//   - /proc/self/task/<tid>/schedstat: the time spent runnable but not running;
// and, compared with the previous reading, the thread's CPU clock (see Evidence).
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

// Every kind an event can have (kIdle never makes one), for the Python side to check its one
// list of kinds against.
inline constexpr Kind kEventKinds[] = {Kind::kSleep,      Kind::kIo,     Kind::kCpu, Kind::kLock,
                                       Kind::kGil,        Kind::kNative, Kind::kGc,  Kind::kStarved,
                                       Kind::kCumulative, Kind::kUnknown};

struct OsState {
  // kKernel: blocked in the kernel but in no system call, which is a page fault in practice.
  enum class Where : std::uint8_t { kUnknown, kRunning, kSyscall, kKernel };
  Where where = Where::kUnknown;
  long syscall = -1;       // valid when where == kSyscall
  std::uint64_t arg0 = 0;  // first syscall argument (for futex: the address waited on)
  std::uint64_t arg1 = 0;  // second (for futex: the operation)
  std::uint64_t arg2 = 0;  // third (for futex: the value expected at the address)
  char sched_state = 0;    // 'R', 'S', 'D', ... or 0 when unknown
  Nanos run_delay = -1;    // total time spent runnable but not running (schedstat), -1 unknown
  long major_faults = -1;  // major page faults so far (stat), -1 unknown
};

// Classify one reading. Waiting in epoll (both the selector loop and libuv wait there) means the
// loop is idle again, so such a sample is kIdle.
Kind classify(const OsState& state) noexcept;

// What the watchdog knows around one reading besides the reading itself: how the thread's
// counters moved since the previous reading of this stall, and what it knows about the GIL.
struct Evidence {
  Nanos elapsed = -1;      // wall time since the previous reading, -1: none to compare with
  Nanos cpu = -1;          // CPU time the thread used meanwhile, -1: unknown
  Nanos run_delay = -1;    // time it was runnable but not running meanwhile, -1: unknown
  long major_faults = -1;  // major page faults meanwhile, -1: unknown
  bool in_gc = false;      // a cyclic collection runs on the loop thread
  // The kernel thread id of another thread inside a cyclic collection, 0: none. It holds the GIL
  // throughout, so a loop waiting for the GIL meanwhile waits for the collector.
  long gc_thread = 0;
  bool gil_known = false;  // the GIL's futex address has been learned
  bool gil_futex = false;  // the futex the thread waits on is the GIL's
  // One of our own samplers (this engine's or another guard's) holds the GIL. A capture holds
  // it for microseconds, so a loop waiting on it waits on a sampler the host keeps off a CPU.
  bool sampler_has_gil = false;
};

// The kind of one reading given the evidence around it, in this order:
//   - idle stays idle; inside a collection -> kGc;
//   - a futex that is the GIL's -> kGil, even after waiting for a CPU meanwhile (kStarved while
//     our own sampler holds the GIL);
//   - runnable but not running for over half the time since the last reading, and not asleep
//     right now -> kStarved;
//   - any other futex -> kLock;
//   - seen "running" while its CPU clock hardly moved (under a quarter of the time), and in
//     uninterruptible sleep or taking major page faults: time in the kernel without CPU, page
//     faults waiting for the disk (a thread between two faults reads as running) -> kIo;
//   - otherwise classify()'s kind.
Kind refine(const OsState& state, const Evidence& evidence) noexcept;

// The kind of a reading whose sample got no stack because nobody could take the GIL in time.
// `during` is the evidence over the sampler's wait itself (from the reading until it gave up):
//   - a thread running on the CPU may hold the GIL in native code -> kNative, if it kept the CPU
//     busy while the sampler waited (three quarters of the time or more). One that did not let
//     go of the GIL again and again (a busy Python loop on a contended GIL), so other threads
//     held it, which is why the sampler was late -> kGil; or it waited for a CPU most of the
//     time -> kStarved. Without a reading over the wait: kNative, and kUnknown if its CPU clock
//     hardly moved before the reading either (native code would have used the CPU);
//   - one waiting on a futex waits for the GIL that another thread holds -> kGil, unless the
//     GIL's address is known and this futex is another one: then it is a lock like any other
//     (other threads may keep the GIL busy meanwhile, which is why the sampler was late), and
//     kStarved when our own sampler holds the GIL;
//   - anything else keeps its kind.
Kind without_stack(Kind refined, const Evidence& evidence, const Evidence& during = {}) noexcept;

// The kind of a run of samples: the most frequent one, ignoring kUnknown and kIdle when anything
// better was seen. Ties go to the earlier kind in the run (the blocker that was found first).
Kind majority_kind(const std::vector<Kind>& kinds) noexcept;

}  // namespace loopguard
