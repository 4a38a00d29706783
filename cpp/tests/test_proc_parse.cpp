// The parsers of what the kernel shows of a thread: its syscall line, its stat line (scheduler
// state, major faults) and its schedstat (run delay), on real shapes and on garbage.
#include <gtest/gtest.h>

#include "loopguard/proc.h"

namespace loopguard {
namespace {

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
  // The next two as well: for futex the operation and the value expected.
  const OsState futex = parse_syscall_line("202 0x7f12345678 0x80 0x2 0x0 0x0 0x0 0x7ffd 0x7f12");
  EXPECT_EQ(futex.arg1, 0x80u);
  EXPECT_EQ(futex.arg2, 2u);
  EXPECT_EQ(parse_syscall_line("202 0x7f12345678").arg1, 0u);  // truncated: zero, not garbage
}

// "-1 sp pc" means blocked in the kernel outside a syscall (a page fault): no syscall number.
TEST(ParseSyscallLine, MinusOneIsInTheKernel) {
  const OsState st = parse_syscall_line("-1 0x7ff 0x7ff");
  EXPECT_EQ(st.where, OsState::Where::kKernel);
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

// The major page fault count is field 12 of stat, the tenth after the comm.
TEST(ParseStatMajorFaults, TenthFieldAfterTheComm) {
  const char* line =
      "4242 (uvicorn (w)) D 1 4242 4242 0 -1 4194560 81234 0 731 0 95 12 0 0 20 0 3 0 1234";
  EXPECT_EQ(parse_stat_major_faults(line), 731);
  EXPECT_EQ(parse_stat_major_faults("1 (a) S 1 1 1 0 -1 0 5 0 0 0"), 0);
  EXPECT_EQ(parse_stat_major_faults(nullptr), -1);
  EXPECT_EQ(parse_stat_major_faults("1 (a) S 1 1"), -1);                      // truncated
  EXPECT_EQ(parse_stat_major_faults("1 python S 1 1 1 0 -1 0 5 0 7 0"), -1);  // no ')'
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

}  // namespace
}  // namespace loopguard
