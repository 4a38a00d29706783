// The uvloop pulse against a real libuv: Debian's libuv.so.1 (cmake depends on it, so it is
// wherever these tests build), driven through the same exported API uvloop's extension has.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>

#include "loopguard/clock.h"
#include "loopguard/engine.h"
#include "loopguard/uv_pulse.h"

namespace loopguard {
namespace {

constexpr const char* kLibuv = "libuv.so.1";

// The shape of a uvloop Loop: object header, Cython's vtable pointer, then the uv_loop_t pointer.
struct FakeLoopObject {
  void* header[2] = {nullptr, nullptr};
  void* vtable = nullptr;
  void* uv_loop = nullptr;
};

// The libuv calls a test needs besides the pulse's own, resolved the same way.
struct Libuv {
  void* lib = nullptr;
  std::size_t (*loop_size)() = nullptr;
  int (*loop_init)(void*) = nullptr;
  int (*loop_close)(void*) = nullptr;
  int (*run)(void*, int) = nullptr;
  std::size_t (*handle_size)(int) = nullptr;
  int (*timer_init)(void*, void*) = nullptr;
  int (*timer_start)(void*, void (*)(void*), std::uint64_t, std::uint64_t) = nullptr;
  int (*timer_stop)(void*) = nullptr;
  void (*close)(void*, void (*)(void*)) = nullptr;

  bool Load() {
    lib = ::dlopen(kLibuv, RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return false;
    loop_size = reinterpret_cast<decltype(loop_size)>(::dlsym(lib, "uv_loop_size"));
    loop_init = reinterpret_cast<decltype(loop_init)>(::dlsym(lib, "uv_loop_init"));
    loop_close = reinterpret_cast<decltype(loop_close)>(::dlsym(lib, "uv_loop_close"));
    run = reinterpret_cast<decltype(run)>(::dlsym(lib, "uv_run"));
    handle_size = reinterpret_cast<decltype(handle_size)>(::dlsym(lib, "uv_handle_size"));
    timer_init = reinterpret_cast<decltype(timer_init)>(::dlsym(lib, "uv_timer_init"));
    timer_start = reinterpret_cast<decltype(timer_start)>(::dlsym(lib, "uv_timer_start"));
    timer_stop = reinterpret_cast<decltype(timer_stop)>(::dlsym(lib, "uv_timer_stop"));
    close = reinterpret_cast<decltype(close)>(::dlsym(lib, "uv_close"));
    return loop_size && loop_init && loop_close && run && handle_size && timer_init &&
           timer_start && timer_stop && close;
  }
};

constexpr int kUvTimer = 13;  // uv_handle_type UV_TIMER
constexpr int kRunDefault = 0;

struct TimerState {
  int fired = 0;
  int wanted = 3;
  Libuv* uv = nullptr;
};

class UvPulseTest : public testing::Test {
 protected:
  void SetUp() override {
    if (!uv_.Load()) GTEST_SKIP() << kLibuv << " is not installed";
    loop_ = std::calloc(1, uv_.loop_size());
    ASSERT_EQ(uv_.loop_init(loop_), 0);
    *static_cast<void**>(loop_) = &object_;  // uvloop sets uv_loop_t.data to the Loop object
    object_.uv_loop = loop_;
    engine_ =
        std::make_unique<Engine>(WatchdogConfig{}, ThresholdConfig{}, nullptr, nullptr, &clock_);
  }
  void TearDown() override {
    if (loop_ == nullptr) return;
    // A test that did not close the loop itself: uv_loop_init allocated, uv_loop_close frees.
    if (!closed_) (void)uv_.loop_close(loop_);
    std::free(loop_);
  }

  int CloseLoop() {
    closed_ = true;
    return uv_.loop_close(loop_);
  }

