// The select hook for uvloop.
//
// On asyncio the guard brackets each selector.select() call, which gives the engine exact busy
// periods with no timer. uvloop has no selector, but it runs on libuv, and libuv has exactly that
// hook: a prepare handle runs right before the loop polls for I/O, and a check handle right after.
// Both callbacks are C, run on the loop thread without the GIL, and cost two clock reads per
// iteration. So a uvloop loop gets the same pulse as an asyncio one: no heartbeat, no wake-ups
// while idle, and the kernel timer of wait_end() for blocks outside requests.
//
// uvloop links libuv into its own extension and exports libuv's API from it; the functions are
// looked up there (never in another libuv, whose version could differ). The uv_loop_t of a uvloop
// Loop is its first C field after the Cython vtable pointer, and uvloop sets uv_loop_t.data to the
// Loop object itself: find_uv_loop() only accepts a candidate whose data field points back at the
// object, and reads it through process_vm_readv, which fails cleanly instead of crashing on an
// address that is not mapped. Anything unexpected and attach() declines; the guard then falls
// back to the heartbeat.
//
// Lifetime: libuv owns the handles until their close callbacks have run. uvloop's close() walks
// every open handle and treats its data as one of its own Python objects, so the handles must be
// closed (close(), on the loop thread) before the loop is; the Python side does that from its
// loop.close wrapper. Until then, set_engine(nullptr) turns the callbacks into no-ops from any
// thread.
#pragma once

#include <memory>
#include <string>

namespace loopguard {

class Engine;
struct UvControl;

class UvPulse {
 public:
  // Hooks the running loop whose uv_loop_t is inside `loop_object`, with libuv's functions from
  // `library` (a path dlopen finds, normally uvloop's already loaded extension). Loop thread,
  // while the loop runs. Null on failure, with the reason in `why`.
  static std::shared_ptr<UvPulse> attach(const void* loop_object, const std::string& library,
                                         std::string& why);
  ~UvPulse();
  UvPulse(const UvPulse&) = delete;
  UvPulse& operator=(const UvPulse&) = delete;

  // The engine the callbacks drive (wait_begin before each poll, wait_end after). Any thread;
  // null: the callbacks do nothing.
  void set_engine(Engine* engine);
  // After fork() in the child: drop the engine without taking a lock another thread may have held.
  void forget_engine() noexcept;
  // Loop thread only: stops and closes both handles; libuv frees them on the loop's next run (or
  // in uvloop's close()). Idempotent.
  void close();
  bool closed() const noexcept { return closed_; }

  // Exposed for tests: the uv_loop_t inside a uvloop-shaped object, or null.
  static void* find_uv_loop(const void* loop_object);

 private:
  explicit UvPulse(std::shared_ptr<UvControl> control) : control_(std::move(control)) {}
  bool forgotten_after_fork() const noexcept;
  std::shared_ptr<UvControl> control_;
  bool closed_ = false;
};

}  // namespace loopguard
