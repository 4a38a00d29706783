#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "fakes.h"
#include "loopguard/clock.h"
#include "loopguard/engine.h"

namespace loopguard {
namespace {

// The engine is driven by hand: no watchdog thread, a fake clock, step(now) called by the test.
class EngineTest : public testing::Test {
 protected:
  void Make(WatchdogConfig config = WatchdogConfig{},
            ThresholdConfig threshold = ThresholdConfig{}) {
    os_ = std::make_shared<FakeOs>();
    os_->state = Running();
    py_ = std::make_shared<FakePython>();
    py_->frames = HandlerStack("handler", 42);
    py_->culprit = 1;
    engine_ = std::make_unique<Engine>(config, threshold, std::make_unique<FakeProbe>(os_),
                                       std::make_unique<FakeSampler>(py_), &clock_);
  }
  void SetUp() override { Make(); }

  Nanos Step() { return engine_->step(clock_.now()); }
  // The loop leaves select (busy) / goes back to it: the pulse and what the OS shows agree.
  void LoopBusy() {
    os_->loop_waiting = false;
    engine_->wait_end();
  }
  void LoopWaits() {
    engine_->wait_begin();
    os_->loop_waiting = true;
  }
  Nanos Now() const { return clock_.now(); }
  void Advance(Nanos dt) { clock_.advance(dt); }

  // Loop leaves select, stays busy for `busy` (the watchdog stepping every `every`), and goes back.
  void Stall(Nanos busy, Nanos every = 1 * kMs) {
    LoopBusy();
    const Nanos end = Now() + busy;
    Step();
    while (Now() < end) {
      Advance(std::min(every, end - Now()));
      Step();
    }
    LoopWaits();
    Step();
  }

  FakeClock clock_;  // declared first: outlives the engine
  std::shared_ptr<FakeOs> os_;
  std::shared_ptr<FakePython> py_;
  std::unique_ptr<Engine> engine_;
};

// A busy stretch shorter than the threshold is ordinary loop lag: no sample, no event.
TEST_F(EngineTest, NoStallBelowThreshold) {
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  const Nanos t0 = Now();
  LoopBusy();
  // Busy but young: look again after one interval.
  EXPECT_EQ(Step(), t0 + 10 * kMs);
  Advance(49 * kMs);
  // Close to the threshold: look again exactly when it would be crossed.
  EXPECT_EQ(Step(), t0 + 50 * kMs);
  LoopWaits();
  Step();
  EXPECT_EQ(py_->calls, 0);
  EXPECT_TRUE(engine_->drain().empty());
  const EngineStats s = engine_->stats();
  EXPECT_EQ(s.stalls, 0u);
  EXPECT_EQ(s.samples, 0u);
  EXPECT_EQ(s.lag_count, 1u);
  EXPECT_EQ(s.lag_max, 49 * kMs);
  EXPECT_EQ(s.threshold, 50 * kMs);
  EXPECT_EQ(engine_->request_counters(token).count, 0u);
}

// The main path: detect at the threshold, sample at detection, after confirm_delay, then every
// interval; when the loop is back, one event with the right request, duration, kind and stack.
TEST_F(EngineTest, StallDetectedSampledAndReported) {
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  const Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(50 * kMs);
  EXPECT_EQ(Step(), t0 + 52 * kMs);  // next: the confirmation sample
  EXPECT_EQ(py_->calls, 1);
  EXPECT_EQ(py_->last_timeout, 20 * kMs);
  EXPECT_TRUE(py_->last_wanted_frames);
  EXPECT_EQ(engine_->stats().stalls, 1u);

  Advance(1 * kMs);
  EXPECT_EQ(Step(), t0 + 52 * kMs);  // too early: no sample
  EXPECT_EQ(py_->calls, 1);
  Advance(1 * kMs);
  EXPECT_EQ(Step(), t0 + 62 * kMs);  // then every interval
  EXPECT_EQ(py_->calls, 2);
  Advance(10 * kMs);
  EXPECT_EQ(Step(), t0 + 72 * kMs);
  EXPECT_EQ(py_->calls, 3);
  Advance(5 * kMs);
  Step();
  EXPECT_EQ(py_->calls, 3);
  Advance(5 * kMs);
  Step();
  EXPECT_EQ(py_->calls, 4);

  EXPECT_FALSE(NotifyReadable(engine_->notify_fd()));
  EXPECT_TRUE(engine_->drain().empty());  // still going on: nothing to report yet
  Advance(3 * kMs);
  LoopWaits();  // back in select at t0 + 75 ms
  Step();
  EXPECT_TRUE(NotifyReadable(engine_->notify_fd()));  // the loop is told to drain

  const std::vector<Event> events = engine_->drain();
  EXPECT_FALSE(NotifyReadable(engine_->notify_fd()));
  ASSERT_EQ(events.size(), 1u);
  const Event& ev = events[0];
  EXPECT_EQ(ev.token, token);
  EXPECT_EQ(ev.start, t0);
  EXPECT_EQ(ev.duration, 75 * kMs);
  EXPECT_EQ(ev.kind, Kind::kCpu);
  EXPECT_EQ(ev.samples, 4u);
  EXPECT_FALSE(ev.stack_missing);
  EXPECT_EQ(ev.stack, HandlerStack("handler", 42));
  EXPECT_EQ(ev.culprit, 1);
  EXPECT_EQ(ev.victims, 0u);

  const EngineStats s = engine_->stats();
  EXPECT_EQ(s.stalls, 1u);
  EXPECT_EQ(s.events_emitted, 1u);
  EXPECT_EQ(s.samples, 4u);
  EXPECT_EQ(s.lag_max, 75 * kMs);
  EXPECT_EQ(s.saturated, 0);
}

// The product requirement: a handler that blocked the loop usually sends its response headers in
// the very iteration its block ends in, before any event is drained. The counters must therefore
// show the block while the stall is still going on, and not count it twice once it is committed.
TEST_F(EngineTest, RequestCountersLiveDuringStall) {
  const std::uint64_t culprit = engine_->begin_request();
  const std::uint64_t victim = engine_->begin_request();
  py_->token = culprit;
  LoopBusy();
  Step();
  EXPECT_EQ(engine_->request_counters(culprit).count, 0u);
  Advance(50 * kMs);
  Step();
  RequestCounters live = engine_->request_counters(culprit);
  EXPECT_EQ(live.count, 1u);
  EXPECT_EQ(live.total, 50 * kMs);
  Advance(2 * kMs);
  Step();
  live = engine_->request_counters(culprit);
  EXPECT_EQ(live.count, 1u);
  EXPECT_EQ(live.total, 52 * kMs);
  EXPECT_EQ(engine_->request_counters(victim).count, 0u);

  // The loop is back, but the watchdog has not looked yet: still the live value.
  Advance(8 * kMs);
  LoopWaits();
  EXPECT_EQ(engine_->request_counters(culprit).count, 1u);
  Step();
  const RequestCounters committed = engine_->request_counters(culprit);
  EXPECT_EQ(committed.count, 1u);
  EXPECT_EQ(committed.total, 60 * kMs);
  EXPECT_EQ(engine_->request_counters(victim).count, 0u);
  EXPECT_EQ(engine_->request_counters(victim).total, 0);

  // A second block of the same request adds up.
  Stall(70 * kMs);
  EXPECT_EQ(engine_->request_counters(culprit).count, 2u);
  EXPECT_EQ(engine_->request_counters(culprit).total, 130 * kMs);
  EXPECT_EQ(engine_->drain().size(), 2u);

  engine_->end_request(culprit);
  EXPECT_EQ(engine_->request_counters(culprit).count, 0u);  // forgotten with the request
}

// Tokens are distinct, the in-flight count follows begin/end, and the other requests in flight
// during a block are its victims.
TEST_F(EngineTest, InflightAndVictims) {
  const std::uint64_t a = engine_->begin_request();
  const std::uint64_t b = engine_->begin_request();
  const std::uint64_t c = engine_->begin_request();
  EXPECT_NE(a, 0u);
  EXPECT_NE(a, b);
  EXPECT_NE(b, c);
  EXPECT_EQ(engine_->stats().inflight, 3u);
  engine_->end_request(b);
  EXPECT_EQ(engine_->stats().inflight, 2u);
  engine_->end_request(b);  // ending twice is harmless
  EXPECT_EQ(engine_->stats().inflight, 2u);

  py_->token = a;
  Stall(60 * kMs);
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, a);
  EXPECT_EQ(events[0].victims, 1u);  // c; a is the culprit, b had ended
}

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

// Heartbeat mode (no select hooks): a beat promises the next one within `interval`. When it is a
// threshold late, the loop has been stuck since the beat was due.
TEST_F(EngineTest, HeartbeatStall) {
  const Nanos t0 = Now();
  engine_->heartbeat();
  // Nothing in flight, so an idle tick, but not past the point where a missed beat is a stall.
  EXPECT_EQ(Step(), t0 + 60 * kMs);
  // Regular beats: never a stall, however long it goes on.
  for (int i = 0; i < 20; ++i) {
    Advance(10 * kMs);
    engine_->heartbeat();
    Step();
  }
  EXPECT_EQ(engine_->stats().stalls, 0u);

  const Nanos last_beat = Now();
  os_->loop_waiting = false;  // the loop is stuck in a callback from here on
  Advance(59 * kMs);          // due at +10, so 49 ms late
  Step();
  EXPECT_EQ(engine_->stats().stalls, 0u);
  Advance(1 * kMs);
  Step();
  EXPECT_EQ(engine_->stats().stalls, 1u);
  EXPECT_EQ(py_->calls, 1);
  Advance(20 * kMs);
  os_->loop_waiting = true;
  engine_->heartbeat();  // the loop is back at last_beat + 80 ms
  Step();

  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].start, last_beat + 10 * kMs);
  EXPECT_EQ(events[0].duration, 70 * kMs);
  EXPECT_EQ(engine_->stats().lag_max, 70 * kMs);

  // heartbeat_off: a loop with nothing to do stops beating; that is not a stall.
  engine_->heartbeat_off();
  Advance(500 * kMs);
  Step();
  EXPECT_EQ(engine_->stats().stalls, 1u);
}

