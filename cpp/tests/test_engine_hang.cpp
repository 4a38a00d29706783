// Hang reports: written to hang_fd while a stall lasts, with the request, kind and culprit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "engine_test.h"
#include "loopguard/engine.h"

namespace loopguard {
namespace {

// ---- Hang reports -----------------------------------------------------------------------------

// Past hang_threshold a stall is reported at once, from the watchdog, to hang_fd, naming the
// request by its label and the culprit line; then again only at doubling intervals. The event
// says it was a hang.
TEST_F(EngineTest, HangReportedAtOnceThenAtDoublingIntervals) {
  HangPipe pipe;
  ASSERT_TRUE(pipe.ok());
  WatchdogConfig config;
  config.hang_threshold = 200 * kMs;
  config.hang_fd = pipe.write_fd();
  Make(config);
  const std::uint64_t token = engine_->begin_request("GET /x request_id=abc");
  py_->token = token;
  const Nanos t0 = Now();
  LoopBusy();
  Nanos next = Step();
  std::vector<std::pair<Nanos, std::string>> lines;
  while (Now() < t0 + 1700 * kMs) {
    ASSERT_GT(next, Now());
    clock_.set(std::min(next, t0 + 1700 * kMs));
    next = Step();
    const std::string got = pipe.Read();
    if (!got.empty()) lines.emplace_back(Now() - t0, got);
    if (Now() == t0 + 200 * kMs) {
      EXPECT_EQ(engine_->stats().hangs, 1u);  // counted as soon as it is reported
      EXPECT_TRUE(engine_->drain().empty());  // still going on: no event yet
    }
  }
  const std::string tail =
      " s and still blocked during GET /x request_id=abc; kind=cpu; culprit=app/routes.py:42 in "
      "handler\n";
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(lines[0].first, 200 * kMs);
  EXPECT_EQ(lines[0].second, "loopguard: event loop blocked for 0.20" + tail);
  EXPECT_EQ(lines[1].first, 400 * kMs);
  EXPECT_EQ(lines[1].second, "loopguard: event loop blocked for 0.40" + tail);
  EXPECT_EQ(lines[2].first, 800 * kMs);
  EXPECT_EQ(lines[2].second, "loopguard: event loop blocked for 0.80" + tail);
  EXPECT_EQ(lines[3].first, 1600 * kMs);
  EXPECT_EQ(lines[3].second, "loopguard: event loop blocked for 1.60" + tail);

  LoopWaits();
  Step();
  EXPECT_EQ(pipe.Read(), "");  // the end of a hang is not written
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, token);
  EXPECT_EQ(events[0].duration, 1700 * kMs);
  EXPECT_TRUE(events[0].hang);
  EXPECT_EQ(engine_->stats().hangs, 1u);

