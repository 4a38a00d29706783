// Where a thread is and what that means: the real probe on real threads, a mutex's owner, the
// kind from one reading (classify), from a reading and the evidence around it (refine), and the
// majority over a run.
#include <gtest/gtest.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "loopguard/classify.h"
#include "loopguard/proc.h"

namespace loopguard {
namespace {

OsState InSyscall(long nr, char sched = 'S') {
  OsState st;
  st.where = OsState::Where::kSyscall;
  st.syscall = nr;
  st.sched_state = sched;
  return st;
}

#ifdef __linux__
// The real probe on a real thread: where() (the watchdog's every-tick poll, one /proc read) and
// state() agree on a thread waiting in epoll_wait (idle) and on one running user code.
TEST(OsThreadProbe, WhereSeesAWaitingAndARunningThread) {
  std::atomic<long> tid{-1};
  std::atomic<int> phase{0};  // 0: wait in epoll_wait, 1: spin, 2: done
  const int ep = ::epoll_create1(EPOLL_CLOEXEC);
  ASSERT_GE(ep, 0);
  std::thread worker([&] {
    tid = static_cast<long>(::syscall(SYS_gettid));
    epoll_event ev{};
    while (phase.load() == 0) ::epoll_wait(ep, &ev, 1, 20);
    while (phase.load() == 1) {
    }
  });
  while (tid.load() < 0) std::this_thread::yield();
  OsThreadProbe probe(tid.load(), worker.native_handle());
  auto eventually = [&](Kind want) {
    for (int i = 0; i < 500; ++i) {
      if (classify(probe.where()) == want && classify(probe.state()) == want) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return false;
  };
  EXPECT_TRUE(eventually(Kind::kIdle));
  phase = 1;
  EXPECT_TRUE(eventually(Kind::kCpu));
  phase = 2;
  worker.join();
  ::close(ep);
}

// A thread blocked in pthread_mutex_lock waits in glibc's low-level lock; the probe reads who
// holds the mutex. A semaphore wait (CPython 3.11's own locks) is not taken for one.
TEST(OsThreadProbe, LockOwnerOfAContendedPthreadMutex) {
  pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
  std::atomic<long> holder_tid{-1};
  std::atomic<long> waiter_tid{-1};
  std::atomic<bool> release{false};
  std::thread holder([&] {
    pthread_mutex_lock(&mutex);
    holder_tid = static_cast<long>(::syscall(SYS_gettid));
    while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    pthread_mutex_unlock(&mutex);
  });
  while (holder_tid.load() < 0) std::this_thread::yield();
  std::thread waiter([&] {
    waiter_tid = static_cast<long>(::syscall(SYS_gettid));
    pthread_mutex_lock(&mutex);
    pthread_mutex_unlock(&mutex);
  });
  while (waiter_tid.load() < 0) std::this_thread::yield();
  OsThreadProbe probe(waiter_tid.load(), waiter.native_handle());
  long owner = -1;
  for (int i = 0; i < 500 && owner < 0; ++i) {
    owner = probe.lock_owner(probe.state());
    if (owner < 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_EQ(owner, holder_tid.load());
  EXPECT_EQ(classify(probe.state()), Kind::kLock);
  release = true;
  holder.join();
  waiter.join();
}

TEST(MutexOwner, OnlyGlibcLockWaitsAreRead) {
#ifdef SYS_futex
  int word = 2;
  OsState mutex_wait = parse_syscall_line("202 0x1000 0x80 0x2 0x0 0x0 0x0 0x7ffd 0x7f12");
  EXPECT_TRUE(is_mutex_wait(mutex_wait));
  mutex_wait.arg0 = reinterpret_cast<std::uint64_t>(&word);
  EXPECT_EQ(mutex_owner(mutex_wait), -1);  // the int after it is no thread of ours
  EXPECT_TRUE(is_mutex_wait(parse_syscall_line("202 0x1000 0x0 0x2 0x0")));  // shared mutex
  // A semaphore waits for 0, a condition variable's sequence with FUTEX_WAIT_BITSET.
  EXPECT_FALSE(is_mutex_wait(parse_syscall_line("202 0x1000 0x80 0x0 0x0")));
  EXPECT_FALSE(is_mutex_wait(parse_syscall_line("202 0x1000 0x189 0x2 0x0")));
  // Unmapped memory: read cleanly as nothing, never a fault.
  OsState unmapped = parse_syscall_line("202 0x8 0x80 0x2 0x0");
  EXPECT_EQ(mutex_owner(unmapped), -1);
#endif
#ifdef SYS_clock_nanosleep
  EXPECT_FALSE(is_mutex_wait(InSyscall(SYS_clock_nanosleep)));
#endif
}
#endif

// ---- classify ----------------------------------------------------------------------------------

TEST(Classify, RunningIsCpu) {
  OsState st;
  st.where = OsState::Where::kRunning;
  st.sched_state = 'R';
  EXPECT_EQ(classify(st), Kind::kCpu);
}

TEST(Classify, UnknownWhereIsUnknown) {
  OsState st;
  EXPECT_EQ(classify(st), Kind::kUnknown);
  st.sched_state = 'R';
  EXPECT_EQ(classify(st), Kind::kUnknown);
}

// time.sleep() is the classic blocker; it must be told apart from I/O and locks.
TEST(Classify, SleepCalls) {
#ifdef SYS_clock_nanosleep
  EXPECT_EQ(classify(InSyscall(SYS_clock_nanosleep)), Kind::kSleep);
#endif
#ifdef SYS_nanosleep
  EXPECT_EQ(classify(InSyscall(SYS_nanosleep)), Kind::kSleep);
#endif
}

// The loop itself waiting in epoll means it is idle again: such samples must be discarded.
TEST(Classify, EpollIsIdle) {
#ifdef SYS_epoll_wait
  EXPECT_EQ(classify(InSyscall(SYS_epoll_wait)), Kind::kIdle);
#endif
#ifdef SYS_epoll_pwait
  EXPECT_EQ(classify(InSyscall(SYS_epoll_pwait)), Kind::kIdle);
#endif
}

TEST(Classify, FutexIsLock) {
#ifdef SYS_futex
  EXPECT_EQ(classify(InSyscall(SYS_futex)), Kind::kLock);
#endif
}

TEST(Classify, BlockingIoCalls) {
#ifdef SYS_read
  EXPECT_EQ(classify(InSyscall(SYS_read)), Kind::kIo);
#endif
#ifdef SYS_recvfrom
  EXPECT_EQ(classify(InSyscall(SYS_recvfrom)), Kind::kIo);
#endif
#ifdef SYS_poll
  EXPECT_EQ(classify(InSyscall(SYS_poll)), Kind::kIo);
#endif
#ifdef SYS_ppoll
  EXPECT_EQ(classify(InSyscall(SYS_ppoll)), Kind::kIo);
#endif
}

// An unlisted syscall is unknown, unless the thread is in uninterruptible sleep ('D'), which is
// almost always disk or network file system I/O.
TEST(Classify, UnknownSyscallUsesSchedState) {
  constexpr long kUnlisted = 100000;  // far beyond any real syscall number
  EXPECT_EQ(classify(InSyscall(kUnlisted, 'S')), Kind::kUnknown);
  EXPECT_EQ(classify(InSyscall(kUnlisted, 0)), Kind::kUnknown);
  EXPECT_EQ(classify(InSyscall(kUnlisted, 'D')), Kind::kIo);
}

// The parsed line and the classifier fit together: x86_64's 230 is clock_nanosleep.
TEST(Classify, ParsedLineEndToEnd) {
#if defined(SYS_clock_nanosleep) && defined(__x86_64__)
  ASSERT_EQ(SYS_clock_nanosleep, 230);
  EXPECT_EQ(classify(parse_syscall_line("230 0x1 0x0 0x7ffd 0x0 0x0 0x0 0x7ffd 0x7f12")),
            Kind::kSleep);
#endif
  EXPECT_EQ(classify(parse_syscall_line("running")), Kind::kCpu);
  EXPECT_EQ(classify(parse_syscall_line("-1 0x7ff 0x7ff")), Kind::kIo);  // a page fault
}

// ---- refine: the reading and the evidence around it ---------------------------------------------
// Each case is what /proc/self/task/<loop tid>/{syscall,stat,schedstat} and the thread's CPU clock
// show, between two samples 10 ms apart, in the situation the test is named after.

OsState Read(const char* syscall_line, char sched, Nanos run_delay = 0, long faults = 0) {
  OsState st = parse_syscall_line(syscall_line);
  st.sched_state = sched;
  st.run_delay = run_delay;
  st.major_faults = faults;
  return st;
}

Evidence Between(Nanos elapsed, Nanos cpu, Nanos run_delay, long faults) {
  Evidence ev;
  ev.elapsed = elapsed;
  ev.cpu = cpu;
  ev.run_delay = run_delay;
  ev.major_faults = faults;
  return ev;
}

constexpr Nanos k10 = 10 * kMs;

#if defined(SYS_futex) && defined(__x86_64__)
// An async endpoint at a bytecode boundary while SQL threads run Python (rows, progress handler):
// futex(&_PyRuntime.ceval.gil.cond, FUTEX_WAIT_BITSET_PRIVATE, ...), no CPU, not runnable.
TEST(Refine, WaitingForTheGilIsGil) {
  const OsState st = Read("202 0x7f5ad174e6f0 0x189 0x0 0x0 0x0 0xffffffff 0x7ffd 0x7f12", 'S');
  Evidence ev = Between(k10, 30'000, 0, 0);
  ev.gil_known = true;
  ev.gil_futex = true;
  EXPECT_EQ(refine(st, ev), Kind::kGil);
  EXPECT_EQ(without_stack(refine(st, ev), ev), Kind::kGil);
  // Twelve threads in a GIL convoy: every waiter wakes each 5 ms to ask for the GIL, and the
  // loop thread waits for a CPU as much as for the GIL. The GIL's holders are still the cause.
  ev.run_delay = 7 * kMs;
  EXPECT_EQ(refine(st, ev), Kind::kGil);
}

// Datasette: a cursor freed on the loop waits in sqlite3_reset for the connection's pthread mutex,
// which lives on a SQL thread's malloc arena: futex(0x7f5ab8003fc8, FUTEX_WAIT, 2). The GIL is
// free (released around sqlite3_reset) or busy with other threads: a lock either way.
TEST(Refine, AnotherThreadsMutexIsALock) {
  const OsState st = Read("202 0x7f5ab8003fc8 0x80 0x2 0x0 0x0 0x0 0x7ffd 0x7f12", 'S');
  Evidence ev = Between(k10, 20'000, 0, 0);
  ev.gil_known = true;
  EXPECT_EQ(refine(st, ev), Kind::kLock);
  EXPECT_EQ(without_stack(refine(st, ev), ev), Kind::kLock);
  // Without a learned GIL address, a late sampler is the only clue: the GIL, most likely.
  ev.gil_known = false;
  EXPECT_EQ(without_stack(refine(st, ev), ev), Kind::kGil);
}

// A threading.Lock held by a thread that sleeps, no other Python thread running: a lock.
TEST(Refine, LockWithNobodyRunningIsALock) {
  const OsState st = Read("202 0x55d0c0a01230 0x80 0x2 0x0 0x0 0x0 0x7ffd 0x7f12", 'S');
  Evidence ev = Between(k10, 0, 0, 0);
  ev.gil_known = true;
  EXPECT_EQ(refine(st, ev), Kind::kLock);
}
#endif

// A cold first page load: templates and modules paged in from disk. /proc catches the thread
// between two faults as "running" or blocked outside a syscall, in state D, with major faults
// counting up and the CPU clock almost still. Not native code, not the CPU: I/O.
TEST(Refine, PageFaultsWithoutCpuAreIo) {
  const Evidence faulting = Between(k10, 200'000, 0, 14);
  EXPECT_EQ(refine(Read("running", 'D', 0, 120), faulting), Kind::kIo);
  EXPECT_EQ(refine(Read("running", 'R', 0, 120), faulting), Kind::kIo);
  EXPECT_EQ(refine(Read("-1 0x7ffd 0x7f12", 'D', 0, 120), faulting), Kind::kIo);
  EXPECT_EQ(refine(Read("-1 0x7ffd 0x7f12", 'S', 0, 120), Evidence{}), Kind::kIo);
  // "running" with hardly any CPU, but neither D nor a fault: nothing says it was the disk (it
  // may have waited for the GIL in many short turns), so it is not called I/O.
  EXPECT_EQ(refine(Read("running", 'R'), Between(k10, 100'000, 0, 0)), Kind::kCpu);
  // The sampler could not get the GIL either (the loop holds it while it faults): I/O still.
  EXPECT_EQ(without_stack(refine(Read("running", 'D'), faulting), faulting), Kind::kIo);
}

// Real CPU work: "running", the CPU clock moves with the wall clock.
TEST(Refine, RunningOnTheCpuIsCpuAndWithoutStackNative) {
  const Evidence busy = Between(k10, 9'800'000, 100'000, 0);
  EXPECT_EQ(refine(Read("running", 'R'), busy), Kind::kCpu);
  EXPECT_EQ(without_stack(Kind::kCpu, busy), Kind::kNative);
  // A regex holding the GIL that touches a few cold pages on the way is still native code.
  EXPECT_EQ(without_stack(refine(Read("running", 'R', 0, 3), Between(k10, 9'000'000, 0, 3)),
                          Between(k10, 9'000'000, 0, 3)),
            Kind::kNative);
}

// "running" without CPU and no sign of the disk: nothing says I/O; and native code holding the
// GIL would have used the CPU, so when the sampler is late it is not called native either.
TEST(Refine, RunningWithoutCpuOrEvidenceIsNotNative) {
  const Evidence no_delay_known = Between(k10, 0, -1, -1);
  EXPECT_EQ(refine(Read("running", 'R'), no_delay_known), Kind::kCpu);
  EXPECT_EQ(without_stack(Kind::kCpu, no_delay_known), Kind::kUnknown);
  EXPECT_EQ(without_stack(Kind::kCpu, Between(k10, 100'000, 0, 0)), Kind::kUnknown);
  // The first sample of a stall has no previous reading at all: as before, CPU.
  EXPECT_EQ(without_stack(refine(Read("running", 'R'), Evidence{}), Evidence{}), Kind::kNative);
}

// The sampler could not get the GIL from a running loop thread. What the thread did with the
// CPU while the sampler waited (20 ms) tells native code from Python on a contended GIL.
TEST(WithoutStack, TheWaitItselfTellsNativeCodeFromAContendedGil) {
  const Evidence before = Between(k10, 9'500'000, 0, 0);
  // A regex holding the GIL: the CPU busy the whole time.
  EXPECT_EQ(without_stack(Kind::kCpu, before, Between(20 * kMs, 19'600'000, 0, 0)), Kind::kNative);
  // Rendering in Python while SQL threads' progress handlers take the GIL every few
  // microseconds: the loop ran for a fifth of the wait and let go of the GIL the rest.
  EXPECT_EQ(without_stack(Kind::kCpu, before, Between(20 * kMs, 4'000'000, 1'000'000, 0)),
            Kind::kGil);
  // Waiting for a CPU most of the wait: starved.
  EXPECT_EQ(without_stack(Kind::kCpu, before, Between(20 * kMs, 3'000'000, 15'000'000, 0)),
            Kind::kStarved);
  // A lock wait is judged by its futex, not by the wait.
  Evidence known = before;
  known.gil_known = true;
  EXPECT_EQ(without_stack(Kind::kLock, known, Between(20 * kMs, 0, 0, 0)), Kind::kLock);
}

// Runnable but waiting for a CPU most of the time: starved, whatever else it shows.
TEST(Refine, RunDelayOverHalfIsStarved) {
  EXPECT_EQ(refine(Read("running", 'R'), Between(k10, 1'000'000, 8'000'000, 0)), Kind::kStarved);
  EXPECT_EQ(refine(Read("running", 'R'), Between(k10, 1'000'000, 4'000'000, 0)), Kind::kCpu);
}

TEST(Refine, GcAndIdle) {
  Evidence gc;
  gc.in_gc = true;
  EXPECT_EQ(refine(Read("running", 'R'), gc), Kind::kGc);
#ifdef SYS_epoll_wait
  EXPECT_EQ(refine(InSyscall(SYS_epoll_wait), gc), Kind::kIdle);
#endif
}

// Another thread inside a collection holds the GIL throughout: a GIL wait meanwhile is the
// collector's, read from the GIL's futex or, before that futex is known, from any futex.
// Any other reading keeps its kind: the loop is not waiting for the GIL then.
TEST(Refine, AGilWaitWhileAnotherThreadCollectsIsGc) {
  Evidence ev;
  ev.gc_thread = 5151;
#ifdef SYS_futex
  OsState futex = InSyscall(SYS_futex);
  futex.arg0 = 0x1000;
  ev.gil_known = true;
  ev.gil_futex = true;
  EXPECT_EQ(refine(futex, ev), Kind::kGc);
  ev.gil_futex = false;
  EXPECT_EQ(refine(futex, ev), Kind::kLock);
  EXPECT_EQ(without_stack(Kind::kLock, ev), Kind::kLock);  // known to be another futex
  ev.gil_known = false;
  EXPECT_EQ(without_stack(Kind::kLock, ev), Kind::kGc);
  // With a stack, too: the address not learned yet (a starved sampler never saw itself wait).
  EXPECT_EQ(refine(futex, ev), Kind::kGc);
  ev.sampler_has_gil = true;  // then it is our own sampler that holds it
  EXPECT_EQ(without_stack(Kind::kLock, ev), Kind::kStarved);
  EXPECT_EQ(refine(futex, ev), Kind::kStarved);
  ev.sampler_has_gil = false;
  ev.gc_thread = 0;  // nobody collecting: a futex wait of unknown kind is a lock
  EXPECT_EQ(refine(futex, ev), Kind::kLock);
  ev.gc_thread = 5151;
#endif
  EXPECT_EQ(refine(Read("running", 'R'), ev), Kind::kCpu);
}

// A stopped thread (a debugger attached) is blocked outside any syscall too, and is no I/O.
TEST(Classify, StoppedThreadIsUnknown) {
  EXPECT_EQ(classify(Read("-1 0x7ffd 0x7f12", 'T')), Kind::kUnknown);
  EXPECT_EQ(classify(Read("-1 0x7ffd 0x7f12", 't')), Kind::kUnknown);
}

TEST(KindName, Names) {
  EXPECT_STREQ(kind_name(Kind::kSleep), "sleep");
  EXPECT_STREQ(kind_name(Kind::kIo), "io");
  EXPECT_STREQ(kind_name(Kind::kCpu), "cpu");
  EXPECT_STREQ(kind_name(Kind::kLock), "lock");
  EXPECT_STREQ(kind_name(Kind::kGil), "gil");
  EXPECT_STREQ(kind_name(Kind::kNative), "native");
  EXPECT_STREQ(kind_name(Kind::kGc), "gc");
  EXPECT_STREQ(kind_name(Kind::kStarved), "starved");
  EXPECT_STREQ(kind_name(Kind::kIdle), "idle");
  EXPECT_STREQ(kind_name(Kind::kUnknown), "unknown");
}

// ---- majority_kind -----------------------------------------------------------------------------

TEST(MajorityKind, MostFrequentWins) {
  EXPECT_EQ(majority_kind({Kind::kCpu, Kind::kSleep, Kind::kSleep, Kind::kCpu, Kind::kSleep}),
            Kind::kSleep);
}

// Ties go to the kind seen first in the run (the blocker found first), whatever the enum order.
TEST(MajorityKind, TieGoesToEarlierKind) {
  EXPECT_EQ(majority_kind({Kind::kLock, Kind::kSleep, Kind::kSleep, Kind::kLock}), Kind::kLock);
  EXPECT_EQ(majority_kind({Kind::kSleep, Kind::kLock, Kind::kLock, Kind::kSleep}), Kind::kSleep);
  EXPECT_EQ(majority_kind({Kind::kCpu, Kind::kIo}), Kind::kCpu);
  EXPECT_EQ(majority_kind({Kind::kIo, Kind::kCpu}), Kind::kIo);
}

// Unknown and idle readings carry no information about the blocker and must never outvote one.
TEST(MajorityKind, IgnoresUnknownAndIdle) {
  EXPECT_EQ(majority_kind({Kind::kUnknown, Kind::kUnknown, Kind::kUnknown, Kind::kIo}), Kind::kIo);
  EXPECT_EQ(majority_kind({Kind::kIdle, Kind::kIdle, Kind::kIdle, Kind::kLock}), Kind::kLock);
  EXPECT_EQ(majority_kind({Kind::kUnknown, Kind::kIdle, Kind::kUnknown}), Kind::kUnknown);
  EXPECT_EQ(majority_kind({Kind::kIdle}), Kind::kUnknown);
  EXPECT_EQ(majority_kind({}), Kind::kUnknown);
}

}  // namespace
}  // namespace loopguard