// Heartbeat off, yet the OS shows the loop thread running: maybe a loop busy with work the guard
// does not track (another guard's requests, excluded paths). The watchdog pokes the notify pipe;
// a live loop answers with a beat, which starts the busy stretch over, so it is never a stall.
// A loop stuck in one callback cannot answer, and is a stall a threshold later.
TEST_F(EngineTest, HeartbeatOffBusyLoopIsAskedBeforeBlamed) {
  auto poked = [this] {
    char buf[16];
    return ::read(engine_->notify_fd(), buf, sizeof buf) > 0;
  };
  engine_->heartbeat();
  engine_->heartbeat_off();
  os_->loop_waiting = false;
  for (int i = 0; i < 30; ++i) {  // 300 ms of a busy, answering loop
    Step();
    EXPECT_TRUE(poked()) << i;
    engine_->heartbeat();  // what drain() does on the loop thread
    engine_->heartbeat_off();
    Advance(10 * kMs);
  }
  EXPECT_EQ(engine_->stats().stalls, 0u);

  Step();  // asked once more, and never answers from here on
  EXPECT_TRUE(poked());
  for (int i = 0; i < 6; ++i) {
    Advance(10 * kMs);
    Step();
    EXPECT_FALSE(poked());  // one question per busy stretch
  }
  EXPECT_EQ(engine_->stats().stalls, 1u);
}

// With the heartbeat on, a missed beat is the stall: a busy loop is never poked then.
TEST_F(EngineTest, HeartbeatOnBusyLoopIsNotPoked) {
  py_->token = engine_->begin_request();
  os_->loop_waiting = false;
  for (int i = 0; i < 10; ++i) {
    engine_->heartbeat();
    Step();
    char buf[16];
    EXPECT_LE(::read(engine_->notify_fd(), buf, sizeof buf), 0) << i;
    Advance(10 * kMs);
  }
  EXPECT_EQ(engine_->stats().stalls, 0u);
}

// The watchdog's own schedule: a short interval while requests are in flight or recently were,
// the long idle tick otherwise.
TEST_F(EngineTest, TickFollowsActivity) {
  EXPECT_EQ(Step(), Now() + 1000 * kMs);
  EXPECT_FALSE(engine_->wants_heartbeat());
  const std::uint64_t token = engine_->begin_request();
  EXPECT_EQ(Step(), Now() + 10 * kMs);
  EXPECT_TRUE(engine_->wants_heartbeat());
  engine_->end_request(token);
  Advance(999 * kMs);  // within the grace period
  EXPECT_EQ(Step(), Now() + 10 * kMs);
  EXPECT_TRUE(engine_->wants_heartbeat());
  Advance(1 * kMs);
  EXPECT_EQ(Step(), Now() + 1000 * kMs);
  EXPECT_FALSE(engine_->wants_heartbeat());
}

// Several stalls: stats count stalls and events; events come out in order.
TEST_F(EngineTest, StatsCountStallsAndEvents) {
  py_->token = engine_->begin_request();
  Stall(60 * kMs);
  Advance(5 * kMs);
  Stall(20 * kMs);  // not a stall
  Advance(5 * kMs);
  Stall(90 * kMs);
  const EngineStats s = engine_->stats();
  EXPECT_EQ(s.stalls, 2u);
  EXPECT_EQ(s.events_emitted, 2u);
  EXPECT_EQ(s.events_dropped, 0u);
  EXPECT_EQ(s.lag_count, 3u);
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].duration, 60 * kMs);
  EXPECT_EQ(events[1].duration, 90 * kMs);
}

// When the loop never drains, events beyond the ring capacity are dropped and counted.
TEST_F(EngineTest, RingOverflowCountsDrops) {
  WatchdogConfig config;
  config.ring_capacity = 2;
  Make(config);
  py_->token = engine_->begin_request();
  for (Nanos busy : {60 * kMs, 70 * kMs, 80 * kMs, 90 * kMs}) {
    Stall(busy);
    Advance(1 * kMs);
  }
  EngineStats s = engine_->stats();
  EXPECT_EQ(s.stalls, 4u);
  EXPECT_EQ(s.events_emitted, 2u);
  EXPECT_EQ(s.events_dropped, 2u);
  EXPECT_EQ(s.events_detected, 4u);  // counted before the queue: none vanishes unaccounted
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].duration, 60 * kMs);  // the oldest are kept
  EXPECT_EQ(events[1].duration, 70 * kMs);
  // Drained: room again.
  Stall(55 * kMs);
  s = engine_->stats();
  EXPECT_EQ(s.events_emitted, 3u);
  EXPECT_EQ(s.events_dropped, 2u);
  EXPECT_EQ(s.events_detected, 5u);
}

