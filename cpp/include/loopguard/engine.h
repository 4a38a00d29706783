// The engine: pulse state written by the loop thread, a request table, and the watchdog thread
// that notices a stall while it is still going on, samples it, and turns it into events.
//
//   loop thread                              watchdog thread (never runs Python)
//   wait_begin()/wait_end() around select    wakes every `interval` while there is work; otherwise
//   or heartbeat() from call_later           sleeps in the kernel until a timer the loop armed on
//   begin_request()/end_request()            leaving select expires (or `idle_tick`); sees
//   settle() when its own code runs again    busy_since older than the threshold -> samples (OS
//   pause()/resume() when it stops/reruns    state, CPU clock, a stack through StackSampler) until
//   drain() when notify_fd() is readable     the loop is back, then splits the stall into events
//                                            and queues them.
//
// An engine belongs to one loop on one thread: paused while that loop is not running, silent for
// good once its thread has exited (see watch_thread_exit()).
//
// The pulse is LoopPulse (loop_pulse.h), the table RequestTable (request_table.h). Engine itself is
// implemented in engine.cpp (life cycle, the watchdog thread's loop), engine_loop.cpp (what the
// loop thread calls), stall.cpp (sampling a stall, splitting it into events) and hang_report.cpp.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "loopguard/bounded_queue.h"
#include "loopguard/clock.h"
#include "loopguard/cumulative.h"
#include "loopguard/event.h"
#include "loopguard/histogram.h"
#include "loopguard/loop_pulse.h"
#include "loopguard/proc.h"
#include "loopguard/request_table.h"
#include "loopguard/segment.h"
#include "loopguard/stack_sampler.h"
#include "loopguard/thread_stacks.h"
#include "loopguard/threshold.h"

namespace loopguard {

struct WatchdogConfig {
  Nanos interval = 10 * kMs;      // tick while there is work; sampling period during a stall
  Nanos idle_tick = 1000 * kMs;   // tick while nothing is in flight (the idle CPU budget)
  Nanos grace = 1000 * kMs;       // stay on `interval` this long after the last request ended
  Nanos confirm_delay = 2 * kMs;  // second sample right after detection (see segment.h)
  Nanos stack_timeout = 20 * kMs;
  std::size_t max_samples = 256;  // per stall; beyond it samples are thinned and slowed down
  std::size_t queue_capacity = 1024;
  // How long settle() waits for the watchdog to finish a stall (a sample in progress and a late
  // stack may each take up to stack_timeout).
  Nanos settle_timeout = 100 * kMs;
  bool capture_stacks = true;
  // A stall this long is a hang: reported to hang_fd at once, from the watchdog, then again at
  // doubling intervals while it lasts. 0 disables.
  Nanos hang_threshold = 1000 * kMs;
  int hang_fd = 2;
  CumulativeConfig cumulative;
};

struct EngineStats {
  std::uint64_t stalls = 0;
  // Stall events the split produced, counted before the hand-off queue: always equal to
  // events_emitted + events_dropped, so a soak can check that no event vanishes unaccounted.
  std::uint64_t events_detected = 0;
  std::uint64_t events_emitted = 0;
  std::uint64_t events_dropped = 0;
  std::uint64_t samples = 0;
  std::uint64_t stack_timeouts = 0;
  std::uint64_t hangs = 0;
  std::uint64_t late_stacks = 0;
  std::uint64_t unlocked_stacks = 0;  // hang reports whose stack was read without the GIL
  std::uint64_t cumulative_events = 0;
  Nanos saturated = 0;
  Nanos threshold = 0;
  Nanos baseline = 0;
  std::uint64_t lag_count = 0;
  Nanos lag_p50 = 0, lag_p90 = 0, lag_p99 = 0, lag_max = 0;
  std::uint32_t inflight = 0;
  std::uint64_t pause_count = 0;
  Nanos pause_p50 = 0, pause_p99 = 0, pause_max = 0;
};

// Shared between an engine and the thread-local record of the loop thread it watches, so that
// whichever goes first (the engine, or the thread) never leaves the other a dangling pointer.
struct ThreadExitHook;

class Engine {
 public:
  Engine(const WatchdogConfig& config, const ThresholdConfig& threshold,
         std::unique_ptr<ThreadProbe> probe, std::unique_ptr<StackSampler> sampler,
         const Clock* clock = nullptr);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  void start();
  // Stops and joins the watchdog. Call without the GIL: the sampler may be waiting for it.
  void stop();
  // After fork() in the child: the threads are gone and mutexes may be held by them. Forget the
  // threads without joining, and never touch the inherited locks again.
  void abandon_after_fork() noexcept;

