// What the engine asks of Python, through the one interface the extension implements
// (cpp/src/python/py_sampler.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "loopguard/clock.h"
#include "loopguard/event.h"
#include "loopguard/histogram.h"

namespace loopguard {

// Captures the loop thread's Python stack and current request token. Implemented over CPython in
// the extension; tests use fakes. Must return within `timeout` (false: no stack this time).
class StackSampler {
 public:
  virtual ~StackSampler() = default;
  // Fills out.token, and with `frames` also out.frames/culprit/has_stack.
  virtual bool sample(Sample& out, Nanos timeout, bool frames) = 0;
  // The same, and the other threads' stacks too (out.others), read while the GIL is held once:
  // the loop waits on a lock, and one of them is likely to hold it (see thread_stacks.h).
  virtual bool sample_all(Sample& out, Nanos timeout) { return sample(out, timeout, true); }
  // The loop thread's stack read without the GIL (out.frames, culprit, has_stack), and with
  // `others` the other threads' too, once nobody could get the GIL in time. Only asked when the
  // evidence says no thread can be moving the frames read: the loop thread holds the GIL in
  // native code (then every thread is frozen), or, for the loop's stack alone, waits for it.
  // False when this sampler cannot (or may not, on this Python) read stacks that way.
  virtual bool read_without_gil(Sample& out, std::vector<ThreadStack>* others) {
    (void)out, (void)others;
    return false;
  }
  // The same for another thread, by kernel thread id: the one holding the GIL the loop waits for.
  virtual bool sample_thread(Sample& out, Nanos timeout, bool frames, long tid) {
    (void)out, (void)timeout, (void)frames, (void)tid;
    return false;
  }
  // A loop-thread sample that completed after sample() gave up on it (native code held the GIL
  // until then); out.t is when it was taken. At most one is kept.
  virtual bool take_late(Sample& out) {
    (void)out;
    return false;
  }
  // Waits up to `timeout` for a request that sample() gave up on to complete; true when a late
  // sample is ready to take. Returns at once when nothing is pending.
  virtual bool wait_late(Nanos timeout) {
    (void)timeout;
    return false;
  }
  // Whether a futex address belongs to the GIL (learned by watching the sampler wait for it).
  virtual bool is_gil_futex(std::uint64_t address) const {
    (void)address;
    return false;
  }
  // Whether a sampler of this process (this engine's or another guard's) holds the GIL right now.
  // A capture holds it for microseconds, so a loop that waits on the GIL meanwhile waits on us,
  // and only as long as the host keeps that sampler off a CPU.
  virtual bool sampler_holds_gil() const { return false; }
  // Whether the GIL's futex address has been learned, so that any other futex is not the GIL.
  virtual bool knows_gil_futex() const { return false; }
  // The sampler's own kernel thread id, -1 if it has no thread.
  virtual long thread_id() const { return -1; }
  // Stops the sampler's own thread. Called without the GIL.
  virtual void shutdown() {}
  // How long each sample held the loop thread off the GIL, if the sampler measures it.
  virtual const LagHistogram* pause_histogram() const { return nullptr; }
};

}  // namespace loopguard