// The GIL could not be had in time: counted, and the event still exists but says it has no stack.
TEST_F(EngineTest, SamplerTimeoutMeansStackMissing) {
  engine_->begin_request();
  py_->succeed = false;
  Stall(65 * kMs);
  const EngineStats s = engine_->stats();
  EXPECT_EQ(s.stack_timeouts, static_cast<std::uint64_t>(py_->calls));
  EXPECT_EQ(s.stack_timeouts, 3u);  // at 50, 52 and 62 ms
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_TRUE(events[0].stack_missing);
  EXPECT_TRUE(events[0].stack.empty());
  EXPECT_EQ(events[0].token, 0u);
  EXPECT_EQ(events[0].duration, 65 * kMs);
}

// Stacks switched off: the sampler is asked for the token only; events name the request but
// carry no stack, and that is not a timeout.
TEST_F(EngineTest, CaptureStacksOff) {
  WatchdogConfig config;
  config.capture_stacks = false;
  Make(config);
  py_->token = engine_->begin_request();
  Stall(60 * kMs);
  EXPECT_FALSE(py_->last_wanted_frames);
  EXPECT_EQ(engine_->stats().stack_timeouts, 0u);
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, py_->token);
  EXPECT_TRUE(events[0].stack_missing);
}

// The loop moved on while the sampler waited for the GIL: that stack belongs to whatever ran next
// and is thrown away. The stall is left without a single sample, so nobody can tell one culprit
// from many short callbacks: no nameless event, the time counts as saturation.
TEST_F(EngineTest, SampleTakenAfterLoopMovedOnIsDiscarded) {
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  py_->during = [this] { LoopWaits(); };
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Step();
  EXPECT_EQ(py_->calls, 1);
  EXPECT_EQ(engine_->stats().samples, 0u);
  py_->during = nullptr;
  Step();
  EXPECT_TRUE(engine_->drain().empty());
  const EngineStats s = engine_->stats();
  EXPECT_EQ(s.stalls, 1u);
  EXPECT_EQ(s.events_emitted, 0u);
  EXPECT_EQ(s.saturated, 50 * kMs);
  EXPECT_EQ(engine_->request_counters(token).count, 0u);  // the discarded stack blamed nobody
}

// The OS says the thread sleeps in clock_nanosleep and its CPU clock stands still: a sleep event
// with no CPU time. (The OS reading comes before the stack: no GIL involved.)
TEST_F(EngineTest, KindAndCpuFromProbe) {
#ifdef SYS_clock_nanosleep
  os_->state = InSyscall(SYS_clock_nanosleep);
  os_->cpu = 300 * kMs;
  py_->token = engine_->begin_request();
  Stall(80 * kMs);
  EXPECT_GT(os_->state_reads, 0);
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kSleep);
  EXPECT_EQ(events[0].cpu, 0);
#endif
}

// A stall caught by a single sample still gets its CPU share, from the reading taken while the
// loop was busy but not yet stalled.
TEST_F(EngineTest, PreDetectionCpuReading) {
  py_->token = engine_->begin_request();
  os_->cpu = 0;
  LoopBusy();
  Step();  // busy, not stalled: notes the CPU clock
  Advance(50 * kMs);
  os_->cpu = 25 * kMs;  // half of the 50 ms on CPU
  Step();
  Advance(1 * kMs);
  LoopWaits();  // back before the confirmation sample
  Step();
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].samples, 1u);
  EXPECT_EQ(events[0].duration, 51 * kMs);
  EXPECT_EQ(events[0].cpu, 25'500'000);
}

// A sample showing the loop back in epoll is idle: the sampler is not even asked (it would wait
// for the GIL for nothing) and such a stall yields no event.
TEST_F(EngineTest, IdleSamplesAreNotBlamed) {
#if defined(SYS_epoll_pwait)
  os_->state = InSyscall(SYS_epoll_pwait);
  py_->token = engine_->begin_request();
  Stall(70 * kMs);
  EXPECT_EQ(py_->calls, 0);
  EXPECT_EQ(engine_->stats().stalls, 1u);
  EXPECT_TRUE(engine_->drain().empty());
#endif
}

// A calibrated baseline raises the threshold: a slow-by-nature loop is not reported.
TEST_F(EngineTest, CalibrationRaisesThreshold) {
  engine_->calibrate({20 * kMs, 20 * kMs, 20 * kMs});
  EXPECT_EQ(engine_->threshold(), 100 * kMs);
  EXPECT_EQ(engine_->stats().baseline, 20 * kMs);
  py_->token = engine_->begin_request();
  Stall(90 * kMs);
  EXPECT_EQ(engine_->stats().stalls, 0u);
  Stall(110 * kMs);
  EXPECT_EQ(engine_->stats().stalls, 1u);
}

// A hang: samples are thinned and slowed down beyond max_samples, so memory stays bounded while
// the samples still span the whole stall, and the event still covers all of it.
TEST_F(EngineTest, SampleThinningBoundsMemory) {
  WatchdogConfig config;
  config.max_samples = 4;
  Make(config);
  py_->token = engine_->begin_request();
  const Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Nanos next = Step();
  std::vector<Nanos> gaps;
  while (Now() < t0 + 10'000 * kMs) {
    ASSERT_GT(next, Now());
    clock_.set(next);
    const Nanos prev = next;
    next = Step();
    gaps.push_back(next - prev);
  }
  // Periods after samples 2, 3, 4, ...: 10 ms until the buffer overflows with the 5th sample,
  // which thins it to 3 and doubles the period; two samples later it overflows again.
  ASSERT_GE(gaps.size(), 7u);
  EXPECT_EQ(gaps[0], 10 * kMs);
  EXPECT_EQ(gaps[1], 10 * kMs);
  EXPECT_EQ(gaps[2], 10 * kMs);
  EXPECT_EQ(gaps[3], 20 * kMs);  // 5th sample: thinned to 3, period doubled
  EXPECT_EQ(gaps[4], 20 * kMs);
  EXPECT_EQ(gaps[5], 40 * kMs);
  EXPECT_EQ(gaps[6], 40 * kMs);
  // About two samples per doubling: logarithmic in the stall length, not linear.
  EXPECT_LT(py_->calls, 30);
  // Every capture was a sample of the stall, but the one that listed the threads at the first
  // hang report (at 1 s).
  EXPECT_EQ(py_->all_calls, 1);
  EXPECT_EQ(engine_->stats().samples + 1, static_cast<std::uint64_t>(py_->calls));

  LoopWaits();
  const Nanos end = Now();
  Step();
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_LE(events[0].samples, 4u);
  EXPECT_GE(events[0].samples, 2u);
  EXPECT_EQ(events[0].start, t0);
  EXPECT_EQ(events[0].duration, end - t0);
}

// ---- Stalls the OS notices while the pulse cannot report them ---------------------------------

