#include "loopguard/watchdog.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#endif

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <string>

namespace loopguard {

// ---- Engine -----------------------------------------------------------------------------------

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

struct ThreadExitHook {
  std::mutex mutex;
  Engine* engine = nullptr;  // null once the engine is gone
  pid_t pid = 0;             // a forked child's copy of the thread record must not act
};

namespace {
// One per thread that runs a watched loop; its destructor runs when that thread exits (for the
// main thread, at process exit, after every engine was stopped).
struct ThreadExitRecord {
  std::vector<std::shared_ptr<ThreadExitHook>> hooks;
  ~ThreadExitRecord() {
    for (const auto& hook : hooks) {
      std::lock_guard<std::mutex> lock(hook->mutex);
      if (hook->engine != nullptr && hook->pid == ::getpid()) hook->engine->loop_thread_exited();
    }
  }
};
thread_local ThreadExitRecord thread_exit_record;
}  // namespace

Engine::Engine(const WatchdogConfig& config, const ThresholdConfig& threshold,
               std::unique_ptr<ThreadProbe> probe, std::unique_ptr<StackSampler> sampler,
               const Clock* clock)
    : config_(config),
      clock_(clock != nullptr ? clock : &steady_),
      probe_(std::move(probe)),
      sampler_(std::move(sampler)),
      threshold_(threshold),
      queue_(config.ring_capacity),
      cumulative_(config.cumulative) {
  int fds[2];
  if (::pipe(fds) == 0) {
    for (int fd : fds) {
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
      ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    notify_read_ = fds[0];
    notify_write_ = fds[1];
  }
#ifdef __linux__
  wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  // The timer runs on CLOCK_MONOTONIC, the engine's clock; with a fake clock (unit tests driving
  // step() by hand) it is never armed.
  if (clock == nullptr) timer_fd_ = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
#endif
}

Engine::~Engine() {
  if (abandoned_) return;
  if (exit_hook_) {
    std::lock_guard<std::mutex> lock(exit_hook_->mutex);
    exit_hook_->engine = nullptr;
  }
  stop();
  for (int fd : {notify_read_, notify_write_, wake_fd_, timer_fd_}) {
    if (fd >= 0) ::close(fd);
  }
}

void Engine::watch_thread_exit() {
  if (exit_hook_) return;
  exit_hook_ = std::make_shared<ThreadExitHook>();
  exit_hook_->engine = this;
  exit_hook_->pid = ::getpid();
  auto& hooks = thread_exit_record.hooks;
  // Engines started and stopped on this thread before (a test suite's many loops) leave their
  // hooks behind; drop those, so the record stays as small as the live engines.
  hooks.erase(std::remove_if(hooks.begin(), hooks.end(),
                             [](const std::shared_ptr<ThreadExitHook>& h) {
                               std::lock_guard<std::mutex> lock(h->mutex);
                               return h->engine == nullptr;
                             }),
              hooks.end());
  hooks.push_back(exit_hook_);
}

void Engine::loop_thread_exited() noexcept {
  loop_gone_.store(true, std::memory_order_release);
  wake();
}

void Engine::start() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (thread_ || abandoned_) return;
  stop_ = false;
  running_ = true;
  thread_ = std::make_unique<std::thread>([this] { run(); });
}

void Engine::stop() {
  if (abandoned_) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake();
  if (thread_ && thread_->joinable()) thread_->join();
  thread_.reset();
  // A stall the watchdog had not yet seen end is still delivered: stop() is usually called on the
  // loop thread right after one (a lifespan shutdown that blocked, then completed). The watchdog
  // is joined, so its state is ours now; the sampler is still there for a late stack.
  if (stall_.active) {
    Nanos end = pulse_.epoch() != stall_.epoch ? pulse_.watched_end() : 0;
    if (end <= 0) end = clock_->now();
    finish_stall(end);
  }
  if (sampler_) sampler_->shutdown();
}

void Engine::abandon_after_fork() noexcept {
  // In the child of a fork only the forking thread exists. The watchdog and sampler threads are
  // gone, and any mutex they held at the moment of the fork stays locked forever. Joining would
  // hang and destroying a locked mutex is undefined, so everything is leaked on purpose; the
  // child builds a fresh engine. (The thread-exit hook checks the pid, so it stays inert too.)
  abandoned_ = true;
  (void)thread_.release();
  (void)sampler_.release();
  (void)probe_.release();
}

void Engine::wake() noexcept {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    woken_ = true;
  }
  if (wake_fd_ >= 0) {
    const std::uint64_t one = 1;
    while (::write(wake_fd_, &one, sizeof one) < 0 && errno == EINTR) {
    }
  }
}

