// The kinds only the OS counters tell: a garbage collection (the loop's, or another thread's while
// the loop waits for the GIL) and starvation (a loop thread ready to run that the OS did not run).
#include <gtest/gtest.h>
#include <sys/syscall.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "engine_test.h"
#include "loopguard/engine.h"

namespace loopguard {
namespace {

// Samples taken while the loop thread is inside a garbage collection are kGc, whatever the OS
// says; after gc_end() the OS kind is back.
TEST_F(EngineTest, GcKindWhileCollecting) {
  HangPipe pipe;
  ASSERT_TRUE(pipe.ok());
  WatchdogConfig config;
  config.hang_threshold = 60 * kMs;
  config.hang_fd = pipe.write_fd();
  Make(config);
  py_->token = engine_->begin_request("GET /gc");
  engine_->gc_begin();
  Stall(60 * kMs);
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGc);
  pipe.Read();
  engine_->gc_end();
  Advance(1 * kMs);
  Stall(55 * kMs);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kCpu);

  // Within one stall: the hang lines show the kind of the latest sample.
  Advance(1 * kMs);
  engine_->gc_begin();
  const Nanos t0 = Now();
  LoopBusy();
  Nanos next = Step();
  while (Now() < t0 + 60 * kMs) {
    ASSERT_GT(next, Now());
    clock_.set(next);
    next = Step();
  }
  const std::string during = pipe.Read();
  EXPECT_NE(during.find("kind=gc;"), std::string::npos) << during;
  engine_->gc_end();
  while (Now() < t0 + 120 * kMs) {
    ASSERT_GT(next, Now());
    clock_.set(next);
    next = Step();
  }
  const std::string after = pipe.Read();
  EXPECT_NE(after.find("blocked for 0.12 s"), std::string::npos) << after;
  EXPECT_NE(after.find("kind=cpu;"), std::string::npos) << after;
}

// Runnable but not running for more than half the time since the previous sample: starved (CPU
// throttling, an overloaded host). The first sample of a stall has nothing to compare with.
TEST_F(EngineTest, StarvedWhenRunDelayGrowsFasterThanHalfTheTime) {
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  auto run_delay = [this](Nanos v) { os_->state.run_delay = v; };

  // Samples at +50 (first: cpu), +52 (1.5 of 2 ms waiting), +62 (6 of 10 ms): starved.
  run_delay(100 * kMs);
  LoopBusy();
  Step();
  Advance(50 * kMs);
  run_delay(140 * kMs);  // before detection: no reading in this stall to compare with
  Step();
  Advance(2 * kMs);
  run_delay(141'500'000);
  Step();
  Advance(10 * kMs);
  run_delay(147'500'000);
  Step();
  Advance(3 * kMs);
  LoopWaits();
  Step();
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kStarved);
  EXPECT_EQ(events[0].samples, 3u);

  // A stall with a single sample, after a jump far beyond the time elapsed since the last
  // sample of the previous stall: the first sample of a stall is never starved.
  Advance(5 * kMs);
  LoopBusy();
  Step();
  Advance(50 * kMs);
  run_delay(1'000 * kMs);
  Step();
  Advance(1 * kMs);
  LoopWaits();
  Step();
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].samples, 1u);
  EXPECT_EQ(events[0].kind, Kind::kCpu);

  // Exactly half the time waiting is not more than half: not starved.
  Advance(5 * kMs);
  LoopBusy();
  Step();
  Advance(50 * kMs);
  run_delay(2'000 * kMs);
  Step();
  Advance(2 * kMs);
  run_delay(2'001 * kMs);
  Step();
  Advance(10 * kMs);
  run_delay(2'006 * kMs);
  Step();
  Advance(3 * kMs);
  LoopWaits();
  Step();
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].samples, 3u);
  EXPECT_EQ(events[0].kind, Kind::kCpu);
}

}  // namespace
}  // namespace loopguard