// The pulse says the loop waits (no wait_end: it cannot say otherwise while it waits for the GIL
// after select, or while uvloop's heartbeat is off), but the OS shows the loop thread running. A
// threshold later that is a stall, dated from when the OS first saw it busy; it ends with the
// first sample that shows the loop back in epoll_wait, at that sample's time.
TEST_F(EngineTest, OsDetectedStallStartsWhenOsFirstSawLoopBusy) {
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  const Nanos t0 = Now();
  os_->loop_waiting = false;  // the pulse is not told
  EXPECT_EQ(Step(), t0 + 10 * kMs);
  Advance(30 * kMs);
  EXPECT_EQ(Step(), t0 + 40 * kMs);
  Advance(19 * kMs);
  EXPECT_EQ(Step(), t0 + 50 * kMs);  // look again exactly when it would be a threshold
  EXPECT_EQ(engine_->stats().stalls, 0u);
  EXPECT_EQ(py_->calls, 0);
  Advance(1 * kMs);
  EXPECT_EQ(Step(), t0 + 52 * kMs);
  EXPECT_EQ(engine_->stats().stalls, 1u);
  EXPECT_EQ(py_->calls, 1);
  Advance(2 * kMs);
  EXPECT_EQ(Step(), t0 + 62 * kMs);
  EXPECT_EQ(py_->calls, 2);

  Advance(6 * kMs);
  os_->loop_waiting = true;  // back in epoll_wait at t0 + 58 ms; still no word from the pulse
  EXPECT_EQ(Step(), t0 + 62 * kMs);  // not sampled yet: the stall goes on
  EXPECT_TRUE(engine_->drain().empty());
  Advance(4 * kMs);
  Step();                    // the sample that sees epoll_wait
  EXPECT_EQ(py_->calls, 2);  // idle: the sampler is not asked
  EXPECT_EQ(engine_->stats().samples, 3u);
  Advance(10 * kMs);
  Step();  // ends the stall at the idle sample, not at `now`

  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, token);
  EXPECT_EQ(events[0].start, t0);
  EXPECT_EQ(events[0].duration, 62 * kMs);
  EXPECT_EQ(events[0].kind, Kind::kCpu);
  EXPECT_EQ(events[0].samples, 2u);
  EXPECT_EQ(events[0].stack, HandlerStack("handler", 42));
  EXPECT_EQ(engine_->request_counters(token).total, 62 * kMs);
  const EngineStats s = engine_->stats();
  EXPECT_EQ(s.stalls, 1u);
  EXPECT_EQ(s.events_emitted, 1u);
  EXPECT_EQ(s.lag_count, 0u);  // the pulse never saw any of it

  // Over: the loop waits, no new stall however long it stays so.
  Advance(500 * kMs);
  Step();
  EXPECT_EQ(engine_->stats().stalls, 1u);
}

// A stall the pulse detected ends only when the pulse says so (the epoch changes), even when
// samples meanwhile show the loop thread in epoll_wait; those samples are not blamed on anyone.
TEST_F(EngineTest, PulseDetectedStallEndsOnlyOnEpochChange) {
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  const Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Step();
  Advance(2 * kMs);
  Step();
  os_->loop_waiting = true;  // epoll_wait, but no wait_begin (the pulse says busy)
  for (int i = 0; i < 3; ++i) {
    Advance(10 * kMs);
    Step();  // samples at +62, +72, +82: idle
  }
  EXPECT_EQ(py_->calls, 2);
  EXPECT_EQ(engine_->stats().samples, 5u);
  EXPECT_TRUE(engine_->drain().empty());
  EXPECT_EQ(Step(), t0 + 92 * kMs);  // still sampling: the stall goes on
  os_->loop_waiting = false;
  Advance(10 * kMs);
  Step();  // +92: running again
  EXPECT_EQ(py_->calls, 3);
  Advance(3 * kMs);
  LoopWaits();
  Step();

  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, token);
  EXPECT_EQ(events[0].start, t0);
  EXPECT_EQ(events[0].duration, 95 * kMs);
  EXPECT_EQ(events[0].samples, 3u);  // the idle ones do not count
  EXPECT_EQ(events[0].kind, Kind::kCpu);
  EXPECT_EQ(engine_->stats().stalls, 1u);
}

// The OS saw the loop busy, then the loop finished an iteration (the epoch moved) while the OS
// still shows it running: the busy time starts over. Two short iterations are no stall.
TEST_F(EngineTest, OsBusyStartRestartsWhenAnIterationEnds) {
  py_->token = engine_->begin_request();
  const Nanos t0 = Now();
  os_->loop_waiting = false;
  EXPECT_EQ(Step(), t0 + 10 * kMs);  // busy since t0 (OS)
  Advance(30 * kMs);
  engine_->wait_end();    // the loop got through select and back: one iteration ended
  engine_->wait_begin();  // ... while the OS never showed it in epoll_wait
  EXPECT_EQ(Step(), t0 + 40 * kMs);
  Advance(30 * kMs);
  // 60 ms since the OS first saw it busy, but only 30 ms in this iteration.
  EXPECT_EQ(Step(), t0 + 70 * kMs);
  EXPECT_EQ(engine_->stats().stalls, 0u);
  EXPECT_EQ(py_->calls, 0);
  Advance(19 * kMs);
  Step();
  EXPECT_EQ(engine_->stats().stalls, 0u);
  Advance(1 * kMs);  // t0 + 80: a threshold after the restart
  Step();
  EXPECT_EQ(engine_->stats().stalls, 1u);
  os_->loop_waiting = true;
  Advance(2 * kMs);
  Step();  // idle sample at t0 + 82
  Step();  // ends the stall
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].start, t0 + 30 * kMs);
  EXPECT_EQ(events[0].duration, 52 * kMs);
}

// Connections waiting in the kernel are counted at detection and then every 100 ms of the stall,
// not at every sample; the event carries the run's newest count.
TEST_F(EngineTest, AStallCountsTheConnectionsWaitingForTheServer) {
  py_->token = engine_->begin_request("GET /slow");
  os_->queued = 2;
  LoopBusy();
  Step();  // detection: counted (2)
  os_->queued = 7;
  for (int i = 0; i < 25; ++i) {
    Advance(10 * kMs);
    Step();
  }
  LoopWaits();
  Step();
  EXPECT_GE(os_->queued_reads, 2);
  EXPECT_LE(os_->queued_reads, 4);  // ~250 ms of stall: at detection, then every 100 ms
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].queued, 7);
  EXPECT_EQ(events[0].victims, 0u);  // the request table saw nobody else

  // Nothing to read them from: unknown, not zero.
  os_->queued = -1;
  Advance(1 * kMs);
  Stall(65 * kMs);
  const std::vector<Event> unknown = engine_->drain();
  ASSERT_EQ(unknown.size(), 1u);
  EXPECT_EQ(unknown[0].queued, -1);
}

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

// Without a request or a stack the line still says what is known: the OS kind.
TEST_F(EngineTest, HangReportWithoutRequestOrStack) {
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
            "loopguard: event loop blocked for 0.06 s and still blocked (no active request); "
            "kind=native; culprit=<stack unavailable>\n");
  EXPECT_EQ(engine_->stats().hangs, 1u);
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
  EXPECT_TRUE(engine_->drain().empty());  // handed back directly, never through the ring
  engine_->end_request(culprit);
  EXPECT_EQ(engine_->record_step(culprit, t, t + 8 * kMs, 8 * kMs), StepVerdict::kNone);
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

#ifdef SYS_futex
constexpr std::uint64_t kGilAddress = 0x7f0012345678;

OsState FutexWait(std::uint64_t address) {
  OsState st = InSyscall(SYS_futex);
  st.arg0 = address;
  return st;
}