void Engine::sleep_until(Nanos deadline) {
  const Nanos wait = std::max<Nanos>(deadline - clock_->now(), 0);
  pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {timer_fd_, POLLIN, 0}};
  const nfds_t count = timer_fd_ >= 0 ? 2 : 1;
  if (wake_fd_ < 0) {
    // No eventfd (not Linux): sleep in short slices so that stop() is still seen promptly.
    std::this_thread::sleep_for(std::chrono::nanoseconds(std::min<Nanos>(wait, 10 * kMs)));
    return;
  }
  timespec ts{static_cast<time_t>(wait / 1'000'000'000), static_cast<long>(wait % 1'000'000'000)};
  if (::ppoll(fds, count, &ts, nullptr) <= 0) return;
  std::uint64_t value = 0;
  if (fds[0].revents & POLLIN) (void)!::read(wake_fd_, &value, sizeof value);
  if (count == 2 && (fds[1].revents & POLLIN)) {
    (void)!::read(timer_fd_, &value, sizeof value);
    timer_armed_.store(false, std::memory_order_relaxed);
  }
}

void Engine::run() {
  watchdog_tid_ = current_tid();
#ifdef __linux__
  // Named, so that whoever lists a process's threads (top -H, py-spy, /proc) sees what it is.
  ::pthread_setname_np(::pthread_self(), "loopguard-watch");
#endif
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    const std::uint64_t settle_seen = settle_requested_;
    woken_ = false;
    lock.unlock();
    const Nanos next = step(clock_->now());
    lock.lock();
    // Everything asked before this step began has been seen by it (the pulse change that a
    // settle() makes happens before its request), so those callers can go on.
    if (settle_done_ < settle_seen) {
      settle_done_ = settle_seen;
      settled_cv_.notify_all();
    }
    if (stop_) break;
    if (loop_gone_.load(std::memory_order_acquire)) break;  // the loop's thread has exited
    if (woken_ || settle_requested_ != settle_seen) continue;
    lock.unlock();
    sleep_until(next);
    lock.lock();
  }
  running_ = false;
  settled_cv_.notify_all();
}

bool Engine::unsettled() const noexcept {
  return stall_active_.load(std::memory_order_acquire) || queue_.has_items();
}

bool Engine::settle(bool in_select) {
  if (!stall_active_.load(std::memory_order_acquire)) return queue_.has_items();
  const bool heartbeat_mode = heartbeat_mode_.load(std::memory_order_relaxed);
  if (in_select) {
    // wait_begin() ended the busy stretch already.
  } else if (heartbeat_mode) {
    heartbeat();  // the beat the stall delayed, with its lag
  } else {
    // Ends the busy stretch for the watchdog, and the loop counts as waiting until the watchdog
    // is done: this wait is ours, not the app's (finishing a stall may wait for a late stack
    // while other threads keep the GIL, and the loop thread, parked on our condition variable,
    // would look like a lock wait of the request that just ended). The loop-lag sample still
    // spans the whole iteration (iteration_start_ is left alone).
    pulse_.wait_begin(clock_->now());
  }
  std::unique_lock<std::mutex> lock(mutex_);
  if (running_ && !stop_) {
    const std::uint64_t want = ++settle_requested_;
    woken_ = true;
    if (wake_fd_ >= 0) {
      const std::uint64_t one = 1;
      (void)!::write(wake_fd_, &one, sizeof one);
    }
    settled_cv_.wait_for(lock, std::chrono::nanoseconds(config_.settle_timeout),
                         [&] { return settle_done_ >= want || !running_; });
  }
  lock.unlock();
  if (!in_select && !heartbeat_mode) pulse_.wait_end(clock_->now());  // the app's code again
  return queue_.has_items();
}

