#include "loopguard/histogram.h"

#include <algorithm>
#include <cmath>

namespace loopguard {

int LagHistogram::bucket_of(Nanos value) noexcept {
  if (value < (Nanos{1} << kMinExp)) {
    // Below the first octave: spread linearly over the sub-buckets of group 0.
    const Nanos v = std::max<Nanos>(value, 0);
    return static_cast<int>(v >> (kMinExp - kSubBits));
  }
  const int exp = 63 - __builtin_clzll(static_cast<unsigned long long>(value));
  if (exp > kMaxExp) return kBuckets - 1;
  const int sub = static_cast<int>((value >> (exp - kSubBits)) & (kSub - 1));
  // Group 0 holds the values below 2^kMinExp, so octave kMinExp starts at group 1.
  return (exp - kMinExp + 1) * kSub + sub;
}

Nanos LagHistogram::upper_edge(int bucket) noexcept {
  const int exp = kMinExp + bucket / kSub - 1;
  const int sub = bucket % kSub;
  if (bucket < kSub) return (Nanos{sub} + 1) << (kMinExp - kSubBits);
  return (Nanos{1} << exp) + ((Nanos{sub} + 1) << (exp - kSubBits));
}

void LagHistogram::record(Nanos value) noexcept {
  value = std::max<Nanos>(value, 0);
  buckets_[static_cast<std::size_t>(bucket_of(value))].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
  if (value > max_.load(std::memory_order_relaxed)) max_.store(value, std::memory_order_relaxed);
}

Nanos LagHistogram::percentile(double q) const noexcept {
  std::uint64_t total = 0;
  for (const auto& b : buckets_) total += b.load(std::memory_order_relaxed);
  if (total == 0) return 0;
  q = std::clamp(q, 0.0, 1.0);
  const auto rank = std::max<std::uint64_t>(
      1, static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(total))));
  std::uint64_t seen = 0;
  for (int i = 0; i < kBuckets; ++i) {
    seen += buckets_[static_cast<std::size_t>(i)].load(std::memory_order_relaxed);
    if (seen >= rank) return std::min(upper_edge(i), max());
  }
  return max();
}

std::vector<std::uint64_t> LagHistogram::cumulative(const std::vector<Nanos>& bounds) const {
  std::vector<std::uint64_t> out(bounds.size() + 1, 0);
  std::uint64_t seen = 0;
  std::size_t next = 0;
  for (int i = 0; i < kBuckets; ++i) {
    // Bucket i holds values up to upper_edge(i) - 1: close every bound it would cross.
    while (next < bounds.size() && upper_edge(i) - 1 > bounds[next]) out[next++] = seen;
    seen += buckets_[static_cast<std::size_t>(i)].load(std::memory_order_relaxed);
  }
  while (next < bounds.size()) out[next++] = seen;
  out.back() = seen;
  return out;
}

}  // namespace loopguard