// The loop waits on the GIL's futex: the culprit is the thread holding the GIL. The engine looks
// for a running thread other than the loop, the watchdog and the sampler, and samples that one
// (a sync endpoint in the threadpool carries its own request's Context).
TEST_F(EngineTest, GilWaitSamplesTheThreadHoldingIt) {
  os_->state = FutexWait(kGilAddress);
  os_->loop_tid = 4242;
  os_->running = {4242, 4343, 5151, 6161};  // the loop and the sampler come first: excluded
  py_->sampler_tid = 4343;
  py_->gil_futexes = {kGilAddress};
  const std::uint64_t loop_request = engine_->begin_request("GET /async");
  const std::uint64_t sync_request = engine_->begin_request("GET /sync");
  py_->token = loop_request;
  py_->thread_succeed = true;
  py_->thread_token = sync_request;
  py_->thread_frames = HandlerStack("sync_handler", 9);
  py_->thread_culprit = 1;
  Stall(65 * kMs);
  EXPECT_EQ(py_->calls, 0);  // the loop thread itself is not sampled
  EXPECT_EQ(py_->thread_calls, 3);
  EXPECT_EQ(py_->last_thread, 5151);
  EXPECT_EQ(py_->last_timeout, 20 * kMs);
  EXPECT_EQ(os_->running_calls, 3);
  const auto& ex = os_->last_exclude;
  EXPECT_NE(std::find(ex.begin(), ex.end(), 4242L), ex.end());  // the loop thread
  EXPECT_NE(std::find(ex.begin(), ex.end(), 4343L), ex.end());  // the sampler's own thread
  EXPECT_EQ(engine_->stats().stack_timeouts, 0u);
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
  EXPECT_EQ(events[0].token, sync_request);
  EXPECT_EQ(events[0].stack, HandlerStack("sync_handler", 9));
  EXPECT_EQ(events[0].culprit, 1);
  EXPECT_FALSE(events[0].stack_missing);
  EXPECT_EQ(events[0].victims, 1u);
  EXPECT_EQ(engine_->request_counters(sync_request).count, 1u);
  EXPECT_EQ(engine_->request_counters(loop_request).count, 0u);

  // No other thread running: the loop thread's own sample, still a GIL wait.
  os_->running = {4242, 4343};
  Advance(1 * kMs);
  Stall(65 * kMs);
  EXPECT_EQ(py_->thread_calls, 3);
  EXPECT_EQ(py_->calls, 3);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
  EXPECT_EQ(events[0].token, loop_request);
  EXPECT_EQ(events[0].stack, HandlerStack("handler", 42));
}

// A futex the sampler never saw it wait on is an ordinary lock (threading.Lock, queue.get): the
// loop thread is sampled and no other thread is looked for.
TEST_F(EngineTest, UnknownFutexIsLock) {
  os_->state = FutexWait(0xbad0);
  os_->loop_tid = 4242;
  os_->running = {5151};
  py_->gil_futexes = {kGilAddress};
  py_->thread_succeed = true;
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  Stall(65 * kMs);
  EXPECT_EQ(py_->calls, 3);
  EXPECT_EQ(py_->thread_calls, 0);
  EXPECT_EQ(os_->running_calls, 0);
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kLock);
  EXPECT_EQ(events[0].token, token);
  EXPECT_EQ(events[0].stack, HandlerStack("handler", 42));
}

// The loop waits for the GIL another thread holds: the loop's own frames cannot move, but the
// holder's can, so only the loop's stack is read without the GIL.
TEST_F(EngineTest, HangReportWaitingForTheGilReadsOnlyTheLoopsStack) {
  HangPipe pipe;
  ASSERT_TRUE(pipe.ok());
  WatchdogConfig config;
  config.hang_threshold = 60 * kMs;
  config.hang_fd = pipe.write_fd();
  Make(config);
  os_->state = FutexWait(kGilAddress);
  py_->gil_futexes = {kGilAddress};
  py_->succeed = false;
  py_->unlocked_frames = HandlerStack("waits", 5);
  py_->unlocked_culprit = 1;
  ThreadStack worker;
  worker.thread = 5151;
  worker.frames = {{"app/jobs.py", "crunch", 30}};
  worker.culprit = 0;
  py_->others = {worker};
  Stall(61 * kMs);
  const std::string got = pipe.Read();
  EXPECT_NE(got.find("kind=gil; culprit=app/routes.py:5 in waits (read without the GIL)"),
            std::string::npos)
      << got;
  EXPECT_EQ(got.find("thread 5151"), std::string::npos) << got;
  EXPECT_EQ(py_->unlocked_calls, 1);
  EXPECT_FALSE(py_->unlocked_others_asked);
}

// A lock wait (a futex that is not the GIL's): the other threads are read in the same capture,
// and the event names the one running the user's code as the likely holder, not the idle pool
// worker beside it. Two threads running the user's code: nobody is named.
TEST_F(EngineTest, LockWaitNamesTheLikelyHolder) {
  os_->state = FutexWait(0xbad0);
  py_->gil_futexes = {kGilAddress};
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  ThreadStack idle;
  idle.thread = 6161;
  idle.frames = {{"/venv/site-packages/anyio/_backends/_asyncio.py", "run", 900}};
  idle.culprit = 0;
  idle.culprit_is_library = true;
  ThreadStack holder;
  holder.thread = 5151;
  holder.frames = {{"/usr/lib/python3/time.py", "sleep", 1}, {"app/jobs.py", "hold_lock", 30}};
  holder.culprit = 1;
  py_->others = {idle, holder};
  Stall(65 * kMs);
  EXPECT_EQ(py_->all_calls, 3);
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kLock);
  EXPECT_EQ(events[0].stack, HandlerStack("handler", 42));  // the loop's own line stays the culprit
  EXPECT_EQ(events[0].holder.thread, 5151);
  EXPECT_EQ(events[0].holder.frames, holder.frames);
  EXPECT_EQ(events[0].holder.culprit, 1);

  // The holder let go before the last sample (it is back in its pool): its line while it held
  // the lock is still the one named.
  ThreadStack back_in_pool = idle;
  back_in_pool.thread = 5151;
  py_->during = [this, back_in_pool] {
    if (py_->all_calls == 3) py_->others = {back_in_pool};
  };
  py_->others = {idle, holder};
  Advance(1 * kMs);
  Stall(65 * kMs);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].holder.thread, 5151);
  EXPECT_EQ(events[0].holder.frames, holder.frames);
  py_->during = nullptr;

  ThreadStack second = holder;
  second.thread = 7171;
  py_->others = {idle, holder, second};
  Advance(1 * kMs);
  Stall(65 * kMs);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].holder.thread, 0);
}

// On a futex and nobody gets the GIL in time: the loop waits for the GIL while another thread
// holds it, whether or not the address was known.
TEST_F(EngineTest, FutexWithSamplerFailingIsGil) {
  os_->state = FutexWait(0xbad0);  // unknown address: would be a lock
  py_->succeed = false;
  engine_->begin_request();
  Stall(65 * kMs);
  EXPECT_EQ(py_->thread_calls, 0);
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
  EXPECT_TRUE(events[0].stack_missing);

  // The GIL's own futex, and the holder cannot be sampled either.
  os_->state = FutexWait(kGilAddress);
  os_->running = {5151};
  py_->gil_futexes = {kGilAddress};
  Advance(1 * kMs);
  Stall(65 * kMs);
  EXPECT_EQ(py_->thread_calls, 3);
  EXPECT_EQ(py_->calls, 6);  // fell back to the loop thread each time
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
  EXPECT_TRUE(events[0].stack_missing);
  EXPECT_EQ(engine_->stats().stack_timeouts, 6u);
}

