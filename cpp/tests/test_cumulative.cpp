#include <gtest/gtest.h>

#include <optional>

#include "loopguard/cumulative.h"

namespace loopguard {
namespace {

constexpr Nanos kStall = 50 * kMs;
constexpr Nanos kT0 = 1'000'000 * kMs;  // an arbitrary monotonic origin

struct Result {
  std::optional<Event> event;  // the first event
  int steps = 0;               // steps recorded until it (all of them without one)
  int measured_from = -1;      // the step after which the tracker asked for CPU time
};

// `count` steps of `wall` every `period` from `from`, each really running `cpu` on the thread's
// CPU clock; like the middleware, CPU time is passed only once the tracker asks for it.
Result RunSteps(CumulativeTracker& t, std::uint64_t token, int count, Nanos wall, Nanos period,
                Nanos from = kT0, Nanos cpu = -1) {
  if (cpu < 0) cpu = wall;
  Result r;
  for (int i = 0; i < count; ++i) {
    const Nanos start = from + i * period;
    Event ev;
    const bool measure = r.measured_from >= 0;
    const StepVerdict v = t.record(token, start, start + wall, measure ? cpu : -1, kStall, ev);
    r.steps = i + 1;
    if (v == StepVerdict::kReport) {
      r.event = ev;
      return r;
    }
    if (v == StepVerdict::kMeasureCpu && !measure) r.measured_from = i + 1;
  }
  return r;
}

// 40 slices of 8 ms with short awaits between them: reported once the window holds 200 ms.
TEST(Cumulative, ManyShortStepsAreReportedAtTheThreshold) {
  CumulativeTracker t({});
  const Result r = RunSteps(t, 7, 40, 8 * kMs, 10 * kMs);
  ASSERT_TRUE(r.event.has_value());
  EXPECT_EQ(r.measured_from, 13);  // 13 x 8 ms = 104 ms: half the threshold, suspect
  // 200 ms after 25 steps, but only 12 of them measured on the CPU clock (96 ms, under half):
  // one more step.
  EXPECT_EQ(r.steps, 26);
  EXPECT_EQ(r.event->token, 7u);
  EXPECT_EQ(r.event->kind, Kind::kCumulative);
  EXPECT_EQ(r.event->duration, 208 * kMs);
  EXPECT_EQ(r.event->cpu, 13 * 8 * kMs);
  EXPECT_EQ(r.event->samples, 26u);
  EXPECT_EQ(r.event->start, kT0);
  EXPECT_TRUE(r.event->stack_missing);
  EXPECT_EQ(t.tracked(), 0u);  // the window starts afresh
}

// Steps that are long on the wall clock but short on the CPU clock waited for the GIL or a CPU
// (another thread's doing): once measured they count for what they ran, and nothing is reported.
TEST(Cumulative, WaitingIsNotBlockingOnceMeasured) {
  CumulativeTracker t({});
  const Result r = RunSteps(t, 7, 200, 8 * kMs, 10 * kMs, kT0, 500 * 1000);
  EXPECT_FALSE(r.event.has_value());
  EXPECT_EQ(r.measured_from, 13);
}

// The same time spread thinly (8 ms every 100 ms: 80 ms per second) never reaches it.
TEST(Cumulative, SpreadOutStepsAreNotReported) {
  CumulativeTracker t({});
  const Result r = RunSteps(t, 7, 200, 8 * kMs, 100 * kMs);
  EXPECT_FALSE(r.event.has_value());
  EXPECT_EQ(r.measured_from, -1);
}

// A step as long as the stall threshold is the watchdog's event: not counted again here.
TEST(Cumulative, StallLengthStepsAreLeftToTheWatchdog) {
  CumulativeTracker t({});
  EXPECT_FALSE(RunSteps(t, 7, 10, kStall, kStall + kMs).event.has_value());
  EXPECT_EQ(t.tracked(), 0u);
  // Just below it counts.
  EXPECT_TRUE(RunSteps(t, 7, 10, kStall - 1, kStall + kMs).event.has_value());
}

// One step is never cumulative, even when the stall threshold is above the cumulative one.
TEST(Cumulative, OneStepAloneIsNeverReported) {
  CumulativeTracker t({});
  Event ev;
  EXPECT_EQ(t.record(7, kT0, kT0 + 300 * kMs, 300 * kMs, 500 * kMs, ev), StepVerdict::kMeasureCpu);
  EXPECT_EQ(t.record(7, kT0 + 310 * kMs, kT0 + 311 * kMs, kMs, 500 * kMs, ev),
            StepVerdict::kReport);
  EXPECT_EQ(ev.samples, 2u);
}

// After a report only new time counts; a long-lived request is reported again for it.
TEST(Cumulative, ReportedTimeIsNotCountedTwice) {
  CumulativeTracker t({});
  ASSERT_TRUE(RunSteps(t, 7, 26, 8 * kMs, 10 * kMs).event.has_value());
  const Nanos after = kT0 + 26 * 10 * kMs;
  const Result second = RunSteps(t, 7, 40, 8 * kMs, 10 * kMs, after);
  ASSERT_TRUE(second.event.has_value());
  EXPECT_EQ(second.steps, 26);
  EXPECT_EQ(second.event->start, after);
}

// Requests are counted apart: an innocent one with a few steps beside the culprit is not blamed.
TEST(Cumulative, RequestsAreCountedApart) {
  CumulativeTracker t({});
  int innocent_verdicts = 0;
  std::optional<Event> culprit;
  bool measure = false;
  for (int i = 0; i < 40 && !culprit; ++i) {
    const Nanos start = kT0 + i * 10 * kMs;
    Event ev;
    const StepVerdict v = t.record(1, start, start + 8 * kMs, measure ? 8 * kMs : -1, kStall, ev);
    if (v == StepVerdict::kReport) culprit = ev;
    measure |= v == StepVerdict::kMeasureCpu;
    if (t.record(2, start + 8 * kMs, start + 9 * kMs, -1, kStall, ev) != StepVerdict::kNone)
      ++innocent_verdicts;
  }
  ASSERT_TRUE(culprit.has_value());
  EXPECT_EQ(culprit->token, 1u);
  EXPECT_EQ(innocent_verdicts, 0);
}

// Time older than the window falls out of it.
TEST(Cumulative, OldTimeLeavesTheWindow) {
  CumulativeTracker t({});
  EXPECT_FALSE(RunSteps(t, 7, 20, 8 * kMs, 10 * kMs).event.has_value());  // 160 ms
  // Two seconds later, 160 ms more: the first 160 ms are gone.
  EXPECT_FALSE(RunSteps(t, 7, 20, 8 * kMs, 10 * kMs, kT0 + 2000 * kMs).event.has_value());
  t.forget(7);
  EXPECT_EQ(t.tracked(), 0u);
}

TEST(Cumulative, DisabledWithoutRequestOrBeforeTheEpochNothingIsCounted) {
  CumulativeConfig off;
  off.enabled = false;
  CumulativeTracker disabled(off);
  EXPECT_FALSE(RunSteps(disabled, 7, 40, 8 * kMs, 10 * kMs).event.has_value());
  CumulativeTracker t({});
  EXPECT_FALSE(RunSteps(t, 0, 40, 8 * kMs, 10 * kMs).event.has_value());
  EXPECT_FALSE(RunSteps(t, 7, 40, 8 * kMs, 10 * kMs, -kT0).event.has_value());
  EXPECT_EQ(t.tracked(), 0u);
}

TEST(Cumulative, ConfiguredThresholdAndWindow) {
  CumulativeConfig c;
  c.threshold = 50 * kMs;
  c.window = 100 * kMs;
  CumulativeTracker t(c);
  // 5 ms every 20 ms: 25 ms per 100 ms window, never 50.
  EXPECT_FALSE(RunSteps(t, 7, 50, 5 * kMs, 20 * kMs).event.has_value());
  // 5 ms every 8 ms: about 62 ms per window.
  const Result r = RunSteps(t, 8, 50, 5 * kMs, 8 * kMs);
  ASSERT_TRUE(r.event.has_value());
  EXPECT_EQ(r.steps, 10);
  EXPECT_EQ(r.event->duration, 50 * kMs);
}

}  // namespace
}  // namespace loopguard
