#include <gtest/gtest.h>

#include "loopguard/cumulative.h"

namespace loopguard {
namespace {

constexpr Nanos kStall = 50 * kMs;
constexpr Nanos kT0 = 1'000'000 * kMs;  // an arbitrary monotonic origin

// Steps of `step` length every `period`, starting at `from`; returns the first event, if any,
// and how many steps it took.
std::pair<std::optional<Event>, int> RunSteps(CumulativeTracker& t, std::uint64_t token, int count,
                                              Nanos step, Nanos period, Nanos from = kT0) {
  for (int i = 0; i < count; ++i) {
    const Nanos start = from + i * period;
    if (auto ev = t.record(token, start, start + step, kStall)) return {ev, i + 1};
  }
  return {std::nullopt, count};
}

// 40 slices of 8 ms with short awaits between them: reported once the window holds 200 ms.
TEST(Cumulative, ManyShortStepsAreReportedAtTheThreshold) {
  CumulativeTracker t({});
  const auto [ev, steps] = RunSteps(t, 7, 40, 8 * kMs, 10 * kMs);
  ASSERT_TRUE(ev.has_value());
  EXPECT_EQ(steps, 25);  // 25 x 8 ms = 200 ms
  EXPECT_EQ(ev->token, 7u);
  EXPECT_EQ(ev->kind, Kind::kCumulative);
  EXPECT_EQ(ev->duration, 200 * kMs);
  EXPECT_EQ(ev->samples, 25u);
  EXPECT_EQ(ev->start, kT0);
  EXPECT_TRUE(ev->stack_missing);
  EXPECT_EQ(t.tracked(), 0u);  // the window starts afresh
}

// The same time spread thinly (8 ms every 100 ms: 80 ms per second) never reaches it.
TEST(Cumulative, SpreadOutStepsAreNotReported) {
  CumulativeTracker t({});
  EXPECT_FALSE(RunSteps(t, 7, 200, 8 * kMs, 100 * kMs).first.has_value());
}

// A step as long as the stall threshold is the watchdog's event: not counted again here.
TEST(Cumulative, StallLengthStepsAreLeftToTheWatchdog) {
  CumulativeTracker t({});
  EXPECT_FALSE(RunSteps(t, 7, 10, kStall, kStall + kMs).first.has_value());
  EXPECT_EQ(t.tracked(), 0u);
  // Just below it counts.
  EXPECT_TRUE(RunSteps(t, 7, 10, kStall - 1, kStall + kMs).first.has_value());
}

// After a report only new time counts; a long-lived request is reported again for it.
TEST(Cumulative, ReportedTimeIsNotCountedTwice) {
  CumulativeTracker t({});
  const auto first = RunSteps(t, 7, 25, 8 * kMs, 10 * kMs);
  ASSERT_TRUE(first.first.has_value());
  const Nanos after = kT0 + 25 * 10 * kMs;
  const auto second = RunSteps(t, 7, 40, 8 * kMs, 10 * kMs, after);
  ASSERT_TRUE(second.first.has_value());
  EXPECT_EQ(second.second, 25);
  EXPECT_EQ(second.first->start, after);
}

// Requests are counted apart: an innocent one with a few steps beside the culprit is not blamed.
TEST(Cumulative, RequestsAreCountedApart) {
  CumulativeTracker t({});
  int reports_of_innocent = 0;
  std::optional<Event> culprit;
  for (int i = 0; i < 40; ++i) {
    const Nanos start = kT0 + i * 10 * kMs;
    if (auto ev = t.record(1, start, start + 8 * kMs, kStall); ev && !culprit) culprit = ev;
    if (t.record(2, start + 8 * kMs, start + 9 * kMs, kStall)) ++reports_of_innocent;
  }
  ASSERT_TRUE(culprit.has_value());
  EXPECT_EQ(culprit->token, 1u);
  EXPECT_EQ(reports_of_innocent, 0);
}

// Time older than the window falls out of it.
TEST(Cumulative, OldTimeLeavesTheWindow) {
  CumulativeTracker t({});
  EXPECT_FALSE(RunSteps(t, 7, 20, 8 * kMs, 10 * kMs).first.has_value());  // 160 ms
  // Two seconds later, 160 ms more: the first 160 ms are gone.
  EXPECT_FALSE(RunSteps(t, 7, 20, 8 * kMs, 10 * kMs, kT0 + 2000 * kMs).first.has_value());
  t.forget(7);
  EXPECT_EQ(t.tracked(), 0u);
}

TEST(Cumulative, DisabledOrWithoutRequestNothingIsCounted) {
  CumulativeConfig off;
  off.enabled = false;
  CumulativeTracker disabled(off);
  EXPECT_FALSE(RunSteps(disabled, 7, 40, 8 * kMs, 10 * kMs).first.has_value());
  CumulativeTracker t({});
  EXPECT_FALSE(RunSteps(t, 0, 40, 8 * kMs, 10 * kMs).first.has_value());
  EXPECT_EQ(t.tracked(), 0u);
}

TEST(Cumulative, ConfiguredThresholdAndWindow) {
  CumulativeConfig c;
  c.threshold = 50 * kMs;
  c.window = 100 * kMs;
  CumulativeTracker t(c);
  // 5 ms every 20 ms: 25 ms per 100 ms window, never 50.
  EXPECT_FALSE(RunSteps(t, 7, 50, 5 * kMs, 20 * kMs).first.has_value());
  // 5 ms every 8 ms: about 62 ms per window.
  const auto [ev, steps] = RunSteps(t, 8, 50, 5 * kMs, 8 * kMs);
  ASSERT_TRUE(ev.has_value());
  EXPECT_EQ(steps, 10);
  EXPECT_EQ(ev->duration, 50 * kMs);
}

}  // namespace
}  // namespace loopguard