// The loop waits on the GIL while a sampler of ours holds it (another guard's, on a busy host):
// that is our own capture, starved of CPU, and no event of the app's. Both ways of telling a GIL
// wait: its known futex, and, before the GIL's address is learned, any futex with no GIL to be
// had in time.
TEST_F(EngineTest, GilHeldByOurOwnSamplerIsNoEvent) {
  os_->loop_tid = 4242;
  os_->running = {5151};
  py_->succeed = false;
  py_->sampler_has_gil = true;
  os_->cpu = 5 * kMs;  // the loop thread's CPU clock stands still: it waits
  engine_->begin_request();
  for (const bool known : {true, false}) {
    py_->gil_futexes.clear();
    if (known) py_->gil_futexes = {kGilAddress};
    os_->state = FutexWait(known ? kGilAddress : 0xbad0);
    Advance(1 * kMs);
    Stall(65 * kMs);
    EXPECT_TRUE(engine_->drain().empty());
  }
  EXPECT_EQ(py_->thread_calls, 0);  // no other thread is blamed either
  EXPECT_EQ(engine_->stats().saturated, 130 * kMs);
}

// A loop waiting for the GIL on a busy host: each of its wake-ups to ask for the GIL queues for
// a CPU, so its run delay grows faster than half the time, yet it sleeps on the GIL's futex at
// every sample. The thread holding the GIL is the culprit, not the host.
TEST_F(EngineTest, GilWaitOnABusyHostIsStillGil) {
  os_->state = FutexWait(kGilAddress);
  py_->gil_futexes = {kGilAddress};
  py_->succeed = false;
  engine_->begin_request();
  Nanos delay = 0;
  os_->state.run_delay = delay;
  LoopBusy();
  Step();
  for (int i = 0; i < 30; ++i) {  // 300 ms, 8 of every 10 ms queued for a CPU
    Advance(10 * kMs);
    delay += 8 * kMs;
    os_->state.run_delay = delay;
    Step();
  }
  LoopWaits();
  Step();
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
  EXPECT_EQ(engine_->stats().saturated, 0);
}

// Outside any request, the loop waits for a pthread mutex with only its own frames on the stack;
// the probe reads the mutex's owner, which is sampled as the GIL's holder would be and names the
// stall (Datasette: a SQL thread's query holds the connection a cursor freed on the loop needs).
TEST_F(EngineTest, ALockWaitWithNothingToNameSamplesTheMutexOwner) {
  os_->state = FutexWait(0xbad0);
  os_->lock_owner = 6161;
  py_->gil_futexes = {kGilAddress};
  py_->frames = {{"/usr/lib/python3/asyncio/base_events.py", "BaseEventLoop._run_once", 1907}};
  py_->culprit = -1;
  py_->task = "(callback)";
  py_->thread_succeed = true;
  py_->thread_frames = HandlerStack("execute_fn", 212);
  py_->thread_culprit = 1;
  engine_->begin_request();  // in flight, but the loop runs no request's code
  Stall(65 * kMs);
  EXPECT_EQ(py_->last_thread, 6161);
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kLock);
  EXPECT_EQ(events[0].token, 0u);  // the owner's Context: a plain pool thread carries none
  EXPECT_EQ(events[0].stack, HandlerStack("execute_fn", 212));
  EXPECT_EQ(events[0].task, "");  // the owner's code, not the loop's callback
  // The holder fields say whose stack that is.
  EXPECT_EQ(events[0].holder.thread, 6161);
  EXPECT_EQ(events[0].holder.frames, HandlerStack("execute_fn", 212));
  EXPECT_EQ(events[0].holder.culprit, 1);

  // The loop's own code waits on the lock: that line is the culprit, the owner is not looked at.
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  py_->frames = HandlerStack("handler", 42);
  py_->culprit = 1;
  py_->thread_calls = 0;
  Advance(1 * kMs);
  Stall(65 * kMs);
  EXPECT_EQ(py_->thread_calls, 0);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, token);
  EXPECT_EQ(events[0].stack, HandlerStack("handler", 42));
  EXPECT_EQ(events[0].task, "");  // inside a request the request names the work, not its task
}

// A worker task created during lifespan startup (Gradio's queue workers) carries the startup's
// token in its Context long after startup ended. Its blocks are outside any request: the event
// names no request, and names the task instead. While the request is in flight the same sample
// is the request's.
TEST_F(EngineTest, ATokenWhoseRequestEndedNamesTheTaskInstead) {
  const std::uint64_t startup = engine_->begin_request("lifespan.startup");
  py_->token = startup;
  py_->frames = HandlerStack("worker", 7);
  py_->culprit = 1;
  py_->task = "queue-worker (worker)";
  Stall(65 * kMs);
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, startup);
  EXPECT_EQ(events[0].task, "");
  EXPECT_EQ(events[0].origin, 0u);  // a request's own block has no origin: it is the request

  engine_->end_request(startup);
  Advance(1 * kMs);
  Stall(65 * kMs);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, 0u);
  EXPECT_EQ(events[0].task, "queue-worker (worker)");
  EXPECT_EQ(events[0].stack, HandlerStack("worker", 7));
  EXPECT_EQ(events[0].origin, startup);  // who created the task: the Context it inherited

  // A request that ends during the stall (its block, then its response) is still its culprit,
  // even for samples taken after its end.
  const std::uint64_t request = engine_->begin_request("GET /block");
  py_->token = request;
  Advance(1 * kMs);
  LoopBusy();
  Step();
  Advance(55 * kMs);
  Step();
  engine_->end_request(request);
  Advance(10 * kMs);
  Step();
  LoopWaits();
  Step();
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, request);
  EXPECT_EQ(events[0].task, "");
}

// The GIL's address is known and the loop waits on another futex, while other threads keep the
// GIL so busy that the sampler is late: still a lock. Datasette: a cursor freed on the loop
// thread waits in sqlite3_reset for the connection's mutex, which a SQL thread holds while it
// runs the next query (and takes the GIL back for every row and progress callback).
TEST_F(EngineTest, KnownGilAndAnotherFutexIsALockEvenWhenTheSamplerIsLate) {
  os_->state = FutexWait(0xbad0);
  os_->running = {5151};
  py_->gil_futexes = {kGilAddress};
  py_->succeed = false;
  engine_->begin_request();
  Stall(65 * kMs);
  EXPECT_EQ(py_->thread_calls, 0);  // no GIL holder to look at: the loop does not wait for it
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kLock);
  EXPECT_TRUE(events[0].stack_missing);
}
#endif  // SYS_futex

// ---- GC and starvation ------------------------------------------------------------------------

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

// ---- Thinning ---------------------------------------------------------------------------------

