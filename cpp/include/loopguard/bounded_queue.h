// Bounded hand-off queue from the watchdog to the loop thread.
//
// Events are rare (one per stall culprit), so a mutex is cheaper to reason about than a lock-free
// ring and costs nothing measurable. What matters is the bound: when the loop thread does not drain
// (it is blocked, or the app stopped listening) the newest event is dropped and counted, so memory
// stays bounded and the loss is never silent.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

namespace loopguard {

template <typename T>
class BoundedQueue {
 public:
  explicit BoundedQueue(std::size_t capacity) : capacity_(capacity == 0 ? 1 : capacity) {}

  // Returns false (and counts a drop) when full.
  bool push(T value) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (items_.size() >= capacity_) {
      ++dropped_;
      return false;
    }
    items_.push_back(std::move(value));
    ++pushed_;
    queued_.store(items_.size(), std::memory_order_release);
    return true;
  }

  std::vector<T> drain() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<T> out;
    out.reserve(items_.size());
    for (auto& item : items_) out.push_back(std::move(item));
    items_.clear();
    queued_.store(0, std::memory_order_release);
    return out;
  }

  // Whether anything waits, without the lock: for the loop thread's per-request check, which
  // must cost next to nothing when (as nearly always) nothing does.
  bool has_items() const noexcept { return queued_.load(std::memory_order_acquire) != 0; }

  std::size_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return items_.size();
  }
  std::uint64_t dropped() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return dropped_;
  }
  std::uint64_t pushed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return pushed_;
  }
  std::size_t capacity() const { return capacity_; }

 private:
  const std::size_t capacity_;
  mutable std::mutex mutex_;
  std::deque<T> items_;
  std::atomic<std::size_t> queued_{0};
  std::uint64_t dropped_ = 0;
  std::uint64_t pushed_ = 0;
};

}  // namespace loopguard
