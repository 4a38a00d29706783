// What each request is charged: the blocking it caused, the delay it suffered while others
// blocked, and cumulative blocking over many short steps.
#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "engine_test.h"
#include "loopguard/engine.h"

namespace loopguard {
namespace {

// ---- The delay each request suffered --------------------------------------------------------

// A request in flight while another one blocks is frozen for the whole event; the culprit is not
// its own victim, and a request that had ended before the stall is not frozen by it.
TEST_F(EngineTest, VictimWaitsForTheWholeEvent) {
  const std::uint64_t gone = engine_->begin_request();
  const std::uint64_t culprit = engine_->begin_request();
  const std::uint64_t victim = engine_->begin_request();
  RequestCounters last;
  engine_->end_request(gone, &last);
  EXPECT_EQ(last.wait, 0);
  py_->token = culprit;
  Stall(60 * kMs);
  ASSERT_EQ(engine_->drain().size(), 1u);
  const RequestCounters c = engine_->request_counters(culprit);
  EXPECT_EQ(c.count, 1u);
  EXPECT_EQ(c.total, 60 * kMs);
  EXPECT_EQ(c.wait, 0);
  const RequestCounters v = engine_->request_counters(victim);
  EXPECT_EQ(v.count, 0u);
  EXPECT_EQ(v.total, 0);
  EXPECT_EQ(v.wait, 60 * kMs);

  // A second stall adds up, and the request's end hands the final counters back.
  Stall(70 * kMs);
  engine_->end_request(victim, &last);
  EXPECT_EQ(last.count, 0u);
  EXPECT_EQ(last.wait, 130 * kMs);
  engine_->end_request(culprit, &last);
  EXPECT_EQ(last.count, 2u);
  EXPECT_EQ(last.total, 130 * kMs);
  EXPECT_EQ(last.wait, 0);
}

// A block outside any request (a background task, a callback) has no culprit request, and
// still freezes every request in flight.
TEST_F(EngineTest, BlockOutsideRequestsFreezesEveryRequestInFlight) {
  const std::uint64_t a = engine_->begin_request();
  const std::uint64_t b = engine_->begin_request();
  py_->token = 0;  // the stack still has an application frame: an event, not saturation
  Stall(80 * kMs);
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, 0u);
  EXPECT_EQ(engine_->request_counters(a).wait, 80 * kMs);
  EXPECT_EQ(engine_->request_counters(b).wait, 80 * kMs);
  EXPECT_EQ(engine_->request_counters(a).count, 0u);
}

// One stall, two culprits one after the other: each is the other's victim for the other's event
// only, and a bystander waits for both.
TEST_F(EngineTest, TwoCulpritsInOneStallWaitForEachOther) {
  const std::uint64_t a = engine_->begin_request();
  const std::uint64_t b = engine_->begin_request();
  const std::uint64_t c = engine_->begin_request();
  const Nanos t0 = Now();
  py_->token = a;
  LoopBusy();
  Step();
  for (const Nanos dt : {50 * kMs, 2 * kMs, 10 * kMs}) {  // samples at 50, 52, 62 ms: a
    Advance(dt);
    Step();
  }
  py_->token = b;
  for (int i = 0; i < 8; ++i) {  // samples at 72 .. 142 ms: b
    Advance(10 * kMs);
    Step();
  }
  Advance(8 * kMs);
  LoopWaits();  // back at 150 ms
  Step();
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].token, a);
  EXPECT_EQ(events[0].start, t0);
  EXPECT_EQ(events[0].duration, 67 * kMs);  // cut halfway between the samples at 62 and 72
  EXPECT_EQ(events[1].token, b);
  EXPECT_EQ(events[1].duration, 83 * kMs);
  const RequestCounters ra = engine_->request_counters(a);
  const RequestCounters rb = engine_->request_counters(b);
  EXPECT_EQ(ra.total, 67 * kMs);
  EXPECT_EQ(ra.wait, 83 * kMs);
  EXPECT_EQ(rb.total, 83 * kMs);
  EXPECT_EQ(rb.wait, 67 * kMs);
  EXPECT_EQ(engine_->request_counters(c).wait, 150 * kMs);
}

// A request that begins in the middle of a busy stretch (the loop ran its callback before the
// block) is frozen only by the part of the event after its begin.
TEST_F(EngineTest, RequestBegunDuringTheStallWaitsOnlyFromItsBegin) {
  const std::uint64_t culprit = engine_->begin_request();
  py_->token = culprit;
  LoopBusy();
  Step();
  Advance(20 * kMs);
  const std::uint64_t late = engine_->begin_request();
  Advance(60 * kMs);
  Step();
  Advance(2 * kMs);
  Step();
  Advance(8 * kMs);
  LoopWaits();  // the event: 90 ms from the stall's start
  Step();
  ASSERT_EQ(engine_->drain().size(), 1u);
  EXPECT_EQ(engine_->request_counters(culprit).total, 90 * kMs);
  EXPECT_EQ(engine_->request_counters(late).wait, 70 * kMs);
}