  // Loop thread.
  // Registers the calling thread (the loop's) so that its exit silences this engine for good: a
  // loop that dies with its thread (a TestClient portal, a worker thread) never closes itself.
  void watch_thread_exit();
  // What the thread's exit does (public for that record, and for tests): silent for good.
  void loop_thread_exited() noexcept;
  // The loop is about to stop running (loop.stop(), run_forever() returning): a stall in progress
  // ends now, and nothing is watched until resume(). Sync code between two runs of a loop is not
  // the loop's blocking.
  void pause() noexcept;
  void resume() noexcept;
  bool paused() const noexcept { return paused_.load(std::memory_order_relaxed); }
  bool timer_armed() const noexcept { return timer_armed_.load(std::memory_order_relaxed); }
  // Whether a stall is in progress or events wait to be drained: settle() has something to do.
  bool unsettled() const noexcept;
  // The loop thread runs its own code again (a request's code resumed or finished), so a stall in
  // progress is over: the watchdog finishes it now instead of at its next look. Blocks until it
  // did (bounded by settle_timeout); call without the GIL. True when events wait in the queue.
  // `in_select`: the loop is about to wait (wait_begin() said so already), not running code.
  bool settle(bool in_select = false);
  // True when a stall was in progress: it ends here, and settle(true) hands its events over
  // before the select that follows returns (the notify pipe is readable by then).
  bool wait_begin() noexcept;
  void wait_end() noexcept;
  void heartbeat() noexcept;
  void heartbeat_off() noexcept;
  std::uint64_t begin_request(std::string label = {});
  // True when the request's code was part of a stall still in progress: the caller should
  // settle() now, so that its events are delivered before the request is over. `last` gets the
  // request's final counters (see RequestTable::get for a stall still in progress).
  bool end_request(std::uint64_t token, RequestCounters* last = nullptr);
  // What end_request would return, asked before it: a caller that settles first, while the
  // request is still in the table, gets counters that the stall's commit has made final.
  bool ends_stall(std::uint64_t token) const {
    return stall_active_.load(std::memory_order_acquire) && requests_.settles(token);
  }
  // Whether drain() has anything, without taking a lock.
  bool has_events() const noexcept { return queue_.has_items(); }
  // Loop thread: one step of a request's own coroutine ran from `start` to `end` (monotonic),
  // using `cpu` of the thread's CPU clock (-1: not measured). kReport: take_cumulative() returns
  // the event, already credited to the request.
  StepVerdict record_step(std::uint64_t token, Nanos start, Nanos end, Nanos cpu);
  std::optional<Event> take_cumulative();
  // Loop thread, from gc.callbacks: a collection started/finished on the loop thread.
  void gc_begin() noexcept { in_gc_.store(true, std::memory_order_relaxed); }
  void gc_end() noexcept { in_gc_.store(false, std::memory_order_relaxed); }
  // Any other thread, from gc.callbacks: a collection started on thread `tid` (kernel id) or
  // finished. One collection runs at a time in an interpreter, under the GIL, so one id is all.
  void gc_elsewhere_begin(long tid) noexcept { gc_thread_.store(tid, std::memory_order_relaxed); }
  void gc_elsewhere_end() noexcept { gc_thread_.store(0, std::memory_order_relaxed); }
  RequestCounters request_counters(std::uint64_t token) const { return requests_.get(token); }
  std::vector<Event> drain();
  void calibrate(std::vector<Nanos> lags) { threshold_.calibrate(std::move(lags)); }

  // Whether the loop should keep its heartbeat going: requests in flight, or recently so.
  bool wants_heartbeat() const noexcept;
  int notify_fd() const noexcept { return notify_read_; }
  Nanos threshold() const noexcept { return threshold_.current(); }
  EngineStats stats() const;
  const LagHistogram& lag_histogram() const noexcept { return lag_; }
  const Clock& clock() const noexcept { return *clock_; }

  // One watchdog decision at time `now`; returns when it wants to run next. The watchdog thread
  // calls it in a loop; unit tests call it directly with a FakeClock instead of starting a thread.
  Nanos step(Nanos now);

 private:
  struct Stall {
    bool active = false;
    std::uint64_t epoch = 0;
    Nanos start = 0;
    Nanos threshold = 0;
    Nanos next_sample = 0;
    Nanos sample_every = 0;
    Nanos pre_t = -1, pre_cpu = -1;
    // The previous sample's readings, which the next one's kind is judged against (Evidence).
    Nanos prev_t = -1, prev_run_delay = -1, prev_cpu = -1;
    long prev_faults = -1;
    Nanos next_hang_report = 0;
    Nanos hang_every = 0;
    bool hang = false;
    bool os_detected = false;  // noticed by the OS check, not the pulse (see os_busy_since)
    Nanos queued_read = -1;    // when the waiting connections were last counted
    std::vector<Sample> samples;
  };