// Thinning always keeps the newest sample, for odd and even max_samples: the live counters (split
// up to the newest sample) always reach the latest sample, so nothing is lost at the end.
TEST_F(EngineTest, ThinningKeepsTheNewestSample) {
  for (std::size_t max_samples : {2u, 3u, 4u, 5u}) {
    SCOPED_TRACE(max_samples);
    WatchdogConfig config;
    config.max_samples = max_samples;
    config.hang_threshold = 0;
    Make(config);
    const std::uint64_t token = engine_->begin_request();
    py_->token = token;
    const Nanos t0 = Now();
    LoopBusy();
    Step();
    Advance(50 * kMs);
    Nanos next = Step();
    std::uint64_t seen = engine_->stats().samples;
    ASSERT_EQ(seen, 1u);
    int thinned_checks = 0;
    while (Now() < t0 + 2000 * kMs) {
      ASSERT_GT(next, Now());
      clock_.set(next);
      next = Step();
      const std::uint64_t samples = engine_->stats().samples;
      ASSERT_EQ(samples, seen + 1);  // every step lands on a sample time
      seen = samples;
      EXPECT_EQ(engine_->request_counters(token).total, Now() - t0);
      if (samples > max_samples) ++thinned_checks;
    }
    EXPECT_GT(thinned_checks, 3);
    LoopWaits();
    Step();
    engine_->drain();
    engine_->end_request(token);
  }
}

// The newest sample is what ends an OS-detected stall (the loop back in epoll_wait); thinning
// triggered by that very sample must not drop it.
TEST_F(EngineTest, ThinningKeepsTheIdleSampleThatEndsAnOsDetectedStall) {
  for (std::size_t max_samples : {2u, 3u}) {
    SCOPED_TRACE(max_samples);
    WatchdogConfig config;
    config.max_samples = max_samples;
    config.hang_threshold = 0;
    Make(config);
    py_->token = engine_->begin_request();
    const Nanos t0 = Now();
    os_->loop_waiting = false;  // the OS notices; the pulse says nothing
    Nanos next = Step();
    while (engine_->stats().samples < max_samples) {
      ASSERT_GT(next, Now());
      ASSERT_LT(Now(), t0 + 1000 * kMs) << "no stall detected";
      clock_.set(next);
      next = Step();
    }
    ASSERT_EQ(engine_->stats().stalls, 1u);
    os_->loop_waiting = true;
    clock_.set(next);
    const Nanos idle_at = Now();
    next = Step();  // the idle sample overflows the buffer
    EXPECT_EQ(engine_->stats().samples, max_samples + 1);
    clock_.set(next);
    Step();
    const std::vector<Event> events = engine_->drain();
    ASSERT_EQ(events.size(), 1u);
    EXPECT_EQ(events[0].start, t0);
    EXPECT_EQ(events[0].duration, idle_at - t0);
    EXPECT_EQ(engine_->stats().samples, max_samples + 1);  // no sample after the idle one
  }
}

// ---- Known engine bugs (disabled until fixed; see the notes) ---------------------------------

// BUG (engine.cpp, step(): the pre-detection CPU reading is keyed on the pulse epoch only).
// With a silent pulse (uvloop heartbeat off, or a selector loop that cannot report) the epoch does
// not move between separate busy stretches the OS sees, so a stall takes the CPU reading of an
// earlier stretch, seconds old. A single-sample, fully CPU-bound stall then gets the CPU share
// (55 ms - 0) / 10.05 s instead of (55 ms - 5 ms) / 50 ms: cpu 0.28 ms instead of 52 ms.
TEST_F(EngineTest, OsDetectedStallUsesItsOwnPreDetectionCpuReading) {
  py_->token = engine_->begin_request();
  os_->cpu = 0;
  os_->loop_waiting = false;  // a short busy stretch the OS sees; the pulse says nothing
  Step();
  Advance(5 * kMs);
  os_->cpu = 5 * kMs;
  os_->loop_waiting = true;
  Step();
  Advance(10'000 * kMs);  // a long wait in the same epoch
  const Nanos t1 = Now();
  os_->loop_waiting = false;  // a CPU-bound block, again only the OS sees it
  Step();
  Advance(50 * kMs);
  os_->cpu = 55 * kMs;
  Step();  // the stall's only busy sample
  Advance(2 * kMs);
  os_->loop_waiting = true;
  Step();  // idle sample
  Step();  // ends the stall
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].start, t1);
  EXPECT_EQ(events[0].samples, 1u);
  EXPECT_EQ(events[0].duration, 52 * kMs);
  EXPECT_EQ(events[0].cpu, 52 * kMs);  // actual: 284435 ns
}

// BUG (engine.cpp, step() vs hang_report.cpp, report_hang()): with hang_threshold > 0 but
// hang_fd < 0, report_hang() returns before it sets stall_.hang, so step() keeps returning
// stall_.start + hang_threshold, a time in the past once the stall is older than that: the
// watchdog thread's wait becomes 0 and it spins at 100% CPU until the stall ends.
TEST_F(EngineTest, HangThresholdWithoutFdDoesNotSpin) {
  WatchdogConfig config;
  config.hang_threshold = 100 * kMs;
  config.hang_fd = -1;
  Make(config);
  LoopBusy();
  Step();
  Advance(50 * kMs);
  Step();
  for (int i = 0; i < 5; ++i) {
    Advance(10 * kMs);
    Step();
  }
  Advance(1 * kMs);          // 101 ms into the stall, between two samples
  EXPECT_GT(Step(), Now());  // actual: start + 100 ms
}

// ---- The loop is the unit: pause, thread exit, settle, the idle timer -------------------------

// loop.stop(): the stall in progress ends there and is delivered; what the thread does after the
// loop stopped (sync code between two runs) is not the loop's blocking, however long.
TEST_F(EngineTest, PauseEndsTheStallAndWatchesNothingUntilResume) {
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  const Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(60 * kMs);
  Step();  // a stall, sampled
  engine_->pause();
  EXPECT_TRUE(engine_->paused());
  Advance(1 * kMs);
  Step();
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].duration, 60 * kMs);
  EXPECT_EQ(events[0].start, t0);

  os_->loop_waiting = false;  // the thread runs something else, for seconds
  const int calls = py_->calls;
  for (int i = 0; i < 30; ++i) {
    Advance(100 * kMs);
    Step();
  }
  EXPECT_EQ(py_->calls, calls);
  EXPECT_EQ(engine_->stats().stalls, 1u);
  EXPECT_EQ(engine_->stats().hangs, 0u);
  EXPECT_TRUE(engine_->drain().empty());

  engine_->resume();  // the loop runs again, and blocks
  EXPECT_FALSE(engine_->paused());
  Step();
  Advance(60 * kMs);
  Step();
  EXPECT_EQ(engine_->stats().stalls, 2u);
}

// The loop's thread exited (a TestClient portal, a worker thread): silent for good, resume or not.
TEST_F(EngineTest, LoopThreadExitSilencesForGood) {
  engine_->begin_request();
  engine_->loop_thread_exited();
  engine_->resume();
  LoopBusy();
  for (int i = 0; i < 30; ++i) {
    Advance(100 * kMs);
    Step();
  }
  EXPECT_EQ(py_->calls, 0);
  EXPECT_EQ(engine_->stats().stalls, 0u);
}

