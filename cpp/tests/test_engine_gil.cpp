// Stalls the sampler cannot simply read under the GIL: native code holding it, and late stacks.
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

// ---- Native code, the GIL, late stacks --------------------------------------------------------

// The OS shows the loop thread running, yet the sampler cannot get the GIL: the loop thread holds
// it itself, in native code.
TEST_F(EngineTest, SamplerFailingWhileRunningIsNative) {
  engine_->begin_request();
  py_->succeed = false;
  Stall(65 * kMs);
  EXPECT_EQ(py_->calls, 3);
  EXPECT_EQ(py_->thread_calls, 0);  // not a GIL wait: no other thread is looked at
  EXPECT_EQ(engine_->stats().stack_timeouts, 3u);
  EXPECT_EQ(engine_->stats().late_stacks, 0u);
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kNative);
  EXPECT_TRUE(events[0].stack_missing);
  EXPECT_TRUE(events[0].stack.empty());
  EXPECT_EQ(events[0].culprit, -1);
}

// The same, but the sampler's wait shows what the loop thread did meanwhile: a thread that kept
// the CPU busy holds the GIL in native code; one that ran a fifth of the time kept letting go of
// the GIL to other threads (Python on a contended GIL), so the sampler lost the race: kGil.
TEST_F(EngineTest, WhatTheLoopDidDuringTheSamplersWaitDecidesNativeOrGil) {
  os_->state.where = OsState::Where::kRunning;
  os_->state.run_delay = 0;
  os_->cpu = 0;
  py_->succeed = false;
  Nanos share = 95;  // percent of the wait the loop thread spent on the CPU
  py_->during = [&] {
    Advance(20 * kMs);
    os_->cpu += 20 * kMs * share / 100;
  };
  // The loop is on the CPU as much before the sample as during the sampler's wait: a native
  // call burns it all along. (A stall whose CPU clock stood still before its one sample would
  // be a thread starved on a busy host, which is no event at all.)
  const auto stall = [&] {
    LoopBusy();
    Step();  // busy, not stalled yet: the CPU reading before the stall
    Advance(50 * kMs);
    os_->cpu += 50 * kMs * share / 100;
    Step();  // stalled: the one sample, whose sampler waits 20 ms for the GIL in vain
    Advance(1 * kMs);
    LoopWaits();
    Step();
  };
  engine_->begin_request();
  stall();
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kNative);

  share = 20;
  Advance(1 * kMs);
  stall();
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
}

// The sampler got the GIL after all, once the native call let go of it: that late sample names
// the samples that went without a stack.
TEST_F(EngineTest, LateSampleFillsMissingStacks) {
  const std::uint64_t token = engine_->begin_request();
  py_->succeed = false;
  const Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Step();
  Advance(2 * kMs);
  Step();
  EXPECT_EQ(engine_->stats().stack_timeouts, 2u);
  Advance(6 * kMs);
  Sample late;
  late.t = t0 + 57 * kMs;  // within the stall, after both samples
  late.token = token;
  late.frames = HandlerStack("native_call", 77);
  late.culprit = 1;
  late.has_stack = true;
  py_->late = late;
  Advance(2 * kMs);
  LoopWaits();
  Step();
  EXPECT_EQ(py_->late_taken, 1);
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, token);
  EXPECT_EQ(events[0].kind, Kind::kNative);
  EXPECT_FALSE(events[0].stack_missing);
  EXPECT_EQ(events[0].stack, HandlerStack("native_call", 77));
  EXPECT_EQ(events[0].culprit, 1);
  EXPECT_EQ(events[0].duration, 60 * kMs);
  EXPECT_EQ(engine_->stats().late_stacks, 1u);
  EXPECT_EQ(engine_->request_counters(token).count, 1u);
  EXPECT_EQ(engine_->request_counters(token).total, 60 * kMs);
}

