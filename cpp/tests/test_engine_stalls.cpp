// The engine driven by hand (EngineTest, see engine_test.h), over long and subtle stalls: samples
// thinned in a hang, stalls the OS noticed before the pulse did, the connections a stall keeps
// waiting, and a hang threshold without a report file.
#include <gtest/gtest.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

#include "engine_test.h"
#include "loopguard/engine.h"

namespace loopguard {
namespace {

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

// ---- Two engine bugs found by these tests, fixed since: kept so they stay fixed -------------

// Once, the pre-detection CPU reading was keyed on the pulse epoch only (engine.cpp, step()).
// With a silent pulse (uvloop heartbeat off, or a selector loop that cannot report) the epoch does
// not move between separate busy stretches the OS sees, so a stall took the CPU reading of an
// earlier stretch, seconds old. A single-sample, fully CPU-bound stall then got the CPU share
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
  EXPECT_EQ(events[0].cpu, 52 * kMs);  // the bug gave 284435 ns
}

// Once (engine.cpp, step() vs hang_report.cpp, report_hang()): with hang_threshold > 0 but
// hang_fd < 0, report_hang() returned before it set stall_.hang, so step() kept returning
// stall_.start + hang_threshold, a time in the past once the stall was older than that: the
// watchdog thread's wait became 0 and it spun at 100% CPU until the stall ended.
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
  EXPECT_GT(Step(), Now());  // the bug gave start + 100 ms
}

}  // namespace
}  // namespace loopguard
