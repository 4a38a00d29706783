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
#endif

// ---- /proc/self/task/<tid>/syscall -------------------------------------------------------------

// A thread executing user code reports "running"; that must read as kRunning, not as a syscall.
TEST(ParseSyscallLine, Running) {
  EXPECT_EQ(parse_syscall_line("running").where, OsState::Where::kRunning);
  EXPECT_EQ(parse_syscall_line("running\n").where, OsState::Where::kRunning);
  EXPECT_EQ(parse_syscall_line("running").syscall, -1);
}

// A blocked thread reports the syscall number followed by its arguments, sp and pc.
TEST(ParseSyscallLine, SyscallNumberAndArguments) {
  const OsState st = parse_syscall_line("230 0x1 0x0 0x7ffd3c1e9a40 0x0 0x0 0x0 0x7ffd 0x7f12\n");
  EXPECT_EQ(st.where, OsState::Where::kSyscall);
  EXPECT_EQ(st.syscall, 230);
  EXPECT_EQ(st.sched_state, 0);  // the stat file supplies that, not this one
}

// The first argument is kept (hex): for futex it is the address waited on, which tells the GIL's
// futex from any other lock.
TEST(ParseSyscallLine, FirstArgumentIsHex) {
  const OsState st = parse_syscall_line("202 0x7f12345678 0x80 0x0 0x0 0x0 0x0 0x7ffd 0x7f12\n");
  EXPECT_EQ(st.where, OsState::Where::kSyscall);
  EXPECT_EQ(st.syscall, 202);
  EXPECT_EQ(st.arg0, 0x7f12345678u);
  EXPECT_EQ(parse_syscall_line("230 0x1 0x0 0x7ffd3c1e9a40").arg0, 1u);
  EXPECT_EQ(parse_syscall_line("7 0xffffffffffffffff 0x1").arg0, 0xffffffffffffffffu);
  EXPECT_EQ(parse_syscall_line("running").arg0, 0u);
  EXPECT_EQ(parse_syscall_line("-1 0x7ff 0x7ff").arg0, 0u);
}

// "-1 sp pc" means blocked outside a syscall (e.g. a page fault): not a syscall number to map.
TEST(ParseSyscallLine, MinusOneIsUnknown) {
  const OsState st = parse_syscall_line("-1 0x7ff 0x7ff");
  EXPECT_EQ(st.where, OsState::Where::kUnknown);
  EXPECT_EQ(st.syscall, -1);
}

// Unreadable or garbled files must degrade to "unknown", never to a bogus syscall 0 (= read).
TEST(ParseSyscallLine, EmptyNullAndGarbage) {
  EXPECT_EQ(parse_syscall_line("").where, OsState::Where::kUnknown);
  EXPECT_EQ(parse_syscall_line(nullptr).where, OsState::Where::kUnknown);
  EXPECT_EQ(parse_syscall_line("garbage").where, OsState::Where::kUnknown);
  EXPECT_EQ(parse_syscall_line("garbage").syscall, -1);
}

// ---- /proc/self/task/<tid>/stat ----------------------------------------------------------------

TEST(ParseStatState, Plain) {
  EXPECT_EQ(parse_stat_state("1234 (python3) S 1 1234 1234 0 -1"), 'S');
  EXPECT_EQ(parse_stat_state("1234 (python3) D 1 1234"), 'D');
}

// comm is chosen by the program (thread names!) and may hold spaces and parentheses, so the state
// letter is the one after the *last* ')'.
TEST(ParseStatState, CommWithSpacesAndParens) {
  EXPECT_EQ(parse_stat_state("77 (uvicorn worker (1)) R 1 2 3"), 'R');
  // A comm that itself looks like ") S " must not fool the parser into reading 'S'.
  EXPECT_EQ(parse_stat_state("77 (a) S x) D 1 2 3"), 'D');
}

TEST(ParseStatState, Malformed) {
  EXPECT_EQ(parse_stat_state(nullptr), 0);
  EXPECT_EQ(parse_stat_state(""), 0);
  EXPECT_EQ(parse_stat_state("1234 python3 S 1"), 0);  // no ')'
  EXPECT_EQ(parse_stat_state("1234 (python3)"), 0);    // truncated after comm
  EXPECT_EQ(parse_stat_state("1234 (python3) "), 0);
}

// ---- /proc/self/task/<tid>/schedstat -----------------------------------------------------------

// "<time on cpu> <time runnable but waiting> <timeslices>": the run delay is the second field.
TEST(ParseSchedstat, RunDelayIsTheSecondField) {
  EXPECT_EQ(parse_schedstat_run_delay("123 456 7\n"), 456);
  EXPECT_EQ(parse_schedstat_run_delay("0 0 0\n"), 0);
  EXPECT_EQ(parse_schedstat_run_delay("98765432100 12345678901 4242"), 12'345'678'901);
}

TEST(ParseSchedstat, MalformedIsMinusOne) {
  EXPECT_EQ(parse_schedstat_run_delay(nullptr), -1);
  EXPECT_EQ(parse_schedstat_run_delay(""), -1);
  EXPECT_EQ(parse_schedstat_run_delay("\n"), -1);
  EXPECT_EQ(parse_schedstat_run_delay("123"), -1);    // no second field
  EXPECT_EQ(parse_schedstat_run_delay("123\n"), -1);  // the same, with the newline
  EXPECT_EQ(parse_schedstat_run_delay("abc 456 7"), -1);
  EXPECT_EQ(parse_schedstat_run_delay("123 abc 7"), -1);
}

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
  EXPECT_EQ(classify(parse_syscall_line("-1 0x7ff 0x7ff")), Kind::kUnknown);
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
