// What the split_stall tests build their stalls from: samples of a culprit at a given time, idle
// samples, and the stall around them.
#pragma once

#include <cstdint>
#include <string>

#include "loopguard/event.h"
#include "loopguard/segment.h"

namespace loopguard {

inline constexpr Nanos kT0 = 1000 * kMs;  // stall start in most cases
inline constexpr Nanos kThreshold = 50 * kMs;

// Milliseconds after kT0.
inline constexpr Nanos At(Nanos ms) { return kT0 + ms * kMs; }

// A sample whose culprit (innermost application frame) is app.py:<function>:<line>, below a
// library frame and above the loop's own frame, as the Python sampler would capture it.
inline Sample Make(Nanos t, std::uint64_t token, const std::string& function, int line = 10,
                   Kind kind = Kind::kSleep) {
  Sample s;
  s.t = t;
  s.kind = kind;
  s.token = token;
  s.has_stack = true;
  s.frames = {{"/usr/lib/python3/time_wrapper.py", "wrapped_sleep", 3},
              {"app.py", function, line},
              {"/usr/lib/python3/asyncio/events.py", "_run", 88}};
  s.culprit = 1;
  return s;
}

inline Sample Idle(Nanos t) {
  Sample s;
  s.t = t;
  s.kind = Kind::kIdle;
  return s;
}

inline StallInput Input(Nanos start, Nanos end, Nanos threshold = kThreshold) {
  StallInput in;
  in.start = start;
  in.end = end;
  in.threshold = threshold;
  return in;
}

}  // namespace loopguard
