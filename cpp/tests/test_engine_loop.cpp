// The loop is the unit: pause and resume, the loop thread's exit, settle(), the kernel timer, and
// the engine with its real watchdog thread (ThreadedEngineTest).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "engine_test.h"
#include "loopguard/engine.h"

namespace loopguard {
namespace {

// ---- The loop is the unit: pause, thread exit, settle, the idle timer -------------------------

// loop.stop(): the stall in progress ends there and is delivered; what the thread does after the
// loop stopped (sync code between two runs) is not the loop's blocking, however long.
TEST_F(EngineTest, PauseEndsTheStallAndWatchesNothingUntilResume) {
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  const Nanos t0 = Now();
  LoopBusy();
  Step();
  Advance(60 * kMs);
  Step();  // a stall, sampled
  engine_->pause();
  EXPECT_TRUE(engine_->paused());
  Advance(1 * kMs);
  Step();
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].duration, 60 * kMs);
  EXPECT_EQ(events[0].start, t0);

  os_->loop_waiting = false;  // the thread runs something else, for seconds
  const int calls = py_->calls;
  for (int i = 0; i < 30; ++i) {
    Advance(100 * kMs);
    Step();
  }
  EXPECT_EQ(py_->calls, calls);
  EXPECT_EQ(engine_->stats().stalls, 1u);
  EXPECT_EQ(engine_->stats().hangs, 0u);
  EXPECT_TRUE(engine_->drain().empty());

  engine_->resume();  // the loop runs again, and blocks
  EXPECT_FALSE(engine_->paused());
  Step();
  Advance(60 * kMs);
  Step();
  EXPECT_EQ(engine_->stats().stalls, 2u);
}

// The loop's thread exited (a TestClient portal, a worker thread): silent for good, resume or not.
TEST_F(EngineTest, LoopThreadExitSilencesForGood) {
  engine_->begin_request();
  engine_->loop_thread_exited();
  engine_->resume();
  LoopBusy();
  for (int i = 0; i < 30; ++i) {
    Advance(100 * kMs);
    Step();
  }
  EXPECT_EQ(py_->calls, 0);
  EXPECT_EQ(engine_->stats().stalls, 0u);
}

// A loop iterating fast with nothing in flight keeps the watchdog on the interval tick, so it
// stops paying the kernel timer on every iteration; once it slows down, deep sleep again.
TEST_F(EngineTest, FastIterationsWithoutRequestsKeepTheWatchdogTicking) {
  WatchdogConfig config;
  config.grace = 1000 * kMs;
  Make(config);
  EXPECT_EQ(Step(), Now() + config.idle_tick);  // idle: deep sleep
  for (int i = 0; i < 1500; ++i) {
    LoopBusy();
    Advance(kMs / 2);
    LoopWaits();
    Advance(kMs / 5);
  }
  Advance(100 * kMs);
  EXPECT_EQ(Step(), Now() + config.interval);  // 1,500 iterations in 1.15 s: ticking
  Advance(2000 * kMs);                         // quiet since
  Step();
  Advance(1000 * kMs);
  EXPECT_EQ(Step(), Now() + config.idle_tick);
}

// Without a watchdog thread there is nobody to wait for: settle() says what the queue holds.
TEST_F(EngineTest, SettleWithoutAThreadReturnsAtOnce) {
  EXPECT_FALSE(engine_->unsettled());
  EXPECT_FALSE(engine_->settle());
  Stall(80 * kMs);
  EXPECT_TRUE(engine_->unsettled());
  EXPECT_TRUE(engine_->settle());
  EXPECT_EQ(engine_->drain().size(), 1u);
}