  void run();
  void sleep_until(Nanos deadline);
  void arm_timer() noexcept;
  void disarm_timer() noexcept;
  Nanos finish_paused(Nanos now);
  void note_iteration_rate(Nanos now);
  bool active(Nanos now) const;
  Nanos os_busy_since(Nanos now, std::uint64_t epoch);
  void begin_stall(Nanos busy_since, std::uint64_t epoch);
  void take_sample();
  Evidence evidence(const OsState& os, Nanos t, Nanos cpu) const;
  void fill_late_stack(Nanos until);
  void report_hang(Nanos now);
  enum class Frozen { kNothing, kLoopThread, kEveryThread };
  static Frozen frozen_without_gil(const Sample& latest);
  void finish_stall(Nanos end);
  // A loop-thread sample names a request only while that request is in flight (see .cpp).
  void attribute(Sample& s) const;
  // What split_stall needs of the stall in progress, as of `end`.
  StallInput stall_input(Nanos end) const;
  void signal_loop() noexcept;
  void wake() noexcept;

  const WatchdogConfig config_;
  SteadyClock steady_;
  const Clock* clock_;
  std::unique_ptr<ThreadProbe> probe_;
  std::unique_ptr<StackSampler> sampler_;
  Threshold threshold_;
  LoopPulse pulse_;
  RequestTable requests_;
  LagHistogram lag_;
  BoundedQueue<Event> queue_;
  CumulativeTracker cumulative_;  // loop thread only, as are the next two members
  std::optional<Event> cumulative_event_;
  // Selector mode: when the current iteration left select (0: in select, or paused). The loop-lag
  // sample spans the whole iteration even when settle() ended the busy stretch in its middle.
  Nanos iteration_start_ = 0;

  std::unique_ptr<std::thread> thread_;
  std::mutex mutex_;
  std::condition_variable settled_cv_;
  bool stop_ = false;
  bool woken_ = false;
  bool running_ = false;  // the watchdog thread is in run()
  std::uint64_t settle_requested_ = 0;
  std::uint64_t settle_done_ = 0;
  std::atomic<bool> deep_sleep_{false};
  std::atomic<bool> paused_{false};
  std::atomic<bool> loop_gone_{false};
  std::atomic<bool> stall_active_{false};  // stall_.active, readable from the loop thread
  // The watchdog sleeps in ppoll on wake_fd_ (an eventfd: wake(), stop(), settle()) and timer_fd_
  // (a one-shot timerfd the loop arms when it leaves select while the watchdog sleeps deeply).
  int wake_fd_ = -1;
  int timer_fd_ = -1;
  std::atomic<bool> timer_armed_{false};
  std::shared_ptr<ThreadExitHook> exit_hook_;
  std::atomic<bool> in_gc_{false};
  std::atomic<long> gc_thread_{0};  // another thread inside a collection, 0: none
  long watchdog_tid_ = -1;
  std::atomic<Nanos> last_request_end_{0};
  // A loop iterating faster than kBusyIterations a second with nothing in flight (excluded paths,
  // background tasks) keeps the watchdog ticking until then, instead of paying the kernel timer's
  // two system calls on every iteration (see note_iteration_rate()).
  std::atomic<Nanos> busy_until_{0};
  std::uint64_t rate_epoch_ = 0;  // watchdog thread: iterations counted since rate_t_
  Nanos rate_t_ = 0;
  bool abandoned_ = false;

  int notify_read_ = -1;
  int notify_write_ = -1;

  // Watchdog-thread state.
  Stall stall_;
  Nanos os_busy_since_ = 0;  // the OS saw the loop thread out of epoll_wait since then
  std::uint64_t os_busy_epoch_ = 0;
  std::uint64_t pre_epoch_ = ~std::uint64_t{0};
  Nanos pre_t_ = -1, pre_cpu_ = -1;

  std::atomic<std::uint64_t> stalls_{0};
  // Set by the first heartbeat() or heartbeat_off(): the loop has no select hook, and answers
  // pokes (see step()).
  std::atomic<bool> heartbeat_mode_{false};
  std::atomic<std::uint64_t> detected_{0};
  std::atomic<std::uint64_t> samples_{0};
  std::atomic<std::uint64_t> stack_timeouts_{0};
  std::atomic<std::uint64_t> hangs_{0};
  std::atomic<std::uint64_t> late_stacks_{0};
  std::atomic<std::uint64_t> unlocked_stacks_{0};
  std::atomic<std::uint64_t> cumulative_events_{0};
  std::atomic<Nanos> saturated_{0};
};

}  // namespace loopguard
