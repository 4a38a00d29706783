// The fixture of the engine's unit tests (test_engine*.cpp): an engine with fake OS, fake Python
// and a fake clock, driven by hand.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>

#include "fakes.h"
#include "loopguard/clock.h"
#include "loopguard/engine.h"

namespace loopguard {

// The engine is driven by hand: no watchdog thread, a fake clock, step(now) called by the test.
class EngineTest : public testing::Test {
 protected:
  void Make(WatchdogConfig config = WatchdogConfig{},
            ThresholdConfig threshold = ThresholdConfig{}) {
    os_ = std::make_shared<FakeOs>();
    os_->state = Running();
    py_ = std::make_shared<FakePython>();
    py_->frames = HandlerStack("handler", 42);
    py_->culprit = 1;
    engine_ = std::make_unique<Engine>(config, threshold, std::make_unique<FakeProbe>(os_),
                                       std::make_unique<FakeSampler>(py_), &clock_);
  }
  void SetUp() override { Make(); }

  Nanos Step() { return engine_->step(clock_.now()); }
  // The loop leaves select (busy) / goes back to it: the pulse and what the OS shows agree.
  void LoopBusy() {
    os_->loop_waiting = false;
    engine_->wait_end();
  }
  void LoopWaits() {
    engine_->wait_begin();
    os_->loop_waiting = true;
  }
  Nanos Now() const { return clock_.now(); }
  void Advance(Nanos dt) { clock_.advance(dt); }

  // Loop leaves select, stays busy for `busy` (the watchdog stepping every `every`), and goes back.
  void Stall(Nanos busy, Nanos every = 1 * kMs) {
    LoopBusy();
    const Nanos end = Now() + busy;
    Step();
    while (Now() < end) {
      Advance(std::min(every, end - Now()));
      Step();
    }
    LoopWaits();
    Step();
  }

  FakeClock clock_;  // declared first: outlives the engine
  std::shared_ptr<FakeOs> os_;
  std::shared_ptr<FakePython> py_;
  std::unique_ptr<Engine> engine_;
};

}  // namespace loopguard