void Engine::pause() noexcept {
  pulse_.heartbeat_off(clock_->now());  // the busy stretch, if any, ends here
  iteration_start_ = 0;                 // and the time until the next run is no loop lag
  paused_.store(true, std::memory_order_release);
  disarm_timer();
  wake();
}

void Engine::resume() noexcept {
  if (!paused_.load(std::memory_order_acquire)) return;
  const Nanos now = clock_->now();
  if (heartbeat_mode_.load(std::memory_order_relaxed)) {
    pulse_.heartbeat_off(now);
  } else {
    pulse_.restart(now);
    iteration_start_ = now;
  }
  paused_.store(false, std::memory_order_release);
  wake();
}

Nanos Engine::finish_paused(Nanos now) {
  if (stall_.active) {
    Nanos end = pulse_.epoch() != stall_.epoch ? pulse_.watched_end() : 0;
    if (end <= 0) end = stall_.samples.empty() ? now : stall_.samples.back().t;
    finish_stall(end);
  }
  os_busy_since_ = 0;
  pre_epoch_ = ~std::uint64_t{0};
  deep_sleep_.store(true, std::memory_order_relaxed);
  // Nothing to look at until resume(), settle() or stop() wakes us.
  return now + 3600 * 1000 * kMs;
}

void Engine::arm_timer() noexcept {
#ifdef __linux__
  if (timer_fd_ < 0 || timer_armed_.exchange(true, std::memory_order_relaxed)) return;
  const Nanos t = std::max<Nanos>(threshold_.current(), kMs);
  itimerspec spec{};
  spec.it_value.tv_sec = static_cast<time_t>(t / 1'000'000'000);
  spec.it_value.tv_nsec = static_cast<long>(t % 1'000'000'000);
  ::timerfd_settime(timer_fd_, 0, &spec, nullptr);
#endif
}

void Engine::disarm_timer() noexcept {
#ifdef __linux__
  if (timer_fd_ < 0 || !timer_armed_.load(std::memory_order_relaxed) ||
      !timer_armed_.exchange(false, std::memory_order_relaxed)) {
    return;
  }
  const itimerspec off{};
  ::timerfd_settime(timer_fd_, 0, &off, nullptr);
#endif
}

bool Engine::active(Nanos now) const {
  if (requests_.inflight() > 0) return true;
  if (now < busy_until_.load(std::memory_order_relaxed)) return true;
  const Nanos last = last_request_end_.load(std::memory_order_relaxed);
  return last > 0 && now - last < config_.grace;
}

namespace {
// Where the kernel timer stops paying: arming and disarming it costs the loop two system calls an
// iteration (2-3 us on these machines), a watchdog ticking at the interval costs about 47 us a
// wake, 100 wakes a second. Below about 2,000 iterations a second the timer is cheaper.
constexpr std::uint64_t kBusyIterations = 1000;
}  // namespace

void Engine::note_iteration_rate(Nanos now) {
  const std::uint64_t epoch = pulse_.epoch();
  if (rate_t_ == 0 || now - rate_t_ < 1000 * kMs) {
    if (rate_t_ == 0) {
      rate_t_ = now;
      rate_epoch_ = epoch;
    }
    return;
  }
  const auto per_second =
      static_cast<double>(epoch - rate_epoch_) * 1e9 / static_cast<double>(now - rate_t_);
  if (per_second > static_cast<double>(kBusyIterations)) {
    busy_until_.store(now + config_.grace, std::memory_order_relaxed);
  }
  rate_t_ = now;
  rate_epoch_ = epoch;
}

bool Engine::wants_heartbeat() const noexcept { return active(clock_->now()); }

Nanos Engine::step(Nanos now) {
  // A loop that is not running (stopped between two runs, or its thread gone) blocks nothing:
  // whatever its thread does meanwhile is not the loop's.
  if (paused_.load(std::memory_order_acquire) || loop_gone_.load(std::memory_order_acquire)) {
    return finish_paused(now);
  }
  note_iteration_rate(now);
  if (stall_.active) {
    // Back in epoll_wait: the loop waits again even if the pulse has not said so (the pulse is
    // silent while uvloop's heartbeat is off, and the OS noticed this stall, not the pulse).
    const bool os_idle =
        stall_.os_detected && !stall_.samples.empty() && stall_.samples.back().kind == Kind::kIdle;
    if (pulse_.epoch() == stall_.epoch && !os_idle) {
      if (now >= stall_.next_sample) {
        take_sample();
        stall_.next_sample = clock_->now() + stall_.sample_every;
      }
      report_hang(clock_->now());
      Nanos next = stall_.next_sample;
      if (config_.hang_threshold > 0) {
        next = std::min(
            next, stall_.hang ? stall_.next_hang_report : stall_.start + config_.hang_threshold);
      }
      return next;
    }
    Nanos end = pulse_.epoch() != stall_.epoch ? pulse_.watched_end() : 0;
    if (end <= 0) end = stall_.samples.empty() ? now : stall_.samples.back().t;
    finish_stall(end);
  }

  const Nanos threshold = threshold_.current();
  const std::uint64_t epoch = pulse_.epoch();
  const Nanos pulse_since = pulse_.busy_since();
  Nanos busy_since = pulse_since;
  if (busy_since <= 0 || busy_since > now) {
    // The pulse says the loop waits (or its next beat is not due). Ask the OS as well: a loop
    // thread that left epoll_wait but cannot report it (waiting for the GIL after select), or
    // one blocked while uvloop's heartbeat is off, is busy all the same.
    const Nanos os_since = os_busy_since(now, epoch);
    busy_since = os_since > 0 ? os_since : 0;
  } else {
    os_busy_since_ = 0;
  }
  if (busy_since > 0 && now >= busy_since) {
    if (now - busy_since >= threshold) {
      begin_stall(now, busy_since, epoch);
      return stall_.next_sample;
    }
    // Busy, not yet a stall: note the CPU clock once per busy stretch, so that a stall that
    // follows knows the CPU share of its first, pre-detection part.
    if (pre_epoch_ != epoch) {
      pre_epoch_ = epoch;
      pre_t_ = now;
      pre_cpu_ = probe_ ? probe_->cpu_time() : -1;
    }
    deep_sleep_.store(false, std::memory_order_relaxed);
    return std::min(now + config_.interval, busy_since + threshold);
  }

  Nanos next;
  if (active(now)) {
    deep_sleep_.store(false, std::memory_order_relaxed);
    next = now + config_.interval;
  } else {
    // Nothing in flight: sleep in the kernel. begin_request() wakes us early, and so does the
    // timer the loop arms when it leaves select while we sleep (wait_end()), one threshold later.
    deep_sleep_.store(true, std::memory_order_seq_cst);
    // The loop may have left select between our look at the pulse and the store above, and then
    // it saw us awake and armed nothing: look once more (pairs with the fence in wait_end()).
    std::atomic_thread_fence(std::memory_order_seq_cst);
    const Nanos since = pulse_.busy_since();
    next = now + config_.idle_tick;
    if (since > 0 && since <= now) next = std::min(next, since + threshold);
  }
  // Heartbeat mode: the next beat is due at pulse_since; look again once it is a threshold late.
  if (pulse_since > now) next = std::min(next, pulse_since + threshold);
  return next;
}

Nanos Engine::os_busy_since(Nanos now, std::uint64_t epoch) {
  if (!probe_) return 0;
  const OsState os = probe_->where();  // polled every tick: the cheap read
  if (os.where == OsState::Where::kUnknown || classify(os) == Kind::kIdle) {
    os_busy_since_ = 0;
    pre_epoch_ = ~std::uint64_t{0};
    return 0;
  }
  // First seen busy now, or busy since a loop iteration that has ended meanwhile: start over.
  if (os_busy_since_ == 0 || os_busy_epoch_ != epoch) {
    os_busy_since_ = now;
    os_busy_epoch_ = epoch;
    // With the heartbeat off (uvloop, nothing of ours in flight) a running thread may just be a
    // loop busy with work we do not track: another guard's requests, excluded paths, background
    // tasks. Ask it: the notify pipe makes a live loop run drain(), which beats and so ends this
    // stretch; a loop stuck in one callback cannot, and becomes a stall a threshold later.
    // A heartbeat that is on answers for itself (a missed beat is the stall), so only then.
    if (heartbeat_mode_.load(std::memory_order_relaxed) && pulse_.busy_since() <= 0) signal_loop();
    // The pre-detection CPU reading is per busy stretch; with a silent pulse the epoch does not
    // tell stretches apart, so forget the old one here.
    pre_epoch_ = ~std::uint64_t{0};
  }
  return os_busy_since_;
}

void Engine::begin_stall(Nanos now, Nanos busy_since, std::uint64_t epoch) {
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
  (void)now;
  take_sample();
  stall_.next_sample = clock_->now() + config_.confirm_delay;
}

Evidence Engine::evidence(const OsState& os, Nanos t, Nanos cpu) const {
  Evidence ev;
  ev.in_gc = in_gc_.load(std::memory_order_relaxed);
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
      ev.sampler_has_gil = sampler_->sampler_holds_gil();  // as of now, when it gave up
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

namespace {
// How much of a stack a hang report writes: the short stack of the line, and each thread's in
// the dump of the first report.
constexpr std::size_t kHangLineFrames = 6;
constexpr std::size_t kHangDumpFrames = 24;

void write_all(int fd, const std::string& text) {
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n > 0) {
      done += static_cast<std::size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      break;  // a closed or full stderr must not stop the watchdog
    }
  }
}
}  // namespace

// Which Python frames cannot move while a sample that got no GIL in time says what it says. A
// thread changes its frames only while it holds the GIL and runs bytecode, and a thread running
// bytecode hands the GIL over within the switch interval, far less than the sampler waited. So:
// - the loop thread in a blocking system call (sleep, I/O, a lock) or in native code (running,
//   with the CPU clock advancing and the GIL kept) runs no bytecode, and nobody else got the GIL
//   either: it is the loop's, or held in native code by a thread just as stuck. Every thread's
//   frames stand still.
// - the loop waiting for the GIL: its own frames stand still, but the GIL's holder may be running
//   Python that only lets the GIL go to others, so the other threads are not read.
// - anything else (Python on the CPU that the sampler lost the GIL race to, a starved sampler, a
//   collection that may run finalizers) may be moving its frames: nothing is read.
Engine::Frozen Engine::frozen_without_gil(const Sample& latest) {
  if (!latest.no_gil) return Frozen::kNothing;
  switch (latest.kind) {
    case Kind::kNative:
    case Kind::kSleep:
    case Kind::kIo:
    case Kind::kLock:
      return Frozen::kEveryThread;
    case Kind::kGil:
      return Frozen::kLoopThread;
    default:
      return Frozen::kNothing;
  }
}

void Engine::report_hang(Nanos now) {
  if (config_.hang_threshold <= 0) return;
  if (now - stall_.start < config_.hang_threshold || now < stall_.next_hang_report) return;
  const bool first = !stall_.hang;
  if (first) {
    stall_.hang = true;
    stall_.hang_every = config_.hang_threshold;
    hangs_.fetch_add(1, std::memory_order_relaxed);
  } else {
    stall_.hang_every = std::min<Nanos>(stall_.hang_every * 2, 60'000 * kMs);
  }
  stall_.next_hang_report = now + stall_.hang_every;
  if (config_.hang_fd < 0) return;  // counted and marked, but nowhere to write

  const Sample* latest = stall_.samples.empty() ? nullptr : &stall_.samples.back();
  const Sample* named = nullptr;
  for (auto it = stall_.samples.rbegin(); it != stall_.samples.rend() && named == nullptr; ++it) {
    if (it->has_stack && !it->frames.empty()) named = &*it;
  }
  // The other threads, listed once, at the first report: with the GIL when it can be had,
  // otherwise read without it below.
  std::vector<ThreadStack> others;
  if (first && named != nullptr && sampler_ && config_.capture_stacks && latest != nullptr &&
      !latest->no_gil) {
    Sample all;
    if (sampler_->sample_all(all, config_.stack_timeout)) others = std::move(all.others);
  }
  // No stack through the GIL: read the loop thread's frames without it, which is only sound
  // while nothing can move them (see frozen_without_gil).
  Sample unlocked;
  bool without_gil = false;
  const Frozen frozen = latest != nullptr ? frozen_without_gil(*latest) : Frozen::kNothing;
  if (named == nullptr && frozen != Frozen::kNothing && sampler_ && config_.capture_stacks) {
    const bool all = first && frozen == Frozen::kEveryThread;
    without_gil =
        sampler_->read_without_gil(unlocked, all ? &others : nullptr) && !unlocked.frames.empty();
    if (without_gil) {
      unlocked_stacks_.fetch_add(1, std::memory_order_relaxed);
      named = &unlocked;
    }
  }
  char head[96];
  std::snprintf(head, sizeof head, "loopguard: event loop blocked for %.2f s and still blocked",
                static_cast<double>(now - stall_.start) / 1e9);
  std::string line = head;
  // A stack read without the GIL carries no request (the Context is not read that way).
  const std::uint64_t token =
      named != nullptr && !without_gil ? named->token : (latest ? latest->token : 0);
  const std::string label = token != 0 ? requests_.label(token) : std::string();
  if (!label.empty()) {
    line += " during ";
    append_printable(line, label, 300);
  } else {
    line += " (no active request)";
  }
  line += "; kind=";
  line += kind_name(latest != nullptr ? latest->kind : Kind::kUnknown);
  if (named != nullptr) {
    const auto idx = static_cast<std::size_t>(named->culprit >= 0 ? named->culprit : 0);
    const FrameInfo& f = named->frames[idx];
    line += "; culprit=";
    append_printable(line, f.filename, 400);
    line += ":" + std::to_string(f.line) + " in ";
    append_printable(line, f.function, 200);
    if (without_gil) {
      line += " (read without the GIL); stack=";
      line += short_stack(named->frames, kHangLineFrames);
    }
  } else {
    line += "; culprit=<stack unavailable>";
  }
  line += "\n";
  // Who else runs Python: the thread holding the lock the loop waits on, or the one that is to
  // set its future. Only when there is someone besides the loop thread to show.
  others.erase(std::remove_if(others.begin(), others.end(),
                              [](const ThreadStack& t) { return t.frames.empty(); }),
               others.end());
  if (!others.empty()) {
    const long loop_tid = probe_ ? probe_->tid() : 0;
    std::vector<ThreadStack> threads;
    threads.reserve(others.size() + 1);
    ThreadStack loop;
    loop.thread = loop_tid;
    if (named != nullptr) loop.frames = named->frames;
    threads.push_back(std::move(loop));
    for (auto& t : others) threads.push_back(std::move(t));
    line += "loopguard: Python threads at the first report of this hang:\n";
    line += thread_dump(threads, loop_tid, kHangDumpFrames);
  }
  write_all(config_.hang_fd, line);
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

void Engine::signal_loop() noexcept {
  if (notify_write_ < 0) return;
  const char byte = 1;
  // A full pipe already means "wake up"; nothing else to do on EAGAIN.
  while (::write(notify_write_, &byte, 1) < 0 && errno == EINTR) {
  }
}

bool Engine::wait_begin() noexcept {
  const Nanos now = clock_->now();
  if (iteration_start_ > 0) {
    const Nanos lag = now - iteration_start_;
    lag_.record(lag);
    // Stalls stay out of the adaptive window, or one bad endpoint would raise the bar for itself.
    if (lag < threshold_.current()) threshold_.record(lag, now);
  }
  iteration_start_ = 0;
  pulse_.wait_begin(now);
  disarm_timer();
  return stall_active_.load(std::memory_order_acquire);
}

void Engine::wait_end() noexcept {
  const Nanos now = clock_->now();
  iteration_start_ = now;
  pulse_.wait_end(now);
  // While the watchdog sleeps deeply (nothing in flight), a kernel timer stands in for it: it
  // fires a threshold from now unless the loop is back in select first, so a block outside any
  // request is seen as soon as one inside would be, and an idle loop wakes nobody.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (deep_sleep_.load(std::memory_order_relaxed)) arm_timer();
}

void Engine::heartbeat() noexcept {
  heartbeat_mode_.store(true, std::memory_order_relaxed);
  const Nanos now = clock_->now();
  const Nanos due = pulse_.busy_since();
  if (due > 0) {
    const Nanos lag = std::max<Nanos>(now - due, 0);
    lag_.record(lag);
    if (lag < threshold_.current()) threshold_.record(lag, now);
  }
  pulse_.beat(now, config_.interval);
}

void Engine::heartbeat_off() noexcept {
  heartbeat_mode_.store(true, std::memory_order_relaxed);
  pulse_.heartbeat_off(clock_->now());
}

std::uint64_t Engine::begin_request(std::string label) {
  const std::uint64_t token = requests_.begin(std::move(label), clock_->now());
  if (deep_sleep_.load(std::memory_order_relaxed) && deep_sleep_.exchange(false)) wake();
  return token;
}

bool Engine::end_request(std::uint64_t token, RequestCounters* last) {
  const Nanos now = clock_->now();
  const bool blocked = requests_.end(token, last, now);
  cumulative_.forget(token);
  last_request_end_.store(now, std::memory_order_relaxed);
  return blocked && stall_active_.load(std::memory_order_acquire);
}

StepVerdict Engine::record_step(std::uint64_t token, Nanos start, Nanos end, Nanos cpu) {
  // Only requests in flight have a window: nothing to forget for one that already ended.
  if (!requests_.step(token, start, end)) return StepVerdict::kNone;
  Event ev;
  const StepVerdict verdict = cumulative_.record(token, start, end, cpu, threshold_.current(), ev);
  if (verdict != StepVerdict::kReport) return verdict;
  const std::uint32_t inflight = requests_.inflight();
  ev.victims = inflight > 0 ? inflight - 1 : 0;
  requests_.credit(token, ev.duration);
  cumulative_events_.fetch_add(1, std::memory_order_relaxed);
  cumulative_event_ = std::move(ev);
  return verdict;
}

std::optional<Event> Engine::take_cumulative() {
  std::optional<Event> ev = std::move(cumulative_event_);
  cumulative_event_.reset();
  return ev;
}

std::vector<Event> Engine::drain() {
  if (notify_read_ >= 0) {
    char buf[64];
    while (::read(notify_read_, buf, sizeof buf) > 0) {
    }
  }
  return queue_.drain();
}

EngineStats Engine::stats() const {
  EngineStats s;
  s.stalls = stalls_.load(std::memory_order_relaxed);
  s.events_detected = detected_.load(std::memory_order_relaxed);
  s.events_emitted = queue_.pushed();
  s.events_dropped = queue_.dropped();
  s.samples = samples_.load(std::memory_order_relaxed);
  s.stack_timeouts = stack_timeouts_.load(std::memory_order_relaxed);
  s.hangs = hangs_.load(std::memory_order_relaxed);
  s.late_stacks = late_stacks_.load(std::memory_order_relaxed);
  s.unlocked_stacks = unlocked_stacks_.load(std::memory_order_relaxed);
  s.cumulative_events = cumulative_events_.load(std::memory_order_relaxed);
  s.saturated = saturated_.load(std::memory_order_relaxed);
  s.threshold = threshold_.current();
  s.baseline = threshold_.baseline();
  s.lag_count = lag_.count();
  s.lag_p50 = lag_.percentile(0.50);
  s.lag_p90 = lag_.percentile(0.90);
  s.lag_p99 = lag_.percentile(0.99);
  s.lag_max = lag_.max();
  s.inflight = requests_.inflight();
  if (sampler_) {
    if (const LagHistogram* pause = sampler_->pause_histogram()) {
      s.pause_count = pause->count();
      s.pause_p50 = pause->percentile(0.50);
      s.pause_p99 = pause->percentile(0.99);
      s.pause_max = pause->max();
    }
  }
  return s;
}

}  // namespace loopguard
