// Plain data captured during a stall. Nothing here refers to a Python object: the sampler copies
// file names, function names and line numbers out while it holds the GIL, so events can be queued,
// dropped or destroyed on any thread without touching reference counts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "loopguard/classify.h"
#include "loopguard/clock.h"

namespace loopguard {

struct FrameInfo {
  std::string filename;
  std::string function;
  int line = 0;

  bool operator==(const FrameInfo& other) const {
    return line == other.line && filename == other.filename && function == other.function;
  }
};

// The Python stack of a thread other than the loop's: the likely holder of what the loop waits
// for, or one of the threads listed when a hang is first reported.
struct ThreadStack {
  long thread = 0;                  // kernel thread id; 0: no such stack
  std::vector<FrameInfo> frames;    // innermost first
  int culprit = -1;                 // as Sample::culprit
  bool culprit_is_library = false;  // as Sample::culprit_is_library
};

// One look at the loop thread while it is blocked.
struct Sample {
  Nanos t = 0;     // monotonic time of the OS reading
  Nanos cpu = -1;  // loop thread CPU clock at t, -1 when unknown
  Kind kind = Kind::kUnknown;
  bool has_stack = false;           // false: the GIL could not be had in time, or stacks are off
  bool no_gil = false;              // the sampler could not get the GIL in time (stays true when a
                                    // late stack fills this sample in)
  bool found = true;                // false: the sampled thread runs no Python (anymore)
  long thread = 0;                  // kernel id of the sampled thread, 0 for the loop thread
  std::uint64_t token = 0;          // request token from the Context, 0 = none or ended
  Nanos began = 0;                  // when that request began, 0 when unknown (it ended already)
  std::vector<FrameInfo> frames;    // innermost first, depth bounded by the sampler
  int culprit = -1;                 // index into frames of the culprit (see frame_filter.h)
  bool culprit_is_library = false;  // no application frame: the culprit is library code
  std::uint32_t inflight = 0;       // tracked requests in flight at t
  int queued = -1;  // client connections waiting in the kernel at t, -1: not read this sample
  // Outside any request: what ran ("name (coroutine)" for a task, "(callback)" for a plain
  // handle); empty inside a request, or without a stack.
  std::string task;
  // Outside requests: the unit (request, lifespan startup, label) whose Context the task carries,
  // which had ended before the stall began. A task inherits its creator's Context, so this is
  // who created it; 0 when unknown.
  std::uint64_t origin = 0;
  // The other threads' stacks, read in the same capture when the engine asked for them (the loop
  // waits on a lock); the engine keeps only the one it takes for the holder (see holder.h).
  std::vector<ThreadStack> others;
  ThreadStack holder;
};

// Whether the sample names a line of the user's own code, not library code taken for want of it.
inline bool names_application(const Sample& s) noexcept {
  return s.culprit >= 0 && !s.culprit_is_library;
}

struct Event {
  std::uint64_t token = 0;
  Nanos start = 0;  // monotonic
  Nanos duration = 0;
  Nanos cpu = 0;
  Kind kind = Kind::kUnknown;
  std::vector<FrameInfo> stack;  // innermost first
  int culprit = -1;
  bool culprit_is_library = false;
  std::uint32_t victims = 0;
  // Client connections the kernel held for the server unread during the event, which no
  // request table sees (accepted by the kernel, not by the server); -1 when unknown.
  int queued = -1;
  std::uint32_t samples = 0;
  bool stack_missing = false;
  bool hang = false;         // the stall passed the hang threshold (and was reported while ongoing)
  std::string task;          // see Sample::task
  std::uint64_t origin = 0;  // see Sample::origin
  ThreadStack holder;        // a lock wait: the thread most likely holding what the loop waited for
};

}  // namespace loopguard
