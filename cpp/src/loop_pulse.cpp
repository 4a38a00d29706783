#include "loopguard/loop_pulse.h"

namespace loopguard {

void LoopPulse::end_busy(Nanos now) noexcept {
  const std::uint64_t e = epoch_.load(std::memory_order_relaxed);
  if (e == watched_.load(std::memory_order_acquire))
    watched_end_.store(now, std::memory_order_relaxed);
  // Release: a watchdog that sees the new epoch also sees watched_end_.
  epoch_.store(e + 1, std::memory_order_release);
}

void LoopPulse::wait_begin(Nanos now) noexcept {
  end_busy(now);
  busy_since_.store(0, std::memory_order_release);
}

void LoopPulse::beat(Nanos now, Nanos interval) noexcept {
  end_busy(now);
  busy_since_.store(now + interval, std::memory_order_release);
}

void LoopPulse::heartbeat_off(Nanos now) noexcept {
  end_busy(now);
  busy_since_.store(0, std::memory_order_release);
}

void LoopPulse::restart(Nanos now) noexcept {
  end_busy(now);
  busy_since_.store(now, std::memory_order_release);
}

void LoopPulse::watch(std::uint64_t epoch) noexcept {
  watched_end_.store(0, std::memory_order_relaxed);
  watched_.store(epoch, std::memory_order_release);
}

}  // namespace loopguard
