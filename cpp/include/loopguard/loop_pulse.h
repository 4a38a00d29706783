// The loop's pulse: what the loop thread publishes about itself, in atomics, for the watchdog
// thread to read.
#pragma once

#include <atomic>
#include <cstdint>

#include "loopguard/clock.h"

namespace loopguard {

// What the loop thread publishes. busy_since is 0 while the loop waits for I/O; otherwise the
// monotonic time since which it has not been back. epoch counts busy stretches that ended.
class LoopPulse {
 public:
  // Selector mode: the loop is about to wait in select / it came back from select.
  void wait_begin(Nanos now) noexcept;
  void wait_end(Nanos now) noexcept { busy_since_.store(now, std::memory_order_release); }
  // The loop's own code runs again at `now` (selector mode): whatever held it is over, and a new
  // busy stretch starts.
  void restart(Nanos now) noexcept;
  // Heartbeat mode: a beat proves the loop ran now; the next is due at now + interval, so if it
  // has not come by then the loop has been busy since then.
  void beat(Nanos now, Nanos interval) noexcept;
  void heartbeat_off(Nanos now) noexcept;

  Nanos busy_since() const noexcept { return busy_since_.load(std::memory_order_acquire); }
  std::uint64_t epoch() const noexcept { return epoch_.load(std::memory_order_acquire); }

  // Watchdog: remember when the busy stretch `epoch` ends.
  void watch(std::uint64_t epoch) noexcept;
  // When the watched stretch ended, or 0 if that was missed (it ended while watch() was called).
  Nanos watched_end() const noexcept { return watched_end_.load(std::memory_order_relaxed); }

 private:
  void end_busy(Nanos now) noexcept;

  std::atomic<Nanos> busy_since_{0};
  std::atomic<std::uint64_t> epoch_{0};
  std::atomic<std::uint64_t> watched_{~std::uint64_t{0}};
  std::atomic<Nanos> watched_end_{0};
};

}  // namespace loopguard
