// Time sources for the engine. Everything is in nanoseconds on the monotonic clock; the wall clock
// is only used to stamp events for humans. Tests drive the watchdog through FakeClock.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace loopguard {

using Nanos = std::int64_t;

constexpr Nanos kMs = 1'000'000;

inline Nanos monotonic_now() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

class Clock {
 public:
  virtual ~Clock() = default;
  virtual Nanos now() const noexcept = 0;
};

class SteadyClock final : public Clock {
 public:
  Nanos now() const noexcept override { return monotonic_now(); }
};

// A clock that only moves when a test says so.
class FakeClock final : public Clock {
 public:
  explicit FakeClock(Nanos start = 1'000 * kMs) : now_(start) {}
  Nanos now() const noexcept override { return now_.load(std::memory_order_acquire); }
  void set(Nanos t) noexcept { now_.store(t, std::memory_order_release); }
  void advance(Nanos dt) noexcept { now_.fetch_add(dt, std::memory_order_acq_rel); }

 private:
  std::atomic<Nanos> now_;
};

}  // namespace loopguard
