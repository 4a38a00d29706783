// A stall's life on the watchdog thread: detection, each sample (OS state, CPU clock, a stack
// through the sampler, the evidence that decides its kind), the late stack that fills the
// samples that had none, and the split into events once the loop is back.
#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "loopguard/classify.h"
#include "loopguard/engine.h"
#include "loopguard/segment.h"
#include "loopguard/thread_stacks.h"

namespace loopguard {

namespace {
// See take_sample(): how many samples make a live event its request's for sure.
constexpr std::uint32_t kSettleSamples = 3;

// Every event, the ones outside requests too: they freeze the requests in flight all the same.
RequestTable::Spans spans_of(const std::vector<Event>& events) {
  RequestTable::Spans spans;
  spans.reserve(events.size());
  for (const auto& ev : events) spans.push_back({ev.token, ev.start, ev.duration});
  return spans;
}
}  // namespace

void Engine::begin_stall(Nanos busy_since, std::uint64_t epoch) {
  stall_ = Stall{};
  stall_.active = true;
  stall_.epoch = epoch;
  stall_.start = busy_since;
  stall_.threshold = threshold_.current();
  stall_.sample_every = config_.interval;
  if (pre_epoch_ == epoch) {
    stall_.pre_t = pre_t_;
    stall_.pre_cpu = pre_cpu_;
  }
  stall_.os_detected = os_busy_since_ > 0 && busy_since == os_busy_since_;
  stall_active_.store(true, std::memory_order_release);
  // Whatever happens next is judged afresh: a later busy stretch never inherits this start.
  os_busy_since_ = 0;
  pulse_.watch(epoch);
  stalls_.fetch_add(1, std::memory_order_relaxed);
  take_sample();
  stall_.next_sample = clock_->now() + config_.confirm_delay;
}

Evidence Engine::evidence(const OsState& os, Nanos t, Nanos cpu) const {
  Evidence ev;
  ev.in_gc = in_gc_.load(std::memory_order_relaxed);
  ev.gc_thread = gc_thread_.load(std::memory_order_relaxed);
  if (sampler_) {
    ev.gil_known = sampler_->knows_gil_futex();
    ev.gil_futex = os.where == OsState::Where::kSyscall && sampler_->is_gil_futex(os.arg0);
    ev.sampler_has_gil = sampler_->sampler_holds_gil();
  }
  // Compared with the previous sample of this stall, or for the first one with the CPU reading
  // taken before the stall was detected (the other counters are not read then).
  const bool first = stall_.prev_t < 0;
  const Nanos since = first ? stall_.pre_t : stall_.prev_t;
  const Nanos cpu_then = first ? stall_.pre_cpu : stall_.prev_cpu;
  if (since < 0 || t <= since) return ev;
  ev.elapsed = t - since;
  if (cpu >= 0 && cpu_then >= 0) ev.cpu = std::max<Nanos>(cpu - cpu_then, 0);
  if (first) return ev;
  if (os.run_delay >= 0 && stall_.prev_run_delay >= 0) {
    ev.run_delay = std::max<Nanos>(os.run_delay - stall_.prev_run_delay, 0);
  }
  if (os.major_faults >= 0 && stall_.prev_faults >= 0) {
    ev.major_faults = std::max<long>(os.major_faults - stall_.prev_faults, 0);
  }
  return ev;
}

namespace {
// CPython's default switch interval (sys.getswitchinterval()): how long a thread running Python
// keeps the GIL when another asks for it.
constexpr Nanos kGilSwitchInterval = 5 * kMs;
// How often a stall counts the connections waiting for the server (see take_sample).
constexpr Nanos kQueuedEvery = 100 * kMs;
}  // namespace

void Engine::take_sample() {
  Sample s;
  s.t = clock_->now();
  OsState os;
  Evidence ev;
  if (probe_) {
    // Read the OS state before asking for the GIL: once the sampler asks, the loop thread may be
    // parked on the GIL because of us and would look like a lock wait.
    os = probe_->state();
    s.cpu = probe_->cpu_time();
    ev = evidence(os, s.t, s.cpu);
    s.kind = refine(os, ev);
  }
  s.inflight = requests_.inflight();
  if (sampler_ && s.kind != Kind::kIdle) {
    bool ok = false;
    if (s.kind == Kind::kGil && probe_) {
      // The loop waits for the GIL: the culprit is the thread running Python meanwhile (a sync
      // endpoint in the threadpool carries its request's Context, so it names its request).
      const auto running =
          probe_->running_threads({probe_->tid(), watchdog_tid_, sampler_->thread_id()});
      if (!running.empty()) {
        ok = sampler_->sample_thread(s, config_.stack_timeout, config_.capture_stacks,
                                     running.front());
      }
    }
    if (!ok) {
      // A lock wait: whoever holds the lock runs meanwhile, so the other threads are read in
      // the same capture and the likely holder kept (see thread_stacks.h).
      ok = s.kind == Kind::kLock && config_.capture_stacks
               ? sampler_->sample_all(s, config_.stack_timeout)
               : sampler_->sample(s, config_.stack_timeout, config_.capture_stacks);
      if (!s.others.empty()) {
        s.holder = choose_holder(std::move(s.others));
        s.others.clear();
      }
    }
    if (ok && s.kind == Kind::kLock && s.token == 0 && s.culprit < 0 && probe_) {
      // A lock wait outside any request with nothing to name on the loop's stack (Datasette: a
      // cursor freed between two callbacks waits for the SQLite connection a SQL thread runs a
      // query on). A pthread mutex records its owner, and what that thread runs is the culprit,
      // as the GIL's holder is for a GIL wait. With a line of the loop's own, that line is the
      // culprit: it chose to wait on a thread's lock.
      const long owner = probe_->lock_owner(os);
      Sample held;
      if (owner > 0 &&
          sampler_->sample_thread(held, config_.stack_timeout, config_.capture_stacks, owner) &&
          held.culprit >= 0) {
        s.token = held.token;
        s.frames = std::move(held.frames);
        s.culprit = held.culprit;
        s.culprit_is_library = held.culprit_is_library;
        // The owner's stack is another thread's: the loop's task did not run it (a thread's
        // sample names no task, as the GIL holder's does not).
        s.task = std::move(held.task);
        s.thread = owner;
        // Said in the holder fields too, so that the event says whose stack it shows.
        s.holder.thread = owner;
        s.holder.frames = s.frames;
        s.holder.culprit = s.culprit;
        s.holder.culprit_is_library = s.culprit_is_library;
      }
    }
    if (!ok) {
      stack_timeouts_.fetch_add(1, std::memory_order_relaxed);
      s.has_stack = false;
      s.no_gil = true;
      // Nobody could get the GIL in time. A loop thread that is running holds it itself, in
      // native code (a regex, a big json or pickle, a C extension); one that waits on a futex
      // waits for it while another thread holds it, unless that futex is known not to be it.
      const Kind seen = s.kind;
      // A running loop thread that the sampler could not get the GIL from: what it did with the
      // CPU meanwhile tells native code (kept it busy) from Python on a contended GIL.
      Evidence during;
      if (seen == Kind::kCpu && probe_ && clock_->now() - s.t >= kGilSwitchInterval) {
        // Only over a wait long enough for Python to have had to let go of the GIL once: the
        // sampler answers at once while an earlier request still waits, and a few microseconds
        // of CPU clock say nothing.
        const Nanos t = clock_->now();
        const OsState later = probe_->state();
        const Nanos cpu = probe_->cpu_time();
        during.elapsed = t - s.t;
        if (cpu >= 0 && s.cpu >= 0) during.cpu = std::max<Nanos>(cpu - s.cpu, 0);
        if (later.run_delay >= 0 && os.run_delay >= 0) {
          during.run_delay = std::max<Nanos>(later.run_delay - os.run_delay, 0);
        }
      }
      // As of now, when it gave up: who holds the GIL it could not get.
      ev.sampler_has_gil = sampler_->sampler_holds_gil();
      if (ev.gc_thread == 0) ev.gc_thread = gc_thread_.load(std::memory_order_relaxed);
      s.kind = without_stack(seen, ev, during);
      if (seen == Kind::kLock && s.kind == Kind::kGil) {
        // The sampler is still waiting for the GIL; point its pending capture at the thread
        // holding it (a zero timeout only retargets), so the late stack names the culprit.
        if (probe_) {
          const auto running =
              probe_->running_threads({probe_->tid(), watchdog_tid_, sampler_->thread_id()});
          Sample ignored;
          if (!running.empty()) {
            (void)sampler_->sample_thread(ignored, 0, config_.capture_stacks, running.front());
          }
        }
      }
    }
  }
  // A wait for a collection on another thread names that thread, as a lock wait names its holder.
  if (s.kind == Kind::kGc && ev.gc_thread != 0) s.holder.thread = ev.gc_thread;
  // The loop may have moved on while the sampler waited for the GIL; then the stack belongs to
  // whatever ran after the stall and must not be pinned on it.
  if (pulse_.epoch() != stall_.epoch) return;
  // Who else waits: connections the server has not even seen yet. Counted at detection, then
  // at most every kQueuedEvery: a few /proc reads, on this thread, never the loop's.
  if (probe_ && (stall_.queued_read < 0 || s.t - stall_.queued_read >= kQueuedEvery)) {
    s.queued = probe_->waiting_connections();
    stall_.queued_read = s.t;
  }
  attribute(s);
  stall_.prev_t = s.t;
  stall_.prev_run_delay = os.run_delay;
  stall_.prev_cpu = s.cpu;
  stall_.prev_faults = os.major_faults;
  samples_.fetch_add(1, std::memory_order_relaxed);
  stall_.samples.push_back(std::move(s));
  fill_late_stack(clock_->now());

  if (stall_.samples.size() > config_.max_samples) {
    // A hang: keep every other sample, and always the newest, and sample half as often, so
    // memory stays bounded and the samples still span the whole stall evenly.
    std::vector<Sample> kept;
    kept.reserve(stall_.samples.size() / 2 + 2);
    const std::size_t last = stall_.samples.size() - 1;
    for (std::size_t i = 0; i < last; i += 2) kept.push_back(std::move(stall_.samples[i]));
    kept.push_back(std::move(stall_.samples[last]));
    stall_.samples = std::move(kept);
    stall_.sample_every *= 2;
  }

  const StallInput in = stall_input(stall_.samples.back().t);
  const StallResult live = split_stall(stall_.samples, in);
  // A request whose live event rests on a few samples, at least one full interval of them, is
  // settled when it ends (its stall is over); one seen only at detection and its confirmation,
  // 2 ms apart, may be a short request that a busy host descheduled in the middle of a saturated
  // loop, and ending the stall there would pin the whole stretch on it.
  std::vector<std::uint64_t> settled;
  for (const auto& ev : live.events) {
    if (ev.token != 0 && ev.samples >= kSettleSamples) settled.push_back(ev.token);
  }
  requests_.set_live(spans_of(live.events), std::move(settled));
}

void Engine::attribute(Sample& s) const {
  if (s.token == 0) return;
  const std::optional<Nanos> began = requests_.open_since(s.token, stall_.start);
  if (s.thread != 0) {
    s.began = began.value_or(0);
    return;  // another thread's stack: a sync endpoint's, whose request waits for it
  }
  if (began) {
    s.began = *began;
    s.task.clear();  // inside a request, the request names the work
    return;
  }
  // The token of a request that was over before this stall began, in the Context of a task it
  // left behind: a worker that lifespan startup created (Gradio's queue workers), a
  // fire-and-forget task. The request's code had finished; what runs now is that task's, outside
  // any request, and named by it. (A request that ended during the stall is still named: its
  // block and its response often share one loop iteration, and a late stack of it is only
  // looked at once the stall is over.) That request is who created the task: kept as its origin.
  s.origin = s.token;
  s.token = 0;
}

void Engine::fill_late_stack(Nanos until) {
  if (!sampler_) return;
  Sample late;
  if (!sampler_->take_late(late)) return;
  // Taken once native code let go of the GIL: right after the call that held it, in the frame
  // that made it. It names the samples that had to go without a stack, if it is from this stall.
  // Another thread's stack (the GIL holder's) still says where it was once it let go, even if
  // the loop got the GIL first and finished its iteration: allow it a little past the end.
  const Nanos limit = late.thread != 0 ? until + config_.stack_timeout : until;
  if (late.t < stall_.start || late.t > limit || !late.has_stack) return;
  // The GIL holder seen only after it had left its request (back waiting in its pool): where it
  // is now says nothing about what held the GIL. The stall keeps its kind without a culprit.
  // (Its library frames would be the pool's own loop: a thread back in anyio's worker loop.)
  if (late.thread != 0 && late.token == 0 && !names_application(late)) return;
  attribute(late);
  bool used = false;
  for (auto& s : stall_.samples) {
    if (s.has_stack || s.t > late.t) continue;
    s.token = late.token;
    s.began = late.began;
    s.frames = late.frames;
    s.culprit = late.culprit;
    s.culprit_is_library = late.culprit_is_library;
    s.task = late.task;
    s.origin = late.origin;
    s.has_stack = true;
    used = true;
  }
  if (used) late_stacks_.fetch_add(1, std::memory_order_relaxed);
}

StallInput Engine::stall_input(Nanos end) const {
  StallInput in;
  in.start = stall_.start;
  in.end = end;
  in.threshold = stall_.threshold;
  in.pre_t = stall_.pre_t;
  in.pre_cpu = stall_.pre_cpu;
  in.steps = requests_.steps_since(stall_.start);
  in.stack_timeout = config_.stack_timeout;
  return in;
}

void Engine::finish_stall(Nanos end) {
  const bool missing =
      std::any_of(stall_.samples.begin(), stall_.samples.end(),
                  [](const Sample& s) { return !s.has_stack && s.kind != Kind::kIdle; });
  // The GIL was just released; the sampler is about to get it and see who held it. Worth a
  // bounded wait, or the event goes out without its stack.
  if (missing && sampler_) sampler_->wait_late(config_.stack_timeout);
  fill_late_stack(end);
  const StallInput in = stall_input(std::max(end, stall_.start));
  StallResult result = split_stall(stall_.samples, in);
  for (auto& ev : result.events) {
    ev.hang = stall_.hang && config_.hang_threshold > 0 && ev.duration >= config_.hang_threshold;
  }
  requests_.commit(spans_of(result.events));
  saturated_.fetch_add(result.saturated, std::memory_order_relaxed);
  detected_.fetch_add(result.events.size(), std::memory_order_relaxed);
  bool queued = false;
  for (auto& ev : result.events) queued |= queue_.push(std::move(ev));
  stall_ = Stall{};
  stall_active_.store(false, std::memory_order_release);
  if (queued) signal_loop();
}

}  // namespace loopguard
