// Log-linear histogram of loop lag (HDR style): each power of two is split into 16 linear
// sub-buckets, so any recorded value is known to within 1/16 (6.25%) from 1 us to about 1 hour, in
// a fixed 5 KiB. One writer (the loop thread) and any number of readers; counters are relaxed
// atomics because a reader only needs a consistent-enough snapshot for percentiles.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

#include "loopguard/clock.h"

namespace loopguard {

class LagHistogram {
 public:
  static constexpr int kSubBits = 4;
  static constexpr int kSub = 1 << kSubBits;
  static constexpr int kMinExp = 10;  // values below 2^10 ns (~1 us) share the first buckets
  static constexpr int kMaxExp = 42;  // ~73 minutes; larger values go to the last bucket
  // One group for [0, 2^kMinExp), then one per octave kMinExp..kMaxExp.
  static constexpr int kBuckets = (kMaxExp - kMinExp + 2) * kSub;

  void record(Nanos value) noexcept;
  // Value at quantile q (0..1): the upper edge of the bucket holding that rank.
  Nanos percentile(double q) const noexcept;
  std::uint64_t count() const noexcept { return count_.load(std::memory_order_relaxed); }
  Nanos max() const noexcept { return max_.load(std::memory_order_relaxed); }
  Nanos sum() const noexcept { return sum_.load(std::memory_order_relaxed); }
  // For exporters whose histograms have their own bounds (Prometheus): for each bound (ascending),
  // how many recorded values lie in buckets wholly at or below it, then the total as the last
  // element. A value within 1/16 below a bound may be counted at the next bound instead.
  std::vector<std::uint64_t> cumulative(const std::vector<Nanos>& bounds) const;

  static int bucket_of(Nanos value) noexcept;
  static Nanos upper_edge(int bucket) noexcept;

 private:
  std::array<std::atomic<std::uint64_t>, kBuckets> buckets_{};
  std::atomic<std::uint64_t> count_{0};
  std::atomic<Nanos> max_{0};
  std::atomic<Nanos> sum_{0};
};

}  // namespace loopguard
