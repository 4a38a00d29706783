// "Death by a thousand cuts": a request whose coroutine keeps the loop busy in many steps, each
// too short to be a stall, but together a large share of the loop's time.
//
// The middleware times every step of a request's own coroutine (from the loop resuming it to it
// suspending again) and hands the step here. Steps as long as the stall threshold are left out:
// the watchdog sees those as stalls and reports them itself. (A shorter step can still be part
// of a stall made of several callbacks; such a stall is only an event for a culprit whose own
// part reached the threshold, so it is rarely counted in both.) The rest is summed per request
// over a sliding window; when the sum reaches the threshold, one event is reported and the
// window starts afresh, so a long-lived request (a websocket, a stream) is reported again only
// for new time.
#pragma once

#include <array>
#include <cstdint>
#include <unordered_map>

#include "loopguard/clock.h"
#include "loopguard/event.h"

namespace loopguard {

struct CumulativeConfig {
  bool enabled = true;
  Nanos threshold = 200 * kMs;  // busy time within one window that is reported
  Nanos window = 1000 * kMs;
};

enum class StepVerdict : int {
  kNone = 0,
  kMeasureCpu = 1,  // the request looks suspect: pass its steps' CPU time from now on
  kReport = 2,      // the step completed a cumulative event
};

// Loop thread only: steps are recorded, and requests forgotten, by the loop thread.
class CumulativeTracker {
 public:
  explicit CumulativeTracker(CumulativeConfig config) : config_(config) {}

  // One step of `token`'s coroutine ran from `start` to `end` (monotonic), using `cpu` of the
  // thread's CPU clock (-1: not measured). On kReport, `out` holds the event. It has no stack:
  // the caller knows where the coroutine is suspended now, the only place left to point at.
  StepVerdict record(std::uint64_t token, Nanos start, Nanos end, Nanos cpu, Nanos stall_threshold,
                     Event& out);
  void forget(std::uint64_t token) { windows_.erase(token); }
  std::size_t tracked() const noexcept { return windows_.size(); }

 private:
  // Fixed memory per request: the window is cut into buckets by step end time; a bucket that
  // falls out of the window is cleared before it is reused. The sum covers between
  // window - window/kBuckets and window.
  static constexpr int kBuckets = 16;
  struct Window {
    std::array<Nanos, kBuckets> busy{};
    std::array<Nanos, kBuckets> measured{};  // the part counted from the CPU clock
    std::array<Nanos, kBuckets> first{};     // start of the earliest step in each bucket
    std::array<std::uint32_t, kBuckets> steps{};
    std::int64_t newest = -1;  // absolute index of the newest bucket written
  };

  const CumulativeConfig config_;
  std::unordered_map<std::uint64_t, Window> windows_;
};

}  // namespace loopguard
