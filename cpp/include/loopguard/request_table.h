// The request table: requests in flight, with the blocking each caused and suffered.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "loopguard/clock.h"
#include "loopguard/segment.h"

namespace loopguard {

struct RequestCounters {
  std::uint32_t count = 0;  // blocking events this request's code caused
  Nanos total = 0;          // their summed duration (the delay it inflicted)
  // The delay it suffered: how much of its life fell inside blocking events that other requests'
  // code, or code outside any request, caused. Stall events only: a cumulative event is many
  // short steps spread over its window, and no one span of it froze anybody for its duration.
  Nanos wait = 0;
};

// The text that names a request in native hang reports: "GET /path request_id=abc", or for work
// labelled outside requests (empty method) "name request_id=name". Put together from the parts as
// the app got them, once per request, in C++: the line is written without Python, for a terminal
// or a log, so control characters (C0, DEL, C1) become '?' whoever sent them, and each part is
// bounded (the path to kLabelPathBytes, the id to kLabelIdBytes, cut on a UTF-8 boundary).
inline constexpr std::size_t kLabelPathBytes = 200;
inline constexpr std::size_t kLabelIdBytes = 128;
std::string request_label(std::string_view method, std::string_view path,
                          std::string_view request_id);

// Requests in flight, with the blocking they caused and suffered. The watchdog updates the live
// part while a stall is still going on, because the guilty request often sends its response in
// the same loop iteration that its block ends in, before any event could be drained.
//
// The delay suffered is arithmetic on what the watchdog knows anyway: each event's span, and
// each request's begin time. A request is frozen by an event for the part of the event after it
// began (a request can begin in the middle of a busy stretch that holds several events); it is
// never frozen by its own event. Nothing runs per request for it beyond one clock read at begin.
class RequestTable {
 public:
  // `label` names the request in native hang reports (see request_label()).
  // `now`: when it begins (only blocking after that can freeze it).
  std::uint64_t begin(std::string label = {}, Nanos now = 0);
  // True when the request's live event is well sampled (see set_live): it is part of the stall
  // still going on, for sure. `last`, when given, gets the request's counters as of its end,
  // the live part of a stall still in progress included (see get()).
  // `now`: when it ends (see open_since()).
  bool end(std::uint64_t token, RequestCounters* last = nullptr, Nanos now = 0);
  // Whether the request's live event is well sampled: what end() would return, without ending.
  bool settles(std::uint64_t token) const;
  std::uint32_t inflight() const;
  // One step of a request's coroutine ran from `start` to `end`: kept for the stalls it may be
  // part of (see segment.h). False, and nothing kept, when the request is not in flight.
  bool step(std::uint64_t token, Nanos start, Nanos end);
  // The most recent steps that ended at or after `since`, oldest first.
  std::vector<StepSpan> steps_since(Nanos since) const;
  // Committed counters plus the live events of the stall in progress, each as far as the
  // watchdog has sampled it: a stall still going on counts up to its last sample, never up to a
  // moment nobody has looked at.
  RequestCounters get(std::uint64_t token) const;
  std::string label(std::uint64_t token) const;
  // The label of the only request in flight; empty when none is, or several are.
  std::string sole_label() const;
  // When the request began, if it was in flight at any time since `since`: in flight now, or
  // among the last kEndLog to end, at or after `since`. Nothing otherwise.
  std::optional<Nanos> open_since(std::uint64_t token, Nanos since) const;

  // One event of a stall: who caused it (0: no request) and when it held the loop.
  struct Span {
    std::uint64_t token = 0;
    Nanos start = 0;
    Nanos duration = 0;
  };
  using Spans = std::vector<Span>;
  // `settled`: the tokens among the spans whose event rests on at least kSettleSamples
  // samples, which a request's end may settle at once (Engine::end_request).
  void set_live(Spans spans, std::vector<std::uint64_t> settled = {});
  void commit(const Spans& spans);
  // One more event for one request, outside any stall (the live spans stay as they are).
  void credit(std::uint64_t token, Nanos duration);

 private:
  struct Entry {
    RequestCounters counters;
    std::string label;
    Nanos begin = 0;
  };
  // Adds the spans to one request's counters: its own as blocks, the others' as waiting.
  static void add(RequestCounters& out, std::uint64_t token, Nanos begin, const Spans& spans);
  RequestCounters get_locked(std::uint64_t token) const;
  bool settles_locked(std::uint64_t token) const;

  mutable std::mutex mutex_;
  std::uint64_t next_ = 1;
  std::unordered_map<std::uint64_t, Entry> inflight_;
  Spans live_;
  std::vector<std::uint64_t> live_settled_;
  // The last kStepLog steps, a ring: a saturated stall holds one step per request in it, and a
  // few hundred requests in one loop iteration is what saturation looks like.
  static constexpr std::size_t kStepLog = 1024;
  std::vector<StepSpan> steps_ = std::vector<StepSpan>(kStepLog);
  std::size_t steps_next_ = 0;
  // The last kEndLog requests to end, a ring: a stall still names a request that ended during
  // it (its block, then its response, in one loop iteration).
  struct Ended {
    std::uint64_t token = 0;
    Nanos begin = 0;
    Nanos end = 0;
  };
  static constexpr std::size_t kEndLog = 256;
  std::vector<Ended> ended_ = std::vector<Ended>(kEndLog);
  std::size_t ended_next_ = 0;
};

}  // namespace loopguard