// While the stall goes on, a victim's wait is live, up to the watchdog's last sample (never up to
// a moment nobody looked at). A victim that ends then keeps that, and the commit that follows
// neither credits it again nor forgets the victims still in flight.
TEST_F(EngineTest, WaitIsLiveUpToTheLastSampleWhileTheStallGoesOn) {
  const std::uint64_t culprit = engine_->begin_request();
  const std::uint64_t early = engine_->begin_request();
  const std::uint64_t stays = engine_->begin_request();
  py_->token = culprit;
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Step();  // detection sample at 50 ms
  EXPECT_EQ(engine_->request_counters(early).wait, 50 * kMs);
  Advance(2 * kMs);
  Step();
  Advance(10 * kMs);
  Step();  // last sample at 62 ms
  EXPECT_EQ(engine_->request_counters(culprit).wait, 0);
  Advance(5 * kMs);
  RequestCounters last;
  engine_->end_request(early, &last);  // at 67 ms: counted up to 62
  EXPECT_EQ(last.wait, 62 * kMs);
  EXPECT_EQ(last.count, 0u);
  Advance(3 * kMs);
  LoopWaits();
  Step();
  ASSERT_EQ(engine_->drain().size(), 1u);
  EXPECT_EQ(engine_->request_counters(early).wait, 0);  // gone: nothing kept for it
  EXPECT_EQ(engine_->request_counters(stays).wait, 70 * kMs);
  EXPECT_EQ(engine_->request_counters(culprit).total, 70 * kMs);
}

// A culprit whose stall is settled before its end (the extension does so when ends_stall says
// it may) gets the committed counters back, not the live estimate up to the last sample.
TEST_F(EngineTest, CulpritSettledBeforeItsEndGetsFinalCounters) {
  const std::uint64_t culprit = engine_->begin_request();
  py_->token = culprit;
  LoopBusy();
  Step();
  for (const Nanos dt : {50 * kMs, 2 * kMs, 10 * kMs}) {  // three samples: well sampled
    Advance(dt);
    Step();
  }
  Advance(5 * kMs);
  EXPECT_TRUE(engine_->ends_stall(culprit));
  EXPECT_EQ(engine_->request_counters(culprit).total, 62 * kMs);  // live: up to the sample
  LoopWaits();  // what settle() does: the busy stretch ends, the watchdog finishes the stall
  Step();
  EXPECT_FALSE(engine_->ends_stall(culprit));
  RequestCounters last;
  EXPECT_FALSE(engine_->end_request(culprit, &last));
  EXPECT_EQ(last.count, 1u);
  EXPECT_EQ(last.total, 67 * kMs);
}

// ---- Cumulative blocking ------------------------------------------------------------------------

// Steps of a request's coroutine reach the cumulative threshold: the event is the request's, its
// counters (the dev headers) include it, and the other requests in flight are its victims.
TEST_F(EngineTest, CumulativeStepsAreCreditedToTheRequest) {
  const std::uint64_t culprit = engine_->begin_request("GET /cuts");
  const std::uint64_t other = engine_->begin_request("GET /ping");
  StepVerdict verdict = StepVerdict::kNone;
  Nanos t = Now();
  for (int i = 0; i < 40 && verdict != StepVerdict::kReport; ++i, t += 10 * kMs) {
    EXPECT_EQ(engine_->record_step(other, t + 8 * kMs, t + 9 * kMs, -1), StepVerdict::kNone);
    verdict = engine_->record_step(culprit, t, t + 8 * kMs, 8 * kMs);
  }
  ASSERT_EQ(verdict, StepVerdict::kReport);
  const std::optional<Event> ev = engine_->take_cumulative();
  ASSERT_TRUE(ev.has_value());
  EXPECT_FALSE(engine_->take_cumulative().has_value());  // handed out once
  EXPECT_EQ(ev->kind, Kind::kCumulative);
  EXPECT_EQ(ev->token, culprit);
  EXPECT_EQ(ev->victims, 1u);
  EXPECT_EQ(engine_->request_counters(culprit).count, 1u);
  EXPECT_EQ(engine_->request_counters(culprit).total, 200 * kMs);
  EXPECT_EQ(engine_->request_counters(other).count, 0u);
  // Many short steps over a second froze nobody for 200 ms in one go: no waiting is made up.
  EXPECT_EQ(engine_->request_counters(other).wait, 0);
  EXPECT_EQ(engine_->stats().cumulative_events, 1u);
  EXPECT_TRUE(engine_->drain().empty());  // handed back directly, never through the queue
  engine_->end_request(culprit);
  EXPECT_EQ(engine_->record_step(culprit, t, t + 8 * kMs, 8 * kMs), StepVerdict::kNone);
}

}  // namespace
}  // namespace loopguard
