// The engine: pulse state written by the loop thread, a request table, and the watchdog thread
// that notices a stall while it is still going on, samples it, and turns it into events.
//
//   loop thread                              watchdog thread (never runs Python)
//   wait_begin()/wait_end() around select    wakes every `interval` while there is work, once per
//   or heartbeat() from call_later           `idle_tick` otherwise; sees busy_since older than the
//   begin_request()/end_request()            threshold -> samples (OS state, CPU clock, and a stack
//   drain() when notify_fd() is readable     through StackSampler) until the loop is back, then
//                                            splits the stall into events and queues them.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "loopguard/clock.h"
#include "loopguard/cumulative.h"
#include "loopguard/event.h"
#include "loopguard/histogram.h"
#include "loopguard/proc.h"
#include "loopguard/ring.h"
#include "loopguard/segment.h"
#include "loopguard/threshold.h"

namespace loopguard {

// What the loop thread publishes. busy_since is 0 while the loop waits for I/O; otherwise the
// monotonic time since which it has not been back. epoch counts busy stretches that ended.
class LoopPulse {
 public:
  // Selector mode: the loop is about to wait in select / it came back from select.
  void wait_begin(Nanos now) noexcept;
  void wait_end(Nanos now) noexcept { busy_since_.store(now, std::memory_order_release); }
  // Heartbeat mode: a beat proves the loop ran now; the next is due at now + interval, so if it
  // has not come by then the loop has been busy since then.
  void beat(Nanos now, Nanos interval) noexcept;
  void heartbeat_off(Nanos now) noexcept;

  Nanos busy_since() const noexcept { return busy_since_.load(std::memory_order_acquire); }
  std::uint64_t epoch() const noexcept { return epoch_.load(std::memory_order_acquire); }

  // Watchdog: remember when the busy stretch `epoch` ends.
  void watch(std::uint64_t epoch) noexcept;
  // When the watched stretch ended, or 0 if that was missed (it ended while watch() was called).
  Nanos watched_end() const noexcept { return watched_end_.load(std::memory_order_relaxed); }

 private:
  void end_busy(Nanos now) noexcept;

  std::atomic<Nanos> busy_since_{0};
  std::atomic<std::uint64_t> epoch_{0};
  std::atomic<std::uint64_t> watched_{~std::uint64_t{0}};
  std::atomic<Nanos> watched_end_{0};
};

struct RequestCounters {
  std::uint32_t count = 0;  // blocking events this request's code caused
  Nanos total = 0;          // their summed duration
};

// Requests in flight, with the blocking they caused. The watchdog updates the live part while a
// stall is still going on, because the guilty request often sends its response in the same loop
// iteration that its block ends in, before any event could be drained.
class RequestTable {
 public:
  // `label` names the request in native hang reports ("GET /path id=..."), already escaped.
  std::uint64_t begin(std::string label = {});
  void end(std::uint64_t token);
  std::uint32_t inflight() const;
  bool contains(std::uint64_t token) const;
  RequestCounters get(std::uint64_t token) const;
  std::string label(std::uint64_t token) const;

  using Credits = std::vector<std::pair<std::uint64_t, Nanos>>;
  void set_live(Credits credits);
  void commit(const Credits& credits);
  // One more event for one request, outside any stall (the live credits stay as they are).
  void credit(std::uint64_t token, Nanos duration);

 private:
  mutable std::mutex mutex_;
  std::uint64_t next_ = 1;
  struct Entry {
    RequestCounters counters;
    std::string label;
  };
  std::unordered_map<std::uint64_t, Entry> inflight_;
  Credits live_;
};

// Captures the loop thread's Python stack and current request token. Implemented over CPython in
// the extension; tests use fakes. Must return within `timeout` (false: no stack this time).
class StackSampler {
 public:
  virtual ~StackSampler() = default;
  // Fills out.token, and with `frames` also out.frames/culprit/has_stack.
  virtual bool sample(Sample& out, Nanos timeout, bool frames) = 0;
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
  // The sampler's own kernel thread id, -1 if it has no thread.
  virtual long thread_id() const { return -1; }
  // Stops the sampler's own thread. Called without the GIL.
  virtual void shutdown() {}
  // How long each sample held the loop thread off the GIL, if the sampler measures it.
  virtual const LagHistogram* pause_histogram() const { return nullptr; }
};

struct WatchdogConfig {
  Nanos interval = 10 * kMs;      // tick while there is work; sampling period during a stall
  Nanos idle_tick = 1000 * kMs;   // tick while nothing is in flight (the idle CPU budget)
  Nanos grace = 1000 * kMs;       // stay on `interval` this long after the last request ended
  Nanos confirm_delay = 2 * kMs;  // second sample right after detection (see segment.h)
  Nanos stack_timeout = 20 * kMs;
  std::size_t max_samples = 256;  // per stall; beyond it samples are thinned and slowed down
  std::size_t ring_capacity = 1024;
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
  void wait_begin() noexcept;
  void wait_end() noexcept;
  void heartbeat() noexcept;
  void heartbeat_off() noexcept;
  std::uint64_t begin_request(std::string label = {});
  void end_request(std::uint64_t token);
  // Loop thread: one step of a request's own coroutine ran from `start` to `end` (monotonic),
  // using `cpu` of the thread's CPU clock (-1: not measured). kReport: take_cumulative() returns
  // the event, already credited to the request.
  StepVerdict record_step(std::uint64_t token, Nanos start, Nanos end, Nanos cpu);
  std::optional<Event> take_cumulative();
  // Loop thread, from gc.callbacks: a collection started/finished on the loop thread.
  void gc_begin() noexcept { in_gc_.store(true, std::memory_order_relaxed); }
  void gc_end() noexcept { in_gc_.store(false, std::memory_order_relaxed); }
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
    Nanos prev_t = -1, prev_run_delay = -1;  // for the starvation share between samples
    Nanos next_hang_report = 0;
    Nanos hang_every = 0;
    bool hang = false;
    bool os_detected = false;  // noticed by the OS check, not the pulse (see os_busy_since)
    std::vector<Sample> samples;
  };

  void run();
  bool active(Nanos now) const;
  Nanos os_busy_since(Nanos now, std::uint64_t epoch);
  void begin_stall(Nanos now, Nanos busy_since, std::uint64_t epoch);
  void take_sample();
  Kind refine_kind(const OsState& os, Nanos t, Kind kind);
  void fill_late_stack(Nanos until);
  void report_hang(Nanos now);
  void finish_stall(Nanos end);
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
  BoundedQueue<Event> ring_;
  CumulativeTracker cumulative_;  // loop thread only, as is the next member
  std::optional<Event> cumulative_event_;

  std::unique_ptr<std::thread> thread_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool woken_ = false;
  std::atomic<bool> deep_sleep_{false};
  std::atomic<bool> in_gc_{false};
  long watchdog_tid_ = -1;
  std::atomic<Nanos> last_request_end_{0};
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
  std::atomic<std::uint64_t> cumulative_events_{0};
  std::atomic<Nanos> saturated_{0};
};

}  // namespace loopguard