  // A stall shorter than hang_threshold is no hang: nothing written, hang=false.
  Advance(1 * kMs);
  Stall(150 * kMs);
  EXPECT_EQ(pipe.Read(), "");
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_FALSE(events[0].hang);
  EXPECT_EQ(engine_->stats().hangs, 1u);
  EXPECT_EQ(engine_->stats().stalls, 2u);
}

// The line goes straight to a file descriptor: control characters in the request label and the
// frame names become '?', so a request path cannot forge log lines or terminal escapes.
TEST_F(EngineTest, HangReportReplacesControlCharacters) {
  HangPipe pipe;
  ASSERT_TRUE(pipe.ok());
  WatchdogConfig config;
  config.hang_threshold = 60 * kMs;
  config.hang_fd = pipe.write_fd();
  Make(config);
  py_->token = engine_->begin_request("GET /x\n\x1b[31m\x7f request_id=abc\r");
  py_->frames = {{"app/ro\tutes.py", "hand\x01ler", 42}};
  py_->culprit = 0;
  const Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(50 * kMs);
  EXPECT_EQ(Step(), t0 + 52 * kMs);
  Advance(2 * kMs);
  EXPECT_EQ(Step(), t0 + 60 * kMs);  // woken for the hang report, before the next sample
  EXPECT_EQ(pipe.Read(), "");
  Advance(8 * kMs);
  EXPECT_EQ(Step(), t0 + 62 * kMs);
  EXPECT_EQ(pipe.Read(),
            "loopguard: event loop blocked for 0.06 s and still blocked during GET /x??[31m? "
            "request_id=abc?; kind=cpu; culprit=app/ro?utes.py:42 in hand?ler\n");
  LoopWaits();
  Step();
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_TRUE(events[0].hang);
  // Only the hang line is escaped; the event keeps the names as the sampler gave them.
  EXPECT_EQ(events[0].stack[0].filename, "app/ro\tutes.py");
}

// Without a stack the line still says what is known: the OS kind, and the requests in flight that
// the loop may be running (the Context is not read without the GIL).
TEST_F(EngineTest, HangReportWithoutAStackNamesWhatIsInFlight) {
  HangPipe pipe;
  ASSERT_TRUE(pipe.ok());
  WatchdogConfig config;
  config.hang_threshold = 60 * kMs;
  config.hang_fd = pipe.write_fd();
  Make(config);
  engine_->begin_request("GET /other");  // in flight, but not what the loop runs
  py_->succeed = false;                  // native code holds the GIL
  Stall(61 * kMs);
  EXPECT_EQ(pipe.Read(),
            "loopguard: event loop blocked for 0.06 s and still blocked (its request unknown "
            "without the GIL; the one in flight: GET /other); kind=native; "
            "culprit=<stack unavailable>\n");
  EXPECT_EQ(engine_->stats().hangs, 1u);

  // Two in flight: only their number. None: no active request, GIL or not.
  engine_->begin_request("GET /another");
  Advance(1 * kMs);
  Stall(61 * kMs);
  EXPECT_EQ(pipe.Read(),
            "loopguard: event loop blocked for 0.06 s and still blocked (its request unknown "
            "without the GIL; 2 in flight); kind=native; culprit=<stack unavailable>\n");
}

// Native code holds the GIL: no stack through it, so the loop thread's frames are read without it
// (nothing can move them), and the line names the culprit with a short stack while the hang
// lasts. The first report also lists the other threads, every one frozen too; later reports
// read the loop's stack again, without the list.
TEST_F(EngineTest, HangReportReadsTheStackWithoutTheGil) {
  HangPipe pipe;
  ASSERT_TRUE(pipe.ok());
  WatchdogConfig config;
  config.hang_threshold = 60 * kMs;
  config.hang_fd = pipe.write_fd();
  Make(config);
  os_->loop_tid = 4242;
  py_->succeed = false;
  py_->unlocked_frames = HandlerStack("hold", 9);
  py_->unlocked_culprit = 1;
  ThreadStack worker;
  worker.thread = 5151;
  worker.frames = {{"app/jobs.py", "crunch", 30}, {"/usr/lib/python3/threading.py", "run", 1}};
  worker.culprit = 0;
  py_->others = {worker};
  Stall(61 * kMs);
  EXPECT_EQ(pipe.Read(),
            "loopguard: event loop blocked for 0.06 s and still blocked (no active request); "
            "kind=native; culprit=app/routes.py:9 in hold (read without the GIL); "
            "stack=/usr/lib/python3/time.py:7 in sleep_wrapper <- app/routes.py:9 in hold <- "
            "/usr/lib/python3/asyncio/events.py:88 in _run\n"
            "loopguard: Python threads at the first report of this hang:\n"
            "  thread 4242 (the event loop), innermost frame first:\n"
            "    /usr/lib/python3/time.py:7 in sleep_wrapper\n"
            "    app/routes.py:9 in hold\n"
            "    /usr/lib/python3/asyncio/events.py:88 in _run\n"
            "  thread 5151, innermost frame first:\n"
            "    app/jobs.py:30 in crunch\n"
            "    /usr/lib/python3/threading.py:1 in run\n");
  EXPECT_EQ(py_->unlocked_calls, 1);
  EXPECT_TRUE(py_->unlocked_others_asked);
  EXPECT_EQ(py_->all_calls, 0);  // the GIL was not to be had: no capture through it
  EXPECT_EQ(engine_->stats().unlocked_stacks, 1u);
  // The event itself keeps to what the GIL gave (nothing): the read without it names the line
  // while the hang lasts, and the late stack once the GIL is free.
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_TRUE(events[0].stack_missing);
}

// hang_threshold = 0 turns hang reports off: nothing written, not even for a very long stall,
// no hang counted, and the watchdog wakes only for its samples.
TEST_F(EngineTest, HangThresholdZeroWritesNothing) {
  HangPipe pipe;
  ASSERT_TRUE(pipe.ok());
  WatchdogConfig config;
  config.hang_threshold = 0;
  config.hang_fd = pipe.write_fd();
  Make(config);
  py_->token = engine_->begin_request("GET /x request_id=abc");
  const Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Nanos next = Step();
  int steps = 0;
  while (next < t0 + 3000 * kMs) {
    clock_.set(next);
    const Nanos following = Step();
    ASSERT_GT(following, next);
    next = following;
    ++steps;
  }
  EXPECT_EQ(static_cast<std::uint64_t>(steps + 1), engine_->stats().samples);  // no extra wakeups
  const Nanos end = Now();
  EXPECT_GT(end - t0, 2900 * kMs);
  LoopWaits();
  Step();
  EXPECT_EQ(pipe.Read(), "");
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].duration, end - t0);
  EXPECT_FALSE(events[0].hang);
  EXPECT_EQ(engine_->stats().hangs, 0u);
}

// ---- The label a hang report names the request by ---------------------------------------------

// Put together from the request's parts as the client sent them: whatever they hold, no control
// character reaches the line, and no part is longer than its bound.
TEST(RequestLabel, NamesTheRequestWithTheControlCharactersShownAsQuestionMarks) {
  EXPECT_EQ(request_label("GET", "/x", "abc"), "GET /x request_id=abc");
  EXPECT_EQ(request_label("", "", "lifespan.startup"),
            "lifespan.startup request_id=lifespan.startup");
  // CR, LF, ESC, DEL, and the C1 control CSI (U+009B) encoded in UTF-8; U+00E9 is kept.
  EXPECT_EQ(request_label("GET", "/x\r\n\x1b[31m\x7f\xc2\x9b\xc3\xa9", "a\nb"),
            "GET /x???[31m??\xc3\xa9 request_id=a?b");
}

TEST(RequestLabel, LongPartsAreCutOnACharacterBoundary) {
  const std::string path = "/" + std::string(kLabelPathBytes - 2, 'p') + "\xc3\xa9" + "tail";
  const std::string label = request_label("GET", path, std::string(500, 'i'));
  // The two-byte character would cross the bound: the path stops before it.
  EXPECT_EQ(label, "GET /" + std::string(kLabelPathBytes - 2, 'p') +
                       "... request_id=" + std::string(kLabelIdBytes, 'i') + "...");
}

}  // namespace
}  // namespace loopguard