// The same engine with its real watchdog thread on the real clock (so the kernel timer is live).
// No assertion depends on timing: each waits, bounded, for a state that only the mechanism under
// test can produce.
class ThreadedEngineTest : public testing::Test {
 protected:
  void Make(WatchdogConfig config) {
    os_ = std::make_shared<FakeOs>();
    os_->state = Running();
    py_ = std::make_shared<FakePython>();
    py_->frames = HandlerStack("handler", 42);
    py_->culprit = 1;
    engine_ = std::make_unique<Engine>(config, ThresholdConfig{}, std::make_unique<FakeProbe>(os_),
                                       std::make_unique<FakeSampler>(py_));
    engine_->start();
  }
  void TearDown() override {
    if (engine_) engine_->stop();
  }
  // Waits up to 10 s for `done`; the bound only decides how long a failing test takes.
  static bool WaitFor(const std::function<bool()>& done) {
    for (int i = 0; i < 10'000; ++i) {
      if (done()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return done();
  }
  std::shared_ptr<FakeOs> os_;
  std::shared_ptr<FakePython> py_;
  std::unique_ptr<Engine> engine_;
};

// Nothing in flight and an idle tick of an hour: only the timer armed by wait_end() can wake the
// watchdog, and it does, for a block outside any request.
TEST_F(ThreadedEngineTest, KernelTimerSeesABlockOutsideRequests) {
  WatchdogConfig config;
  config.idle_tick = 3'600'000 * kMs;
  config.grace = 0;
  Make(config);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let it fall into deep sleep
  os_->loop_waiting = false;
  engine_->wait_end();  // the loop leaves select and stays busy
  EXPECT_TRUE(WaitFor([&] { return engine_->stats().stalls == 1; }));
  engine_->wait_begin();
  os_->loop_waiting = true;
  EXPECT_TRUE(WaitFor([&] { return engine_->stats().events_emitted == 1; }));
}

// The timer is armed only while the loop is out of select and the watchdog sleeps deeply, and
// going back to select disarms it, so short iterations never wake the watchdog.
TEST_F(ThreadedEngineTest, ShortIterationsDisarmTheTimer) {
  WatchdogConfig config;
  config.idle_tick = 3'600'000 * kMs;
  config.grace = 0;
  Make(config);
  EXPECT_TRUE(WaitFor([&] {
    engine_->wait_end();
    const bool armed = engine_->timer_armed();
    engine_->wait_begin();
    EXPECT_FALSE(engine_->timer_armed());
    return armed;
  }));
  engine_->begin_request();  // the watchdog is awake now: it looks for itself, no timer
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  engine_->wait_end();
  EXPECT_FALSE(engine_->timer_armed());
  engine_->wait_begin();
}

// settle(): the events of a stall in progress are in the queue when it returns, although the
// watchdog would not look again for an hour.
TEST_F(ThreadedEngineTest, SettleFinishesTheStallInProgress) {
  WatchdogConfig config;
  config.idle_tick = 3'600'000 * kMs;
  config.grace = 0;
  Make(config);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  os_->loop_waiting = false;
  engine_->wait_end();
  ASSERT_TRUE(WaitFor([&] { return engine_->stats().samples >= 2; }));
  EXPECT_TRUE(engine_->unsettled());
  os_->loop_waiting = true;
  EXPECT_TRUE(engine_->settle());
  EXPECT_EQ(engine_->drain().size(), 1u);
  EXPECT_FALSE(engine_->unsettled());
}

// The victims' delay with a real watchdog thread (the TSan run's case): the loop thread reads the
// live wait while the watchdog samples, then the culprit's end settles the stall first, and the
// counters handed back match the event exactly, for the culprit and its victim alike.
TEST_F(ThreadedEngineTest, WaitAndBlockMatchTheEventAcrossThreads) {
  Make(WatchdogConfig{});
  const std::uint64_t culprit = engine_->begin_request();
  const std::uint64_t victim = engine_->begin_request();
  py_->token = culprit;
  os_->loop_waiting = false;
  engine_->wait_end();
  Nanos live = 0;
  ASSERT_TRUE(WaitFor([&] {
    live = std::max(live, engine_->request_counters(victim).wait);
    return engine_->stats().samples >= 4;
  }));
  EXPECT_GE(live, 50 * kMs);  // the threshold had passed before the first sample
  ASSERT_TRUE(engine_->ends_stall(culprit));
  os_->loop_waiting = true;
  engine_->settle();  // what the extension does before ending the culprit
  RequestCounters last;
  EXPECT_FALSE(engine_->end_request(culprit, &last));
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(last.count, 1u);
  EXPECT_EQ(last.total, events[0].duration);
  EXPECT_EQ(last.wait, 0);
  engine_->end_request(victim, &last);
  EXPECT_EQ(last.wait, events[0].duration);
  EXPECT_EQ(last.count, 0u);
}

// watch_thread_exit() on a thread that then exits: the engine stops watching, and its watchdog
// thread ends (stop() finds nothing left to join).
TEST_F(ThreadedEngineTest, WatchedThreadExitEndsTheWatch) {
  WatchdogConfig config;
  Make(config);
  std::thread loop([&] { engine_->watch_thread_exit(); });
  loop.join();
  os_->loop_waiting = false;
  engine_->begin_request();
  engine_->wait_end();
  std::this_thread::sleep_for(std::chrono::milliseconds(150));  // three thresholds
  EXPECT_EQ(engine_->stats().stalls, 0u);
  EXPECT_EQ(py_->calls, 0);
}

// An engine destroyed before the thread it watched: the thread's exit touches nothing.
TEST_F(ThreadedEngineTest, ThreadOutlivingItsEngineIsHarmless) {
  WatchdogConfig config;
  Make(config);
  std::mutex m;
  std::condition_variable cv;
  bool registered = false, engine_gone = false;
  std::thread loop([&] {
    engine_->watch_thread_exit();
    std::unique_lock<std::mutex> lock(m);
    registered = true;
    cv.notify_all();
    cv.wait(lock, [&] { return engine_gone; });
  });
  {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return registered; });
  }
  engine_->stop();
  engine_.reset();
  {
    std::lock_guard<std::mutex> lock(m);
    engine_gone = true;
  }
  cv.notify_all();
  loop.join();  // under ASan, a use after free here would be reported
}

}  // namespace
}  // namespace loopguard
