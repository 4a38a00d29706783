#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "loopguard/clock.h"
#include "loopguard/histogram.h"

namespace loopguard {
namespace {

constexpr Nanos kUs = 1'000;
constexpr Nanos kSec = 1'000 * kMs;

// Expects `value` to be within `rel` (relative) of `expected`.
void ExpectNear(Nanos value, Nanos expected, double rel) {
  EXPECT_NEAR(static_cast<double>(value), static_cast<double>(expected),
              rel * static_cast<double>(expected))
      << "value " << value << " expected " << expected;
}

// Values spread log-uniformly over [lo, hi], plus every power of two and its neighbours, so that
// octave boundaries (where off-by-one-octave bugs live) are all visited.
std::vector<Nanos> ProbeValues(Nanos lo, Nanos hi) {
  std::vector<Nanos> out;
  for (double v = static_cast<double>(lo); v <= static_cast<double>(hi); v *= 1.013) {
    out.push_back(static_cast<Nanos>(v));
  }
  for (int e = 0; e < 40; ++e) {
    const Nanos p = Nanos{1} << e;
    for (Nanos v : {p - 1, p, p + 1}) {
      if (v >= lo && v <= hi) out.push_back(v);
    }
  }
  return out;
}

// The bucket of v must contain v: its upper edge is above it and the previous bucket's is not.
// And the edge overstates v by at most 1/16, the resolution the header promises from 1 us on.
TEST(LagHistogram, BucketEdgesWithinOneSixteenth) {
  for (Nanos v : ProbeValues(kUs, 10 * kSec)) {
    const int b = LagHistogram::bucket_of(v);
    ASSERT_GE(b, 0) << v;
    ASSERT_LT(b, LagHistogram::kBuckets) << v;
    const Nanos upper = LagHistogram::upper_edge(b);
    ASSERT_GT(upper, v) << "value " << v << " bucket " << b;
    if (b > 0) ASSERT_LE(LagHistogram::upper_edge(b - 1), v) << "value " << v << " bucket " << b;
    ASSERT_LE(static_cast<double>(upper - v), static_cast<double>(v) / 16.0)
        << "value " << v << " bucket " << b << " upper " << upper;
  }
}

// A larger value never lands in a smaller bucket, and edges grow with the bucket index.
TEST(LagHistogram, BucketsAndEdgesMonotonic) {
  int prev = LagHistogram::bucket_of(0);
  for (Nanos v = 1; v <= 4096; ++v) {  // dense over the sub-microsecond / first-octave seam
    const int b = LagHistogram::bucket_of(v);
    ASSERT_GE(b, prev) << v;
    prev = b;
  }
  for (double v = 4096.0; v <= 10.0 * kSec; v *= 1.05) {
    const int b = LagHistogram::bucket_of(static_cast<Nanos>(v));
    ASSERT_GE(b, prev) << v;
    prev = b;
  }
  for (int b = 1; b < LagHistogram::kBuckets; ++b) {
    ASSERT_GT(LagHistogram::upper_edge(b), LagHistogram::upper_edge(b - 1)) << b;
  }
}

// Negative lags (clock quirks) are clamped into the first bucket; huge ones into the last.
TEST(LagHistogram, OutOfRangeValuesClamp) {
  EXPECT_EQ(LagHistogram::bucket_of(-5), 0);
  EXPECT_EQ(LagHistogram::bucket_of(0), 0);
  EXPECT_EQ(LagHistogram::bucket_of(INT64_MAX), LagHistogram::kBuckets - 1);
  // The top octave (2^kMaxExp ns, ~73 min) still has its own 16 buckets, the last one ending at
  // 2^(kMaxExp + 1): nothing indexes past the array.
  const Nanos top = Nanos{1} << LagHistogram::kMaxExp;
  EXPECT_EQ(LagHistogram::bucket_of(top), LagHistogram::kBuckets - LagHistogram::kSub);
  EXPECT_EQ(LagHistogram::bucket_of(2 * top - 1), LagHistogram::kBuckets - 1);
  EXPECT_EQ(LagHistogram::upper_edge(LagHistogram::kBuckets - 1), 2 * top);
}

TEST(LagHistogram, EmptyGivesZero) {
  LagHistogram h;
  EXPECT_EQ(h.count(), 0u);
  EXPECT_EQ(h.percentile(0.5), 0);
  EXPECT_EQ(h.percentile(0.99), 0);
  EXPECT_EQ(h.max(), 0);
  EXPECT_EQ(h.sum(), 0);
}

// The shape that matters for a loop: mostly fast iterations and one long block. The median and
// p99 must stay at the typical lag and only the max shows the block.
TEST(LagHistogram, PercentilesOfOneOutlier) {
  LagHistogram h;
  for (int i = 0; i < 99; ++i) h.record(1 * kMs);
  h.record(500 * kMs);
  EXPECT_EQ(h.count(), 100u);
  EXPECT_EQ(h.sum(), 99 * kMs + 500 * kMs);
  EXPECT_EQ(h.max(), 500 * kMs);
  ExpectNear(h.percentile(0.5), 1 * kMs, 0.0625);
  ExpectNear(h.percentile(0.99), 1 * kMs, 0.0625);
  // The top rank is the outlier; the reported value is capped at the true max.
  EXPECT_EQ(h.percentile(1.0), 500 * kMs);
  EXPECT_GE(h.percentile(0.5), 1 * kMs);  // upper edge: never understates
}

// A uniform spread 1..100 ms: each percentile must land within one bucket of the exact answer.
TEST(LagHistogram, PercentilesOfUniformSpread) {
  LagHistogram h;
  for (int i = 1; i <= 100; ++i) h.record(i * kMs);
  ExpectNear(h.percentile(0.50), 50 * kMs, 0.0625);
  ExpectNear(h.percentile(0.90), 90 * kMs, 0.0625);
  ExpectNear(h.percentile(0.99), 99 * kMs, 0.0625);
  EXPECT_EQ(h.percentile(1.0), 100 * kMs);
  // q is clamped: below 0 is the smallest value's bucket, above 1 the max.
  ExpectNear(h.percentile(-1.0), 1 * kMs, 0.0625);
  EXPECT_EQ(h.percentile(2.0), 100 * kMs);
}

// Values between 1 us and 2 us: a region the sub-microsecond buckets must not swallow.
TEST(LagHistogram, PercentilesAroundOneMicrosecond) {
  LagHistogram h;
  for (int i = 0; i < 10; ++i) h.record(1500);
  ExpectNear(h.percentile(0.5), 1500, 0.0625);
  LagHistogram small;
  small.record(100);
  EXPECT_EQ(small.percentile(0.5), 100);  // capped at the max
}

TEST(LagHistogram, NegativeRecordedAsZero) {
  LagHistogram h;
  h.record(-10 * kMs);
  EXPECT_EQ(h.count(), 1u);
  EXPECT_EQ(h.sum(), 0);
  EXPECT_EQ(h.max(), 0);
  EXPECT_EQ(h.percentile(0.5), 0);
}

// Exporters read counts at their own bounds: each value counts at the first bound at or above it
// (within the 1/16 resolution), counts never decrease, and the last element is the total.
TEST(LagHistogram, CumulativeAtBounds) {
  LagHistogram h;
  for (Nanos v : {500 * kUs, 2 * kMs, 3 * kMs, 40 * kMs, 40 * kMs, 900 * kMs, 20 * kSec})
    h.record(v);
  const std::vector<Nanos> bounds{1 * kMs, 5 * kMs, 50 * kMs, 1 * kSec, 10 * kSec};
  const std::vector<std::uint64_t> got = h.cumulative(bounds);
  EXPECT_EQ(got, (std::vector<std::uint64_t>{1, 3, 5, 6, 6, 7}));
  EXPECT_EQ(got.back(), h.count());
  EXPECT_EQ(h.cumulative({}), (std::vector<std::uint64_t>{7}));
  // A value just below a bound, but in the bucket that straddles it, counts at the next bound.
  LagHistogram edge;
  edge.record(1 * kMs - 1);
  const std::vector<std::uint64_t> at_edge = edge.cumulative({1 * kMs, 2 * kMs});
  EXPECT_EQ(at_edge.back(), 1u);
  EXPECT_EQ(at_edge[1], 1u);
}

}  // namespace
}  // namespace loopguard
