#include "loopguard/cumulative.h"

#include <algorithm>

namespace loopguard {

std::optional<Event> CumulativeTracker::record(std::uint64_t token, Nanos start, Nanos end,
                                               Nanos stall_threshold) {
  const Nanos step = end - start;
  if (!config_.enabled || token == 0 || step <= 0 || step >= stall_threshold) return std::nullopt;
  Window& w = windows_[token];
  const Nanos width = std::max<Nanos>(1, config_.window / kBuckets);
  const std::int64_t bucket = end / width;
  if (bucket > w.newest) {
    // Clear every bucket between the newest written and this one: they left the window.
    const std::int64_t stale = std::min<std::int64_t>(bucket - w.newest, kBuckets);
    for (std::int64_t i = 0; i < stale; ++i) {
      const auto slot = static_cast<std::size_t>((bucket - i) % kBuckets);
      w.busy[slot] = 0;
      w.steps[slot] = 0;
      w.first[slot] = 0;
    }
    w.newest = bucket;
  }
  // A step ending in an older bucket than the newest (clocks are monotonic, so only by a
  // rounding at the edge) still counts in the newest: it is inside the window either way.
  const auto slot = static_cast<std::size_t>(w.newest % kBuckets);
  if (w.steps[slot] == 0) w.first[slot] = start;
  w.busy[slot] += step;
  ++w.steps[slot];

  Nanos busy = 0;
  std::uint32_t steps = 0;
  Nanos first = start;
  for (std::size_t i = 0; i < kBuckets; ++i) {
    if (w.steps[i] == 0) continue;
    busy += w.busy[i];
    steps += w.steps[i];
    first = std::min(first, w.first[i]);
  }
  if (busy < config_.threshold) return std::nullopt;

  Event ev;
  ev.token = token;
  ev.kind = Kind::kCumulative;
  ev.start = first;
  ev.duration = busy;
  ev.cpu = 0;  // not measured per step: timing a step costs two clock reads, its CPU two more
  ev.samples = steps;
  ev.stack_missing = true;
  windows_.erase(token);  // the next report needs a full threshold of new time
  return ev;
}

}  // namespace loopguard
