// What the loop thread calls on the engine: the pulse (select or heartbeat), requests and their
// steps, pause/resume, settle(), and drain().
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "loopguard/engine.h"

namespace loopguard {

bool Engine::unsettled() const noexcept {
  return stall_active_.load(std::memory_order_acquire) || queue_.has_items();
}

bool Engine::settle(bool in_select) {
  if (!stall_active_.load(std::memory_order_acquire)) return queue_.has_items();
  const bool heartbeat_mode = heartbeat_mode_.load(std::memory_order_relaxed);
  if (in_select) {
    // wait_begin() ended the busy stretch already.
  } else if (heartbeat_mode) {
    heartbeat();  // the beat the stall delayed, with its lag
  } else {
    // Ends the busy stretch for the watchdog, and the loop counts as waiting until the watchdog
    // is done: this wait is ours, not the app's (finishing a stall may wait for a late stack
    // while other threads keep the GIL, and the loop thread, parked on our condition variable,
    // would look like a lock wait of the request that just ended). The loop-lag sample still
    // spans the whole iteration (iteration_start_ is left alone).
    pulse_.wait_begin(clock_->now());
  }
  std::unique_lock<std::mutex> lock(mutex_);
  if (running_ && !stop_) {
    const std::uint64_t want = ++settle_requested_;
    woken_ = true;
    if (wake_fd_ >= 0) {
      const std::uint64_t one = 1;
      (void)!::write(wake_fd_, &one, sizeof one);
    }
    settled_cv_.wait_for(lock, std::chrono::nanoseconds(config_.settle_timeout),
                         [&] { return settle_done_ >= want || !running_; });
  }
  lock.unlock();
  if (!in_select && !heartbeat_mode) pulse_.wait_end(clock_->now());  // the app's code again
  return queue_.has_items();
}

void Engine::pause() noexcept {
  pulse_.heartbeat_off(clock_->now());  // the busy stretch, if any, ends here
  iteration_start_ = 0;                 // and the time until the next run is no loop lag
  paused_.store(true, std::memory_order_release);
  disarm_timer();
  wake();
}

void Engine::resume() noexcept {
  if (!paused_.load(std::memory_order_acquire)) return;
  const Nanos now = clock_->now();
  if (heartbeat_mode_.load(std::memory_order_relaxed)) {
    pulse_.heartbeat_off(now);
  } else {
    pulse_.restart(now);
    iteration_start_ = now;
  }
  paused_.store(false, std::memory_order_release);
  wake();
}

bool Engine::wants_heartbeat() const noexcept { return active(clock_->now()); }

bool Engine::wait_begin() noexcept {
  const Nanos now = clock_->now();
  if (iteration_start_ > 0) {
    const Nanos lag = now - iteration_start_;
    lag_.record(lag);
    // Stalls stay out of the adaptive window, or one bad endpoint would raise the bar for itself.
    if (lag < threshold_.current()) threshold_.record(lag, now);
  }
  iteration_start_ = 0;
  pulse_.wait_begin(now);
  disarm_timer();
  return stall_active_.load(std::memory_order_acquire);
}

void Engine::wait_end() noexcept {
  const Nanos now = clock_->now();
  iteration_start_ = now;
  pulse_.wait_end(now);
  // While the watchdog sleeps deeply (nothing in flight), a kernel timer stands in for it: it
  // fires a threshold from now unless the loop is back in select first, so a block outside any
  // request is seen as soon as one inside would be, and an idle loop wakes nobody.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (deep_sleep_.load(std::memory_order_relaxed)) arm_timer();
}

void Engine::heartbeat() noexcept {
  heartbeat_mode_.store(true, std::memory_order_relaxed);
  const Nanos now = clock_->now();
  const Nanos due = pulse_.busy_since();
  if (due > 0) {
    const Nanos lag = std::max<Nanos>(now - due, 0);
    lag_.record(lag);
    if (lag < threshold_.current()) threshold_.record(lag, now);
  }
  pulse_.beat(now, config_.interval);
}

void Engine::heartbeat_off() noexcept {
  heartbeat_mode_.store(true, std::memory_order_relaxed);
  pulse_.heartbeat_off(clock_->now());
}

std::uint64_t Engine::begin_request(std::string label) {
  const std::uint64_t token = requests_.begin(std::move(label), clock_->now());
  if (deep_sleep_.load(std::memory_order_relaxed) && deep_sleep_.exchange(false)) wake();
  return token;
}

bool Engine::end_request(std::uint64_t token, RequestCounters* last) {
  const Nanos now = clock_->now();
  const bool blocked = requests_.end(token, last, now);
  cumulative_.forget(token);
  last_request_end_.store(now, std::memory_order_relaxed);
  return blocked && stall_active_.load(std::memory_order_acquire);
}

StepVerdict Engine::record_step(std::uint64_t token, Nanos start, Nanos end, Nanos cpu) {
  // Only requests in flight have a window: nothing to forget for one that already ended.
  if (!requests_.step(token, start, end)) return StepVerdict::kNone;
  Event ev;
  const StepVerdict verdict = cumulative_.record(token, start, end, cpu, threshold_.current(), ev);
  if (verdict != StepVerdict::kReport) return verdict;
  const std::uint32_t inflight = requests_.inflight();
  ev.victims = inflight > 0 ? inflight - 1 : 0;
  requests_.credit(token, ev.duration);
  cumulative_events_.fetch_add(1, std::memory_order_relaxed);
  cumulative_event_ = std::move(ev);
  return verdict;
}

std::optional<Event> Engine::take_cumulative() {
  std::optional<Event> ev = std::move(cumulative_event_);
  cumulative_event_.reset();
  return ev;
}

std::vector<Event> Engine::drain() {
  if (notify_read_ >= 0) {
    char buf[64];
    while (::read(notify_read_, buf, sizeof buf) > 0) {
    }
  }
  return queue_.drain();
}

}  // namespace loopguard
