// The blocking threshold: max(baseline x multiplier, fallback), as the seed README defines it.
//
// The baseline comes from calibration at start-up (the median of the measured loop lags under the
// fallback: a lag over it is a block, not jitter) and, in
// adaptive mode, from a percentile of a sliding window of recent loop lags, recomputed every
// update interval once enough samples exist. Writers are the loop thread only; the watchdog reads
// the current value through an atomic.
#pragma once

#include <atomic>
#include <cstddef>
#include <vector>

#include "loopguard/clock.h"

namespace loopguard {

struct ThresholdConfig {
  double multiplier = 5.0;
  Nanos fallback = 50 * kMs;
  bool adaptive = false;
  std::size_t window = 1000;
  double percentile = 0.95;
  std::size_t min_samples = 100;
  Nanos update_interval = 1000 * kMs;
};

// The value at quantile q (0..1) of `values`, by nearest rank. Reorders `values`.
Nanos percentile_of(std::vector<Nanos>& values, double q);

class Threshold {
 public:
  explicit Threshold(const ThresholdConfig& config);

  // Sets the baseline from calibration lags: the median of those under the fallback.
  void calibrate(std::vector<Nanos> lags);

  // Feeds one loop-lag sample; in adaptive mode recomputes the baseline when an update is due.
  void record(Nanos lag, Nanos now);

  Nanos current() const noexcept { return current_.load(std::memory_order_relaxed); }
  Nanos baseline() const noexcept { return baseline_.load(std::memory_order_relaxed); }
  bool calibrated() const noexcept { return calibrated_.load(std::memory_order_relaxed); }
  std::size_t window_samples() const noexcept { return filled_; }
  const ThresholdConfig& config() const noexcept { return config_; }

 private:
  void publish(Nanos baseline);

  const ThresholdConfig config_;
  std::vector<Nanos> window_;
  std::vector<Nanos> scratch_;
  std::size_t next_ = 0;
  std::size_t filled_ = 0;
  Nanos next_update_ = 0;
  std::atomic<Nanos> current_;
  std::atomic<Nanos> baseline_{0};
  std::atomic<bool> calibrated_{false};
};

}  // namespace loopguard