  // Runs the loop through `iterations` timer wake-ups (each one a full libuv iteration).
  void RunIterations(int iterations) {
    void* timer = std::calloc(1, uv_.handle_size(kUvTimer));
    ASSERT_EQ(uv_.timer_init(loop_, timer), 0);
    TimerState state{0, iterations, &uv_};
    *static_cast<void**>(timer) = &state;
    uv_.timer_start(
        timer,
        [](void* t) {
          auto* s = *static_cast<TimerState**>(t);
          if (++s->fired == s->wanted) s->uv->timer_stop(t);
        },
        1, 1);
    uv_.run(loop_, kRunDefault);
    EXPECT_EQ(state.fired, iterations);
    uv_.close(timer, [](void* t) { std::free(t); });
    uv_.run(loop_, kRunDefault);
  }

  Libuv uv_;
  FakeLoopObject object_;
  void* loop_ = nullptr;
  bool closed_ = false;
  FakeClock clock_;
  std::unique_ptr<Engine> engine_;
};

TEST_F(UvPulseTest, FindsTheLoopThatPointsBackAtItsObject) {
  EXPECT_EQ(UvPulse::find_uv_loop(&object_), loop_);
  FakeLoopObject stranger;
  stranger.uv_loop = loop_;  // a uv_loop_t whose data names another object
  EXPECT_EQ(UvPulse::find_uv_loop(&stranger), nullptr);
  FakeLoopObject garbage;
  garbage.header[0] = reinterpret_cast<void*>(0x10);  // unmapped: read safely, rejected
  garbage.vtable = reinterpret_cast<void*>(0x7);
  garbage.uv_loop = reinterpret_cast<void*>(0x1000);
  EXPECT_EQ(UvPulse::find_uv_loop(&garbage), nullptr);
}

// Each iteration: check (wait_end) after the poll, prepare (wait_begin) before the next one, so
// the engine records one loop-lag sample per iteration; closing lets uv_loop_close succeed,
// which uvloop's close() requires.
TEST_F(UvPulseTest, PrepareAndCheckBracketEachPoll) {
  std::string why;
  auto pulse = UvPulse::attach(&object_, kLibuv, why);
  ASSERT_NE(pulse, nullptr) << why;
  pulse->set_engine(engine_.get());
  RunIterations(5);
  // One lag sample per check followed by a prepare: the first prepare has no check before it.
  EXPECT_GE(engine_->stats().lag_count, 4u);
  pulse->close();
  EXPECT_TRUE(pulse->closed());
  uv_.run(loop_, kRunDefault);  // the close callbacks free the handles
  EXPECT_EQ(CloseLoop(), 0);
}

// Without an engine the callbacks do nothing (a guard dropped on another thread than its loop's).
TEST_F(UvPulseTest, WithoutAnEngineTheHandlesAreInert) {
  std::string why;
  auto pulse = UvPulse::attach(&object_, kLibuv, why);
  ASSERT_NE(pulse, nullptr) << why;
  RunIterations(3);
  EXPECT_EQ(engine_->stats().lag_count, 0u);
  pulse->close();
  uv_.run(loop_, kRunDefault);
  EXPECT_EQ(CloseLoop(), 0);
}

// The handles are unreferenced: they never keep uv_run going on their own.
TEST_F(UvPulseTest, HandlesDoNotKeepTheLoopAlive) {
  std::string why;
  auto pulse = UvPulse::attach(&object_, kLibuv, why);
  ASSERT_NE(pulse, nullptr) << why;
  EXPECT_EQ(uv_.run(loop_, kRunDefault), 0);  // returns at once: nothing else is active
  pulse->close();
  uv_.run(loop_, kRunDefault);
  EXPECT_EQ(CloseLoop(), 0);
}

TEST_F(UvPulseTest, DeclinesALibraryWithoutLibuv) {
  std::string why;
  EXPECT_EQ(UvPulse::attach(&object_, "libdoes-not-exist.so", why), nullptr);
  EXPECT_FALSE(why.empty());
}

}  // namespace
}  // namespace loopguard
