// Turning the samples of one stall into events, one per culprit.
//
// A stall (one busy stretch of the loop longer than the threshold) can hold several culprits one
// after the other: request A's time.sleep, then request B's CPU loop. Consecutive samples with the
// same key (request token + culprit function) form a run; runs are cut at the midpoint between
// their neighbouring samples, the first run reaches back to the start of the stall and the last
// one forward to its end. A run that lasts at least the threshold is a blocking event; the rest of
// the stall is time the loop spent on many short callbacks (saturation), which is not a code bug.
//
// The first run only reaches back to the stall start when it is *confirmed*: a second sample shows
// the same key, or the stall ended before another sample. Otherwise a loop saturated by many 1 ms
// callbacks would pin the whole pre-detection time on whichever callback the first sample hit.
//
// Samples only start once a threshold has passed, so a run's reach is a guess; where the request
// says when its own code ran, the guess is bounded by that. The middleware times each step of a
// request's coroutine (resume to suspend), and a run whose first (last) sample falls in one of
// its request's steps starts no earlier (ends no later) than that step. On a loop saturated by
// many short requests, the one sample of a stall that ended just past the threshold lands in one
// of them; without the bound, that 1 ms request would take the blame for all 50 ms.
#pragma once

#include <cstdint>
#include <vector>

#include "loopguard/event.h"

namespace loopguard {

// One step of a request's own coroutine on the loop, from its resumption to its suspension.
struct StepSpan {
  std::uint64_t token = 0;
  Nanos start = 0;
  Nanos end = 0;
};

struct StallInput {
  Nanos start = 0;      // when the loop became busy
  Nanos end = 0;        // when it went back to waiting
  Nanos threshold = 0;  // events are runs at least this long
  Nanos pre_t = -1;     // an earlier CPU clock reading in this stall (for single-sample runs)
  Nanos pre_cpu = -1;
  // Finished steps of requests' coroutines that ended in this stall, and how much later than its
  // time a sample's stack may have been read (the sampler's wait for the GIL).
  std::vector<StepSpan> steps;
  Nanos stack_timeout = 0;
};

struct StallResult {
  std::vector<Event> events;
  Nanos saturated = 0;  // stall time not attributed to any event
};

// Whether two samples belong to the same run.
bool same_culprit(const Sample& a, const Sample& b) noexcept;

StallResult split_stall(const std::vector<Sample>& samples, const StallInput& in);

}  // namespace loopguard
