// The engine's life cycle (construction, start, stop, fork, the loop thread's exit) and the
// watchdog thread's loop: when it wakes, what it looks at, when a busy stretch becomes a stall.
// The stall itself is in stall.cpp, the hang report in hang_report.cpp, and what the loop thread
// calls in engine_loop.cpp.
#include "loopguard/engine.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#endif

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "loopguard/classify.h"

namespace loopguard {

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
      queue_(config.queue_capacity),
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
      begin_stall(busy_since, epoch);
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

void Engine::signal_loop() noexcept {
  if (notify_write_ < 0) return;
  const char byte = 1;
  // A full pipe already means "wake up"; nothing else to do on EAGAIN.
  while (::write(notify_write_, &byte, 1) < 0 && errno == EINTR) {
  }
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
