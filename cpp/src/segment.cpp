#include "loopguard/segment.h"

#include <algorithm>
#include <map>
#include <utility>

namespace loopguard {

namespace {

const FrameInfo* key_frame(const Sample& s) {
  if (!s.has_stack || s.frames.empty()) return nullptr;
  const int idx = s.culprit >= 0 ? s.culprit : 0;
  return &s.frames[static_cast<std::size_t>(idx)];
}

// CPU share of the loop thread between two readings, clamped to [0, 1]; -1 when unknown.
double cpu_ratio(Nanos t0, Nanos cpu0, Nanos t1, Nanos cpu1) {
  if (t0 < 0 || cpu0 < 0 || cpu1 < 0 || t1 <= t0) return -1.0;
  const double r = static_cast<double>(cpu1 - cpu0) / static_cast<double>(t1 - t0);
  return std::clamp(r, 0.0, 1.0);
}

// `measured`: whether ev.cpu comes from CPU clock readings rather than from the kind alone.
Event make_event(const std::vector<const Sample*>& s, std::size_t first, std::size_t last,
                 Nanos start, Nanos end, const StallInput& in, bool& measured) {
  Event ev;
  for (std::size_t i = first; i <= last && ev.token == 0; ++i) ev.token = s[i]->token;
  ev.start = start;
  ev.duration = end - start;
  ev.samples = static_cast<std::uint32_t>(last - first + 1);

  std::vector<Kind> kinds;
  // The representative stack is the first sample showing the most frequent culprit line: for a
  // CPU loop the line moves between samples, and the most frequent one is where the time went.
  std::map<std::pair<std::string, int>, std::size_t> line_counts;
  for (std::size_t i = first; i <= last; ++i) {
    kinds.push_back(s[i]->kind);
    const std::uint32_t own = s[i]->token != 0 && s[i]->inflight > 0 ? 1 : 0;
    ev.victims = std::max(ev.victims, s[i]->inflight - own);
    if (const FrameInfo* f = key_frame(*s[i])) ++line_counts[{f->filename, f->line}];
  }
  ev.kind = majority_kind(kinds);
  // Connections waiting in the kernel: the count grows for as long as the loop stays blocked, so
  // the run's newest count, else the first one taken after it (they were still waiting then).
  for (std::size_t i = first; i <= last; ++i) {
    if (s[i]->queued >= 0) ev.queued = s[i]->queued;
  }
  for (std::size_t i = last + 1; i < s.size() && ev.queued < 0; ++i) ev.queued = s[i]->queued;

  const Sample* rep = nullptr;
  std::size_t best = 0;
  for (std::size_t i = first; i <= last; ++i) {
    const FrameInfo* f = key_frame(*s[i]);
    if (f == nullptr) continue;
    const std::size_t n = line_counts[{f->filename, f->line}];
    if (n > best) {
      best = n;
      rep = s[i];
    }
  }
  if (rep == nullptr) {
    for (std::size_t i = first; i <= last && rep == nullptr; ++i) {
      if (s[i]->has_stack) rep = s[i];
    }
  }
  if (rep != nullptr) {
    ev.stack = rep->frames;
    ev.culprit = rep->culprit;
    ev.task = rep->task;
    if (ev.token == 0) ev.origin = rep->origin;
    ev.culprit_is_library = rep->culprit_is_library;
  } else {
    ev.stack_missing = true;
  }
  // A lock wait names the thread that most likely held the lock: the newest sample's pick that
  // ran the user's code, else the newest pick at all. The last sample of a wait may come after
  // the holder let go (the loop wakes a moment later), when that thread is back in its pool's
  // library code or gone. A wait for another thread's collection names the collecting thread.
  if (ev.kind == Kind::kLock || ev.kind == Kind::kGc) {
    const ThreadStack* any = nullptr;
    const ThreadStack* application = nullptr;
    for (std::size_t i = last + 1; i-- > first && application == nullptr;) {
      const ThreadStack& h = s[i]->holder;
      if (h.thread == 0) continue;
      if (any == nullptr) any = &h;
      if (h.culprit >= 0 && !h.culprit_is_library) application = &h;
    }
    if (application != nullptr) {
      ev.holder = *application;
    } else if (any != nullptr) {
      ev.holder = *any;
    }
  }

  double r = -1.0;
  if (last > first) r = cpu_ratio(s[first]->t, s[first]->cpu, s[last]->t, s[last]->cpu);
  if (r < 0 && first > 0)
    r = cpu_ratio(s[first - 1]->t, s[first - 1]->cpu, s[first]->t, s[first]->cpu);
  if (r < 0 && first == 0) r = cpu_ratio(in.pre_t, in.pre_cpu, s[first]->t, s[first]->cpu);
  measured = r >= 0;
  // No CPU clock at all: the kinds that run on the CPU get all of it.
  if (r < 0)
    r = ev.kind == Kind::kCpu || ev.kind == Kind::kNative || ev.kind == Kind::kGc ? 1.0 : 0.0;
  ev.cpu = static_cast<Nanos>(r * static_cast<double>(ev.duration));
  // Starved samples of a run that still spent a threshold on the CPU: the code's own CPU work,
  // stretched by a busy host. What it did is the kind: native when the sampler could mostly not
  // get the GIL (native code held it), cpu otherwise. split_stall drops the runs that mostly
  // waited for a CPU.
  if (measured && ev.kind == Kind::kStarved && ev.cpu >= in.threshold) {
    std::size_t no_gil = 0;
    for (std::size_t i = first; i <= last; ++i) no_gil += s[i]->no_gil ? 1 : 0;
    ev.kind = no_gil * 2 > last - first + 1 ? Kind::kNative : Kind::kCpu;
  }
  return ev;
}

bool identified(const Sample& s) { return s.has_stack || s.token != 0; }

// The step of `token`'s coroutine that a loop-thread sample taken at `t` was read in: its stack is
// read up to `in.stack_timeout` later, once the sampler has the GIL. A request's coroutine runs
// at most one step per loop iteration, and a stall is one iteration (selector and libuv pulse),
// so one step matches; in heartbeat mode, where a stall may span iterations, the earliest does.
const StepSpan* step_holding(const StallInput& in, std::uint64_t token, Nanos t) {
  for (const StepSpan& step : in.steps) {
    if (step.token == token && step.start <= t + in.stack_timeout && step.end >= t) return &step;
  }
  return nullptr;
}

// Outside any request, the loop thread in code that is not the user's: that is what a loop
// saturated by many short callbacks looks like, because samples land where the loop lets go of
// the GIL, so on the same uvicorn or stdlib function each time. Such samples never join up, and
// runs of them are never events. Two kinds of sample are not that: the loop thread waiting on a
// futex (a lock, or the GIL), which only happens when another thread holds what it needs, and a
// GIL holder's stack, which is another thread's (or a wait for another thread's collection).
// Those stay stalls, with or without a request;
// otherwise a loop held for a quarter of a second by a SQL thread's lock would vanish.
bool saturation_like(const Sample& s) noexcept {
  const bool held_by_another_thread =
      s.kind == Kind::kLock || s.kind == Kind::kGil || s.thread != 0 || s.holder.thread != 0;
  return s.token == 0 && s.has_stack && !held_by_another_thread && !names_application(s);
}

}  // namespace

bool same_culprit(const Sample& a, const Sample& b) noexcept {
  if (a.token != b.token) return false;
  // Outside requests, the task is what a request is inside them: two tasks' blocks are never
  // one event, even when they run the same function back to back.
  if (a.token == 0 && a.has_stack && b.has_stack && a.task != b.task) return false;
  // Never taken for one long culprit (see saturation_like). Samples without any stack (the GIL
  // was held) still join up.
  if (a.has_stack && b.has_stack && (saturation_like(a) || saturation_like(b))) return false;
  const FrameInfo* fa = key_frame(a);
  const FrameInfo* fb = key_frame(b);
  // Without a stack on one side the request is all we can compare.
  if (fa == nullptr || fb == nullptr) return true;
  return fa->function == fb->function && fa->filename == fb->filename;
}

StallResult split_stall(const std::vector<Sample>& samples, const StallInput& in) {
  StallResult out;
  std::vector<const Sample*> s;
  for (const auto& sample : samples) {
    if (sample.kind != Kind::kIdle && sample.t >= in.start && sample.t <= in.end)
      s.push_back(&sample);
  }
  const Nanos length = std::max<Nanos>(0, in.end - in.start);
  if (samples.empty()) {
    // Over before a single sample: one culprit or many short callbacks, nobody can tell. An
    // event without request, line or kind would only be noise; the time counts as saturation.
    out.saturated = length;
    return out;
  }
  if (s.empty() || length == 0) {
    // Only samples of the loop waiting for I/O: it was not blocked, nor saturated, after all.
    return out;
  }

  // A sample that names nothing (no stack, no request: the sampler did not get the GIL in time)
  // joins the run it falls in instead of breaking it; runs compare identified samples only.
  std::vector<std::pair<std::size_t, std::size_t>> runs;
  std::size_t run_first = 0;
  const Sample* key = identified(*s[0]) ? s[0] : nullptr;
  std::size_t first_run_identified = key != nullptr ? 1 : 0;
  for (std::size_t i = 1; i < s.size(); ++i) {
    if (!identified(*s[i])) continue;
    if (key == nullptr || same_culprit(*key, *s[i])) {
      if (key == nullptr) key = s[i];
      if (runs.empty()) ++first_run_identified;
      continue;
    }
    runs.emplace_back(run_first, i - 1);
    run_first = i;
    key = s[i];
  }
  runs.emplace_back(run_first, s.size() - 1);

  const bool confirmed = runs.size() == 1 || first_run_identified > 1;
  Nanos start = in.start;
  if (!confirmed) {
    start = std::max(in.start, s[0]->t - (s[1]->t - s[0]->t) / 2);
    out.saturated += start - in.start;
  }
  for (std::size_t r = 0; r < runs.size(); ++r) {
    const auto [first, last] = runs[r];
    const Nanos end = r + 1 < runs.size() ? (s[last]->t + s[runs[r + 1].first]->t) / 2 : in.end;
    // A request cannot have held the loop before it began. A run reaches back to the stall's
    // start (or the previous run's end) because samples only begin once a threshold has passed;
    // on a saturated loop, though, two samples that caught one short request (descheduled
    // between them) would pin on it all the busy time before it even existed. That time was
    // other, unsampled work: saturation.
    for (std::size_t i = first; i <= last; ++i) {
      if (s[i]->began <= 0) continue;
      if (s[i]->began > start && s[i]->began < end) {
        out.saturated += s[i]->began - start;
        start = s[i]->began;
      }
      break;
    }
    // Nor did it hold the loop outside the steps of its coroutine that its samples were read
    // in (see segment.h). Only the loop thread's own samples say so: a GIL holder's stack is
    // another thread's, which runs whether the request's coroutine does or not. A sample outside
    // every step (a task the request started, which shares its token) bounds nothing.
    Nanos until = end;
    const Sample* first_seen = nullptr;
    const Sample* last_seen = nullptr;
    for (std::size_t i = first; i <= last; ++i) {
      if (s[i]->token == 0) continue;
      if (first_seen == nullptr) first_seen = s[i];
      last_seen = s[i];
    }
    if (first_seen != nullptr && first_seen->thread == 0) {
      const StepSpan* step = step_holding(in, first_seen->token, first_seen->t);
      if (step != nullptr && step->start > start && step->start < end) {
        out.saturated += step->start - start;
        start = step->start;
      }
    }
    if (last_seen != nullptr && last_seen->thread == 0) {
      const StepSpan* step = step_holding(in, last_seen->token, last_seen->t);
      if (step != nullptr && step->end < until) until = std::max(step->end, start);
    }
    out.saturated += end - until;
    // Loop or library code running outside any request, with no application frame in any
    // sample: not actionable, and indistinguishable from many short callbacks.
    bool anonymous = true;
    for (std::size_t i = first; i <= last && anonymous; ++i) anonymous = saturation_like(*s[i]);
    bool counted = false;
    if (until - start >= in.threshold && !anonymous) {
      bool measured = false;
      Event ev = make_event(s, first, last, start, until, in, measured);
      // A thread that was running or runnable all along, yet was on a CPU for less than half
      // of the time and for less than a threshold in all: it mostly waited for a CPU that other
      // processes had (an overloaded host, cgroup throttling), and its own code did not hold
      // the loop for a threshold's worth of work. That is no culprit's event (a 1 ms request
      // descheduled for 60 ms is not a 60 ms CPU hog); the time counts as saturation. Sleep,
      // I/O, lock and GIL waits use no CPU by nature and are not judged this way.
      const bool on_cpu =
          ev.kind == Kind::kCpu || ev.kind == Kind::kNative || ev.kind == Kind::kStarved;
      if (!(measured && on_cpu && ev.cpu < in.threshold && ev.cpu * 2 < ev.duration)) {
        out.events.push_back(std::move(ev));
        counted = true;
      }
    }
    if (!counted) out.saturated += until - start;
    start = end;
  }
  return out;
}

}  // namespace loopguard