// A loop iterating fast with nothing in flight keeps the watchdog on the interval tick, so it
// stops paying the kernel timer on every iteration; once it slows down, deep sleep again.
TEST_F(EngineTest, FastIterationsWithoutRequestsKeepTheWatchdogTicking) {
  WatchdogConfig config;
  config.grace = 1000 * kMs;
  Make(config);
  EXPECT_EQ(Step(), Now() + config.idle_tick);  // idle: deep sleep
  for (int i = 0; i < 1500; ++i) {
    LoopBusy();
    Advance(kMs / 2);
    LoopWaits();
    Advance(kMs / 5);
  }
  Advance(100 * kMs);
  EXPECT_EQ(Step(), Now() + config.interval);  // 1,500 iterations in 1.15 s: ticking
  Advance(2000 * kMs);                         // quiet since
  Step();
  Advance(1000 * kMs);
  EXPECT_EQ(Step(), Now() + config.idle_tick);
}

// Without a watchdog thread there is nobody to wait for: settle() says what the queue holds.
TEST_F(EngineTest, SettleWithoutAThreadReturnsAtOnce) {
  EXPECT_FALSE(engine_->unsettled());
  EXPECT_FALSE(engine_->settle());
  Stall(80 * kMs);
  EXPECT_TRUE(engine_->unsettled());
  EXPECT_TRUE(engine_->settle());
  EXPECT_EQ(engine_->drain().size(), 1u);
}

// The same engine with its real watchdog thread on the real clock (so the kernel timer is live).
// No assertion depends on timing: each waits, bounded, for a state that only the mechanism under
// test can produce.
class ThreadedEngineTest : public testing::Test {
 protected:
  void Make(WatchdogConfig config) {
    os_ = std::make_shared<FakeOs>();
    os_->state = Running();
    py_ = std::make_shared<FakePython>();
    py_->frames = HandlerStack("handler", 42);
    py_->culprit = 1;
    engine_ = std::make_unique<Engine>(config, ThresholdConfig{}, std::make_unique<FakeProbe>(os_),
                                       std::make_unique<FakeSampler>(py_));
    engine_->start();
  }
  void TearDown() override {
    if (engine_) engine_->stop();
  }
  // Waits up to 10 s for `done`; the bound only decides how long a failing test takes.
  static bool WaitFor(const std::function<bool()>& done) {
    for (int i = 0; i < 10'000; ++i) {
      if (done()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return done();
  }
  std::shared_ptr<FakeOs> os_;
  std::shared_ptr<FakePython> py_;
  std::unique_ptr<Engine> engine_;
};

// Nothing in flight and an idle tick of an hour: only the timer armed by wait_end() can wake the
// watchdog, and it does, for a block outside any request.
TEST_F(ThreadedEngineTest, KernelTimerSeesABlockOutsideRequests) {
  WatchdogConfig config;
  config.idle_tick = 3'600'000 * kMs;
  config.grace = 0;
  Make(config);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let it fall into deep sleep
  os_->loop_waiting = false;
  engine_->wait_end();  // the loop leaves select and stays busy
  EXPECT_TRUE(WaitFor([&] { return engine_->stats().stalls == 1; }));
  engine_->wait_begin();
  os_->loop_waiting = true;
  EXPECT_TRUE(WaitFor([&] { return engine_->stats().events_emitted == 1; }));
}

// The timer is armed only while the loop is out of select and the watchdog sleeps deeply, and
// going back to select disarms it, so short iterations never wake the watchdog.
TEST_F(ThreadedEngineTest, ShortIterationsDisarmTheTimer) {
  WatchdogConfig config;
  config.idle_tick = 3'600'000 * kMs;
  config.grace = 0;
  Make(config);
  EXPECT_TRUE(WaitFor([&] {
    engine_->wait_end();
    const bool armed = engine_->timer_armed();
    engine_->wait_begin();
    EXPECT_FALSE(engine_->timer_armed());
    return armed;
  }));
  engine_->begin_request();  // the watchdog is awake now: it looks for itself, no timer
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  engine_->wait_end();
  EXPECT_FALSE(engine_->timer_armed());
  engine_->wait_begin();
}

// settle(): the events of a stall in progress are in the queue when it returns, although the
// watchdog would not look again for an hour.
TEST_F(ThreadedEngineTest, SettleFinishesTheStallInProgress) {
  WatchdogConfig config;
  config.idle_tick = 3'600'000 * kMs;
  config.grace = 0;
  Make(config);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  os_->loop_waiting = false;
  engine_->wait_end();
  ASSERT_TRUE(WaitFor([&] { return engine_->stats().samples >= 2; }));
  EXPECT_TRUE(engine_->unsettled());
  os_->loop_waiting = true;
  EXPECT_TRUE(engine_->settle());
  EXPECT_EQ(engine_->drain().size(), 1u);
  EXPECT_FALSE(engine_->unsettled());
}

// The victims' delay with a real watchdog thread (the TSan run's case): the loop thread reads the
// live wait while the watchdog samples, then the culprit's end settles the stall first, and the
// counters handed back match the event exactly, for the culprit and its victim alike.
TEST_F(ThreadedEngineTest, WaitAndBlockMatchTheEventAcrossThreads) {
  Make(WatchdogConfig{});
  const std::uint64_t culprit = engine_->begin_request();
  const std::uint64_t victim = engine_->begin_request();
  py_->token = culprit;
  os_->loop_waiting = false;
  engine_->wait_end();
  Nanos live = 0;
  ASSERT_TRUE(WaitFor([&] {
    live = std::max(live, engine_->request_counters(victim).wait);
    return engine_->stats().samples >= 4;
  }));
  EXPECT_GE(live, 50 * kMs);  // the threshold had passed before the first sample
  ASSERT_TRUE(engine_->ends_stall(culprit));
  os_->loop_waiting = true;
  engine_->settle();  // what the extension does before ending the culprit
  RequestCounters last;
  EXPECT_FALSE(engine_->end_request(culprit, &last));
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(last.count, 1u);
  EXPECT_EQ(last.total, events[0].duration);
  EXPECT_EQ(last.wait, 0);
  engine_->end_request(victim, &last);
  EXPECT_EQ(last.wait, events[0].duration);
  EXPECT_EQ(last.count, 0u);
}

// watch_thread_exit() on a thread that then exits: the engine stops watching, and its watchdog
// thread ends (stop() finds nothing left to join).
TEST_F(ThreadedEngineTest, WatchedThreadExitEndsTheWatch) {
  WatchdogConfig config;
  Make(config);
  std::thread loop([&] { engine_->watch_thread_exit(); });
  loop.join();
  os_->loop_waiting = false;
  engine_->begin_request();
  engine_->wait_end();
  std::this_thread::sleep_for(std::chrono::milliseconds(150));  // three thresholds
  EXPECT_EQ(engine_->stats().stalls, 0u);
  EXPECT_EQ(py_->calls, 0);
}

// An engine destroyed before the thread it watched: the thread's exit touches nothing.
TEST_F(ThreadedEngineTest, ThreadOutlivingItsEngineIsHarmless) {
  WatchdogConfig config;
  Make(config);
  std::mutex m;
  std::condition_variable cv;
  bool registered = false, engine_gone = false;
  std::thread loop([&] {
    engine_->watch_thread_exit();
    std::unique_lock<std::mutex> lock(m);
    registered = true;
    cv.notify_all();
    cv.wait(lock, [&] { return engine_gone; });
  });
  {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return registered; });
  }
  engine_->stop();
  engine_.reset();
  {
    std::lock_guard<std::mutex> lock(m);
    engine_gone = true;
  }
  cv.notify_all();
  loop.join();  // under ASan, a use after free here would be reported
}

}  // namespace
}  // namespace loopguard