// A late sample taken before this stall began belongs to something earlier: ignored.
TEST_F(EngineTest, LateSampleFromBeforeTheStallIsIgnored) {
  const std::uint64_t token = engine_->begin_request();
  py_->succeed = false;
  const Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Step();
  Sample late;
  late.t = t0 - 5 * kMs;
  late.token = token;
  late.frames = HandlerStack("earlier", 3);
  late.culprit = 1;
  late.has_stack = true;
  py_->late = late;
  Advance(2 * kMs);
  Step();
  Advance(3 * kMs);
  LoopWaits();
  Step();
  EXPECT_EQ(py_->late_taken, 1);  // taken, and thrown away
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_TRUE(events[0].stack_missing);
  EXPECT_EQ(events[0].token, 0u);
  EXPECT_EQ(events[0].kind, Kind::kNative);
  EXPECT_EQ(engine_->stats().late_stacks, 0u);
  EXPECT_EQ(engine_->request_counters(token).count, 0u);
}

// stop() right after a stall the watchdog had not yet seen end (a lifespan shutdown that blocked
// and then completed): the event is still delivered, ending where the loop came back.
TEST_F(EngineTest, StopDeliversAStallThatHadEnded) {
  const std::uint64_t token = engine_->begin_request("lifespan.shutdown");
  py_->token = token;
  const Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(60 * kMs);
  Step();  // a stall now, sampled
  Advance(140 * kMs);
  LoopWaits();  // over; no step saw it
  Advance(1 * kMs);
  engine_->stop();
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, token);
  EXPECT_EQ(events[0].duration, Now() - 1 * kMs - t0);
}

// A saturated loop, busy for 55 ms: the samples at detection and confirmation caught request A
// in a step that began 1 ms before the first and had ended by the time the loop came back. The
// steps the loop thread recorded bound its run: no event, and the 55 ms are saturation. Request
// B's stall is the same, except that its step holds the loop all along: that is its event.
TEST_F(EngineTest, RecordedStepsBoundTheRunsOfAFinishedStall) {
  const std::uint64_t a = engine_->begin_request("GET /short");
  py_->token = a;
  Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Step();
  Advance(2 * kMs);
  Step();  // detection and confirmation, both in A's step
  Advance(1 * kMs);
  EXPECT_EQ(engine_->record_step(a, t0 + 49 * kMs, t0 + 53 * kMs, -1), StepVerdict::kNone);
  Advance(2 * kMs);
  LoopWaits();
  Step();
  EXPECT_TRUE(engine_->drain().empty());
  EXPECT_EQ(engine_->stats().saturated, 55 * kMs);

  const std::uint64_t b = engine_->begin_request("GET /slow");
  py_->token = b;
  t0 = Now();
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Step();
  Advance(2 * kMs);
  Step();
  Advance(3 * kMs);
  engine_->record_step(b, t0, t0 + 55 * kMs, -1);
  LoopWaits();
  Step();
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, b);
  EXPECT_EQ(events[0].start, t0);
  EXPECT_EQ(events[0].duration, 55 * kMs);
}

// A late sample of the GIL holder taken after it went back to its pool (no request, no
// application frame) names nothing: the stall is still reported, as a GIL wait without culprit,
// instead of being pinned on idle pool code or dropped.
TEST_F(EngineTest, LateSampleOfAnIdleHolderIsIgnored) {
  const std::uint64_t token = engine_->begin_request();
  py_->succeed = false;
  const Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Step();
  Advance(2 * kMs);
  Step();
  Sample late;
  late.t = t0 + 53 * kMs;
  late.thread = 5151;
  late.frames = {FrameInfo{"/usr/lib/python3.13/threading.py", "wait", 359}};
  late.has_stack = true;
  py_->late = late;
  Advance(5 * kMs);
  LoopWaits();
  Step();
  EXPECT_EQ(py_->late_taken, 1);
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_TRUE(events[0].stack_missing);
  EXPECT_EQ(events[0].token, 0u);
  EXPECT_EQ(engine_->stats().late_stacks, 0u);
  EXPECT_EQ(engine_->request_counters(token).count, 0u);

  // The same thread still inside a request is the culprit, even without an application frame.
  const Nanos t1 = Now();
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Step();
  late.t = t1 + 51 * kMs;
  late.token = token;
  py_->late = late;
  Advance(5 * kMs);
  LoopWaits();
  Step();
  const std::vector<Event> named = engine_->drain();
  ASSERT_EQ(named.size(), 1u);
  EXPECT_EQ(named[0].token, token);
  EXPECT_EQ(engine_->stats().late_stacks, 1u);
}

}  // namespace
}  // namespace loopguard
