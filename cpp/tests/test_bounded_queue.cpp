#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "loopguard/bounded_queue.h"

namespace loopguard {
namespace {

TEST(BoundedQueue, Capacity) {
  BoundedQueue<int> q(3);
  EXPECT_EQ(q.capacity(), 3u);
  EXPECT_EQ(q.size(), 0u);
  // A zero capacity would make every push a drop; it is raised to one.
  BoundedQueue<int> zero(0);
  EXPECT_EQ(zero.capacity(), 1u);
  EXPECT_TRUE(zero.push(7));
  EXPECT_FALSE(zero.push(8));
}

// When the loop thread does not drain, the newest items are dropped and counted, never silently
// lost, and the queue never grows past its bound.
TEST(BoundedQueue, DropsNewestWhenFullAndCounts) {
  BoundedQueue<int> q(2);
  EXPECT_TRUE(q.push(1));
  EXPECT_TRUE(q.push(2));
  EXPECT_FALSE(q.push(3));
  EXPECT_FALSE(q.push(4));
  EXPECT_EQ(q.size(), 2u);
  EXPECT_EQ(q.pushed(), 2u);
  EXPECT_EQ(q.dropped(), 2u);
  EXPECT_EQ(q.drain(), (std::vector<int>{1, 2}));  // the oldest ones survived
}

// Drain hands items over in FIFO order and empties the queue, making room again; the pushed and
// dropped counters are lifetime totals, not reset by drain.
TEST(BoundedQueue, DrainOrderAndCounters) {
  BoundedQueue<std::string> q(4);
  for (const char* s : {"a", "b", "c"}) ASSERT_TRUE(q.push(s));
  EXPECT_EQ(q.drain(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(q.size(), 0u);
  EXPECT_TRUE(q.drain().empty());
  for (const char* s : {"d", "e", "f", "g", "h"}) q.push(s);
  EXPECT_EQ(q.drain(), (std::vector<std::string>{"d", "e", "f", "g"}));
  EXPECT_EQ(q.pushed(), 7u);
  EXPECT_EQ(q.dropped(), 1u);
}

// Move-only payloads work (events carry vectors; nothing should need copying).
TEST(BoundedQueue, MoveOnlyItems) {
  BoundedQueue<std::unique_ptr<int>> q(2);
  EXPECT_TRUE(q.push(std::make_unique<int>(5)));
  auto out = q.drain();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(*out[0], 5);
}

// The watchdog pushes while the loop thread drains. Every attempt must be accounted for exactly
// once (pushed or dropped), every pushed item must come out exactly once, and per-producer order
// must be kept.
TEST(BoundedQueue, ConcurrentProducerConsumer) {
  constexpr int kAttempts = 200000;
  BoundedQueue<int> q(16);
  std::atomic<bool> done{false};
  int accepted = 0;
  std::thread producer([&] {
    for (int i = 0; i < kAttempts; ++i) {
      if (q.push(i)) ++accepted;
      if (i % 64 == 0) std::this_thread::yield();
    }
    done.store(true, std::memory_order_release);
  });

  std::vector<int> received;
  while (true) {
    const bool finished = done.load(std::memory_order_acquire);
    for (int v : q.drain()) received.push_back(v);
    if (finished) break;
    std::this_thread::yield();
  }
  producer.join();
  for (int v : q.drain()) received.push_back(v);  // nothing may be left behind

  EXPECT_EQ(q.pushed() + q.dropped(), static_cast<std::uint64_t>(kAttempts));
  EXPECT_EQ(q.pushed(), static_cast<std::uint64_t>(accepted));
  EXPECT_EQ(received.size(), static_cast<std::size_t>(accepted));
  EXPECT_GT(received.size(), 0u);
  for (std::size_t i = 1; i < received.size(); ++i) {
    ASSERT_LT(received[i - 1], received[i]) << "out of order or duplicated at " << i;
  }
  std::set<int> unique(received.begin(), received.end());
  EXPECT_EQ(unique.size(), received.size());
}

}  // namespace
}  // namespace loopguard
