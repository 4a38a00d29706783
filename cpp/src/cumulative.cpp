#include "loopguard/cumulative.h"

#include <algorithm>

namespace loopguard {

StepVerdict CumulativeTracker::record(std::uint64_t token, Nanos start, Nanos end, Nanos cpu,
                                      Nanos stall_threshold, Event& out) {
  const Nanos wall = end - start;
  if (!config_.enabled || token == 0 || start < 0 || wall <= 0 || wall >= stall_threshold) {
    return StepVerdict::kNone;
  }
  // Wall time counts everything that held the loop (CPU, sleep, I/O), but also waits for the GIL
  // and for a CPU, which another thread or process caused. Once a request looks suspect its steps
  // are measured on the thread's CPU clock as well and count only what they really ran.
  const bool measured = cpu >= 0;
  const Nanos counted = measured ? std::min(cpu, wall) : wall;

  Window& w = windows_[token];
  const Nanos width = std::max<Nanos>(1, config_.window / kBuckets);
  const std::int64_t bucket = end / width;
  if (bucket > w.newest) {
    // Clear every bucket between the newest written and this one: they left the window.
    const std::int64_t stale = std::min<std::int64_t>(bucket - w.newest, kBuckets);
    for (std::int64_t i = 0; i < stale; ++i) {
      const auto slot = static_cast<std::size_t>((bucket - i) % kBuckets);
      w.busy[slot] = 0;
      w.measured[slot] = 0;
      w.steps[slot] = 0;
      w.first[slot] = 0;
    }
    w.newest = bucket;
  }
  // One request's steps end in increasing time, so `newest` is this step's bucket.
  const auto slot = static_cast<std::size_t>(w.newest % kBuckets);
  if (w.steps[slot] == 0) w.first[slot] = start;
  w.busy[slot] += counted;
  if (measured) w.measured[slot] += counted;
  ++w.steps[slot];

  Nanos busy = 0;
  Nanos on_cpu_clock = 0;
  std::uint32_t steps = 0;
  Nanos first = start;
  for (std::size_t i = 0; i < kBuckets; ++i) {
    if (w.steps[i] == 0) continue;
    busy += w.busy[i];
    on_cpu_clock += w.measured[i];
    steps += w.steps[i];
    first = std::min(first, w.first[i]);
  }
  // Reported only when at least half of the threshold was measured on the CPU clock (wall time
  // alone could be another thread's doing), and never for a single step: one block below the
  // stall threshold is what the user chose not to call blocking.
  if (busy >= config_.threshold && steps >= 2 && 2 * on_cpu_clock >= config_.threshold) {
    out = Event{};
    out.token = token;
    out.kind = Kind::kCumulative;
    out.start = first;
    out.duration = busy;
    out.cpu = on_cpu_clock;
    out.samples = steps;
    out.stack_missing = true;
    windows_.erase(token);  // the next report needs a full threshold of new time
    return StepVerdict::kReport;
  }
  if (2 * busy >= config_.threshold) return StepVerdict::kMeasureCpu;
  return StepVerdict::kNone;
}

}  // namespace loopguard
