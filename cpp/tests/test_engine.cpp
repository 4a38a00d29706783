// The engine driven by hand (EngineTest, see engine_test.h): a stall detected, sampled and split
// into events; the heartbeat; the watchdog's schedule; stats; the sampler timing out.
#include <gtest/gtest.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

#include "engine_test.h"
#include "loopguard/engine.h"

namespace loopguard {
namespace {

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

// When the loop never drains, events beyond the queue's capacity are dropped and counted.
TEST_F(EngineTest, QueueOverflowCountsDrops) {
  WatchdogConfig config;
  config.queue_capacity = 2;
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

}  // namespace
}  // namespace loopguard
