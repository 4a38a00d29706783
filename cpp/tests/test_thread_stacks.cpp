#include <gtest/gtest.h>

#include "loopguard/thread_stacks.h"

namespace loopguard {
namespace {

ThreadStack Thread(long id, std::vector<FrameInfo> frames, int culprit, bool library) {
  ThreadStack t;
  t.thread = id;
  t.frames = std::move(frames);
  t.culprit = culprit;
  t.culprit_is_library = library;
  return t;
}

const FrameInfo kIdle{"/venv/site-packages/anyio/_backends/_asyncio.py", "WorkerThread.run", 9};
const FrameInfo kUser{"app/jobs.py", "hold_lock", 30};

// The one thread running the user's code is the holder, whatever idle workers sit beside it.
TEST(ChooseHolder, TheOnlyThreadRunningApplicationCode) {
  const ThreadStack got = choose_holder(
      {Thread(1, {kIdle}, 0, true), Thread(2, {kUser}, 0, false), Thread(3, {kIdle}, 0, true)});
  EXPECT_EQ(got.thread, 2);
  EXPECT_EQ(got.frames, std::vector<FrameInfo>{kUser});
}

// No application code anywhere: a lone Python thread is the holder (a library's worker, such as
// a SQL thread); two such threads are a guess, so nobody is named.
TEST(ChooseHolder, ALoneLibraryThreadButNeverAGuess) {
  EXPECT_EQ(choose_holder({Thread(4, {kIdle}, 0, true)}).thread, 4);
  EXPECT_EQ(choose_holder({Thread(4, {kIdle}, 0, true), Thread(5, {kIdle}, 0, true)}).thread, 0);
}

// Two threads running the user's code: either could hold it, so nobody is named. Threads with no
// Python frame (the samplers) and an empty list name nobody either.
TEST(ChooseHolder, AmbiguousOrEmptyNamesNobody) {
  EXPECT_EQ(choose_holder({Thread(2, {kUser}, 0, false), Thread(3, {kUser}, 0, false)}).thread, 0);
  EXPECT_EQ(choose_holder({Thread(6, {}, -1, false)}).thread, 0);
  EXPECT_EQ(choose_holder({}).thread, 0);
  EXPECT_EQ(choose_holder({Thread(6, {}, -1, false), Thread(2, {kUser}, 0, false)}).thread, 2);
}

TEST(ShortStack, InnermostFirstAndBounded) {
  const std::vector<FrameInfo> frames{kUser, {"app/main.py", "route", 4}, kIdle};
  EXPECT_EQ(short_stack(frames, 5),
            "app/jobs.py:30 in hold_lock <- app/main.py:4 in route <- "
            "/venv/site-packages/anyio/_backends/_asyncio.py:9 in WorkerThread.run");
  EXPECT_EQ(short_stack(frames, 1), "app/jobs.py:30 in hold_lock <- ...");
  EXPECT_EQ(short_stack({}, 3), "");
}

// Written straight to a file descriptor: no control character survives, long names are cut.
TEST(ThreadDump, PrintableAndBounded) {
  const FrameInfo hostile{"app/x\n.py", "f\x1b[2J", 3};
  const std::string got =
      thread_dump({Thread(10, {hostile, kUser}, 0, false), Thread(11, {}, -1, false)}, 10, 1);
  EXPECT_EQ(got,
            "  thread 10 (the event loop), innermost frame first:\n"
            "    app/x?.py:3 in f?[2J\n"
            "    ...\n"
            "  thread 11, innermost frame first:\n"
            "    <no Python frame>\n");
  std::string out;
  append_printable(out, std::string(10, 'a'), 4);
  EXPECT_EQ(out, "aaaa...");
}

}  // namespace
}  // namespace loopguard
