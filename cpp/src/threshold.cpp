#include "loopguard/threshold.h"

#include <algorithm>
#include <cmath>

namespace loopguard {

Nanos percentile_of(std::vector<Nanos>& values, double q) {
  if (values.empty()) return 0;
  q = std::clamp(q, 0.0, 1.0);
  // Nearest rank: the smallest value with at least q of the samples at or below it.
  auto rank = static_cast<std::size_t>(std::ceil(q * static_cast<double>(values.size())));
  if (rank > 0) --rank;
  rank = std::min(rank, values.size() - 1);
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(rank),
                   values.end());
  return values[rank];
}

Threshold::Threshold(const ThresholdConfig& config) : config_(config), current_(config.fallback) {
  if (config_.adaptive) {
    window_.assign(std::max<std::size_t>(config_.window, 1), 0);
    scratch_.reserve(window_.size());
  }
}

void Threshold::publish(Nanos baseline) {
  baseline_.store(baseline, std::memory_order_relaxed);
  const auto scaled = static_cast<Nanos>(static_cast<double>(baseline) * config_.multiplier);
  current_.store(std::max(scaled, config_.fallback), std::memory_order_relaxed);
}

void Threshold::calibrate(std::vector<Nanos> lags) {
  // A lag at or over the fallback is a block, which the guard reports as one, not the loop's
  // jitter. Counted, the blocks of an app that blocks right at start (a server's first requests
  // fall into calibration) became the median and raised the threshold above those very blocks,
  // silencing every later one of that size. With none left, the fallback stays.
  lags.erase(std::remove_if(lags.begin(), lags.end(),
                            [this](Nanos lag) { return lag >= config_.fallback; }),
             lags.end());
  for (auto& lag : lags) lag = std::max<Nanos>(lag, 0);
  if (!lags.empty()) publish(percentile_of(lags, 0.5));
  calibrated_.store(true, std::memory_order_relaxed);
}

void Threshold::record(Nanos lag, Nanos now) {
  if (!config_.adaptive) return;
  window_[next_] = std::max<Nanos>(lag, 0);
  next_ = (next_ + 1) % window_.size();
  if (filled_ < window_.size()) ++filled_;
  if (filled_ < config_.min_samples || now < next_update_) return;
  next_update_ = now + config_.update_interval;
  scratch_.assign(window_.begin(), window_.begin() + static_cast<std::ptrdiff_t>(filled_));
  publish(percentile_of(scratch_, config_.percentile));
}

}  // namespace loopguard
