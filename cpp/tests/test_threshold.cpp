#include <gtest/gtest.h>

#include <vector>

#include "loopguard/clock.h"
#include "loopguard/threshold.h"

namespace loopguard {
namespace {

// ---- percentile_of -----------------------------------------------------------------------------

// Nearest rank: the smallest value with at least q of the samples at or below it; the input order
// must not matter.
TEST(PercentileOf, NearestRank) {
  const std::vector<Nanos> base{50, 10, 40, 20, 30};
  auto at = [&](double q) {
    std::vector<Nanos> v = base;
    return percentile_of(v, q);
  };
  EXPECT_EQ(at(0.0), 10);
  EXPECT_EQ(at(0.2), 10);   // rank ceil(1.0) = 1
  EXPECT_EQ(at(0.21), 20);  // rank ceil(1.05) = 2
  EXPECT_EQ(at(0.5), 30);   // rank ceil(2.5) = 3
  EXPECT_EQ(at(0.8), 40);
  EXPECT_EQ(at(0.95), 50);  // rank ceil(4.75) = 5
  EXPECT_EQ(at(1.0), 50);
  EXPECT_EQ(at(-3.0), 10);  // q clamped to [0, 1]
  EXPECT_EQ(at(7.0), 50);
}

TEST(PercentileOf, EvenCountMedianIsLowerMiddle) {
  std::vector<Nanos> v{4, 1, 3, 2};
  EXPECT_EQ(percentile_of(v, 0.5), 2);
}

TEST(PercentileOf, EmptyAndSingle) {
  std::vector<Nanos> empty;
  EXPECT_EQ(percentile_of(empty, 0.5), 0);
  std::vector<Nanos> one{42};
  EXPECT_EQ(percentile_of(one, 0.0), 42);
  EXPECT_EQ(percentile_of(one, 0.99), 42);
}

// ---- calibration -------------------------------------------------------------------------------

// Before calibration the fallback is the threshold and there is no baseline.
TEST(Threshold, StartsAtFallback) {
  ThresholdConfig cfg;
  cfg.fallback = 40 * kMs;
  Threshold t(cfg);
  EXPECT_EQ(t.current(), 40 * kMs);
  EXPECT_EQ(t.baseline(), 0);
  EXPECT_FALSE(t.calibrated());
}

// threshold = max(median x multiplier, fallback): a quiet loop keeps the fallback as the floor.
TEST(Threshold, CalibrateFallbackWinsOnQuietLoop) {
  ThresholdConfig cfg;
  cfg.multiplier = 5.0;
  cfg.fallback = 50 * kMs;
  Threshold t(cfg);
  t.calibrate({5 * kMs, 1 * kMs, 3 * kMs, 2 * kMs, 4 * kMs});
  EXPECT_TRUE(t.calibrated());
  EXPECT_EQ(t.baseline(), 3 * kMs);  // the median, not the mean or the max
  EXPECT_EQ(t.current(), 50 * kMs);  // 15 ms < 50 ms
}

// A loop that is slow by nature scales the threshold up, so its normal lag is not a "block".
TEST(Threshold, CalibrateMedianTimesMultiplierWinsOnSlowLoop) {
  ThresholdConfig cfg;
  cfg.multiplier = 5.0;
  cfg.fallback = 50 * kMs;
  Threshold t(cfg);
  // One huge outlier must not move the median.
  t.calibrate({20 * kMs, 18 * kMs, 22 * kMs, 20 * kMs, 900 * kMs});
  EXPECT_EQ(t.baseline(), 20 * kMs);
  EXPECT_EQ(t.current(), 100 * kMs);
}

// Lags over the fallback are blocks: an app whose first requests block while calibration runs
// must not lift the threshold above its own blocks (6 of 10 samples were 150 ms: threshold 730 ms).
TEST(Threshold, CalibrateLeavesBlocksOut) {
  ThresholdConfig cfg;
  cfg.multiplier = 5.0;
  cfg.fallback = 50 * kMs;
  Threshold t(cfg);
  t.calibrate({150 * kMs, 310 * kMs, 2 * kMs, 190 * kMs, 150 * kMs, 1 * kMs, 150 * kMs, 50 * kMs,
               150 * kMs, 3 * kMs});
  EXPECT_TRUE(t.calibrated());
  EXPECT_EQ(t.baseline(), 2 * kMs);
  EXPECT_EQ(t.current(), 50 * kMs);
}

// Nothing but blocks: no baseline can be learned, the fallback stays.
TEST(Threshold, CalibrateOfOnlyBlocksKeepsTheFallback) {
  ThresholdConfig cfg;
  cfg.fallback = 50 * kMs;
  Threshold t(cfg);
  t.calibrate({60 * kMs, 400 * kMs});
  EXPECT_TRUE(t.calibrated());
  EXPECT_EQ(t.baseline(), 0);
  EXPECT_EQ(t.current(), 50 * kMs);
}

TEST(Threshold, CalibrateClampsNegativeLags) {
  ThresholdConfig cfg;
  cfg.multiplier = 2.0;
  cfg.fallback = 1;
  Threshold t(cfg);
  t.calibrate({-5 * kMs, -5 * kMs, -5 * kMs, 10 * kMs});
  EXPECT_EQ(t.baseline(), 0);
  EXPECT_EQ(t.current(), 1);
}

// Without adaptive mode, record() never moves the threshold.
TEST(Threshold, RecordIgnoredWhenNotAdaptive) {
  ThresholdConfig cfg;
  cfg.adaptive = false;
  cfg.min_samples = 1;
  cfg.update_interval = 0;
  cfg.fallback = 1 * kMs;
  Threshold t(cfg);
  for (int i = 0; i < 50; ++i) t.record(100 * kMs, 1000 * kMs + i);
  EXPECT_EQ(t.current(), 1 * kMs);
  EXPECT_EQ(t.baseline(), 0);
  EXPECT_EQ(t.window_samples(), 0u);
}

// ---- adaptive mode -----------------------------------------------------------------------------

ThresholdConfig Adaptive() {
  ThresholdConfig cfg;
  cfg.adaptive = true;
  cfg.multiplier = 2.0;
  cfg.fallback = 1 * kMs;
  cfg.window = 4;
  cfg.min_samples = 3;
  cfg.percentile = 0.75;
  cfg.update_interval = 100 * kMs;
  return cfg;
}

// A handful of samples says nothing about the loop: wait for min_samples.
TEST(ThresholdAdaptive, NoChangeBeforeMinSamples) {
  Threshold t(Adaptive());
  const Nanos now = 1000 * kMs;
  t.record(10 * kMs, now);
  t.record(10 * kMs, now + 1);
  EXPECT_EQ(t.window_samples(), 2u);
  EXPECT_EQ(t.baseline(), 0);
  EXPECT_EQ(t.current(), 1 * kMs);
  t.record(10 * kMs, now + 2);  // the third sample reaches min_samples
  EXPECT_EQ(t.baseline(), 10 * kMs);
  EXPECT_EQ(t.current(), 20 * kMs);
}

// Recomputing on every sample would be wasted work on the loop thread: once per interval only.
TEST(ThresholdAdaptive, RecomputesOnlyAfterUpdateInterval) {
  Threshold t(Adaptive());
  const Nanos t0 = 1000 * kMs;
  for (int i = 0; i < 3; ++i) t.record(10 * kMs, t0);
  ASSERT_EQ(t.baseline(), 10 * kMs);
  t.record(30 * kMs, t0 + 50 * kMs);
  t.record(30 * kMs, t0 + 99 * kMs);
  EXPECT_EQ(t.baseline(), 10 * kMs);  // not yet due
  t.record(30 * kMs, t0 + 100 * kMs);
  // The window holds {30, 30, 10, 30} (two oldest 10s overwritten): p75 by nearest rank = 30 ms.
  // (A premature recompute at +99 ms would already have given 30 ms from {30, 10, 10, 30}.)
  EXPECT_EQ(t.baseline(), 30 * kMs);
  EXPECT_EQ(t.current(), 60 * kMs);
}

// The configured percentile is used, not the median.
TEST(ThresholdAdaptive, UsesConfiguredPercentile) {
  ThresholdConfig cfg = Adaptive();
  cfg.window = 10;
  cfg.min_samples = 10;
  cfg.percentile = 0.9;
  Threshold t(cfg);
  for (int i = 1; i <= 10; ++i) t.record(i * kMs, 1000 * kMs);
  EXPECT_EQ(t.baseline(), 9 * kMs);  // nearest rank ceil(9.0) = 9
  EXPECT_EQ(t.current(), 18 * kMs);
}

// Old samples fall out of the window, so the threshold follows a loop that became faster.
TEST(ThresholdAdaptive, WindowSlides) {
  ThresholdConfig cfg = Adaptive();
  cfg.percentile = 1.0;  // the window's max: any 40 ms sample left in it would show
  Threshold t(cfg);
  Nanos now = 1000 * kMs;
  for (int i = 0; i < 4; ++i) t.record(40 * kMs, now);
  ASSERT_EQ(t.baseline(), 40 * kMs);
  for (int i = 0; i < 3; ++i) {
    now += 100 * kMs;
    t.record(2 * kMs, now);
  }
  EXPECT_EQ(t.baseline(), 40 * kMs);  // one 40 ms sample is still in the window of 4
  now += 100 * kMs;
  t.record(2 * kMs, now);
  EXPECT_EQ(t.window_samples(), 4u);  // bounded by the window size
  EXPECT_EQ(t.baseline(), 2 * kMs);   // the last 40 ms sample is gone
  EXPECT_EQ(t.current(), 4 * kMs);
}

// The fallback still floors the adaptive value.
TEST(ThresholdAdaptive, FallbackFloor) {
  ThresholdConfig cfg = Adaptive();
  cfg.fallback = 50 * kMs;
  Threshold t(cfg);
  for (int i = 0; i < 3; ++i) t.record(1 * kMs, 1000 * kMs);
  EXPECT_EQ(t.baseline(), 1 * kMs);
  EXPECT_EQ(t.current(), 50 * kMs);
}

}  // namespace
}  // namespace loopguard
