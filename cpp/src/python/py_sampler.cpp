// The sampler thread: it takes the GIL when the watchdog asks, and has the reader (py_reader.h)
// copy the loop thread's stack and request token into plain C++ data.
//
// Why a thread of its own: taking the GIL can block for as long as native code holds it, and the
// watchdog must never hang. So the watchdog asks, waits with a timeout, and moves on; this thread
// is the one that waits for the GIL. When it has waited too long, the loop thread itself may take
// the same capture through a CPython pending call (see queue_loop_capture()).
//
// What runs under the GIL here, on either thread, is the reader's, which never calls back into
// user code.
#include "py_sampler.h"

#include <Python.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "compat.h"
#include "loopguard/proc.h"
#include "py_reader.h"

namespace loopguard {

namespace {

// How many sampler threads (of every engine in the process) hold the GIL for a capture right now:
// the watchdog tells a loop waiting on one of them from a loop waiting on the app's own threads.
std::atomic<int> g_samplers_holding_gil{0};

class PySampler;

// Samplers that a queued pending call may still name, by id. Py_AddPendingCall keeps its argument
// until the call runs, which can be after the sampler is gone; the call then finds no entry and
// does nothing. Never destroyed: a pending call may run during interpreter finalization.
std::mutex& registry_mutex() {
  static auto* m = new std::mutex;
  return *m;
}
std::map<std::uintptr_t, PySampler*>& registry() {
  static auto* r = new std::map<std::uintptr_t, PySampler*>;
  return *r;
}

class PySampler final : public StackSampler {
 public:
  PySampler(PyThreadState* loop, PyObject* request_var, TaskLookup tasks, SamplerConfig config)
      : config_(std::move(config)),
        reader_(loop, request_var, tasks, config_.frames, config_.max_depth),
        pid_(::getpid()) {
    {
      std::lock_guard<std::mutex> guard(registry_mutex());
      static std::uintptr_t next_id = 0;
      id_ = ++next_id;
      registry()[id_] = this;
    }
    thread_ = std::thread([this] { run(); });
  }

  ~PySampler() override {
    {
      std::lock_guard<std::mutex> guard(registry_mutex());
      registry().erase(id_);
    }
    shutdown();
  }

  // Runs on the main thread, with the GIL, between two bytecodes: CPython's pending call.
  static int run_loop_capture(void* arg) {
    std::lock_guard<std::mutex> guard(registry_mutex());
    const auto it = registry().find(reinterpret_cast<std::uintptr_t>(arg));
    // A forked child inherits the queued call but not the sampler's threads, whose mutex may
    // have been held at the fork: check before touching it.
    if (it != registry().end() && it->second->pid_ == ::getpid()) {
      it->second->capture_on_loop_thread();
    }
    return 0;
  }

  bool sample(Sample& out, Nanos timeout, bool frames) override {
    return request(out, timeout, frames, 0, false);
  }

  bool sample_all(Sample& out, Nanos timeout) override {
    return request(out, timeout, true, 0, true);
  }

  bool sample_thread(Sample& out, Nanos timeout, bool frames, long tid) override {
    return request(out, timeout, frames, tid, false);
  }

  // The watchdog's read while native code holds the GIL (see StackSampler::read_without_gil and
  // compat.h). Never during finalization, when thread states are being torn down, nor in a forked
  // child, whose other threads' states describe threads that are gone. The loop thread's state
  // stays valid while the engine runs: the engine is stopped before the loop's thread can end.
  // The reader walks the thread list with the same public accessors as under the GIL, plain field
  // reads; a thread can only leave it while holding the GIL, which the caller knows the loop
  // thread has.
  bool read_without_gil(Sample& out, std::vector<ThreadStack>* others) override {
    if (pid_ != ::getpid() || compat::is_finalizing()) return false;
    return reader_.read_without_gil(out, others);
  }

  bool take_late(Sample& out) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!late_ready_) return false;
    late_ready_ = false;
    out = std::move(late_);
    return true;
  }

  bool wait_late(Nanos timeout) override {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait_for(lock, std::chrono::nanoseconds(timeout),
                 [this] { return late_ready_ || state_ != State::kAbandoned; });
    return late_ready_;
  }

  bool is_gil_futex(std::uint64_t address) const override {
    if (address == 0) return false;
    for (const auto& known : gil_futexes_) {
      const std::uint64_t k = known.load(std::memory_order_relaxed);
      // The GIL's mutex and condition variables sit side by side in one struct; waiters sleep on
      // words inside them, so anything within a few hundred bytes of a learned word is the GIL.
      if (k != 0 && (address > k ? address - k : k - address) < kGilSpan) return true;
    }
    return false;
  }

  bool knows_gil_futex() const override {
    for (const auto& known : gil_futexes_) {
      if (known.load(std::memory_order_relaxed) != 0) return true;
    }
    return false;
  }

  long thread_id() const override { return tid_.load(std::memory_order_relaxed); }
  bool sampler_holds_gil() const override {
    return g_samplers_holding_gil.load(std::memory_order_relaxed) > 0;
  }

  void shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  const LagHistogram* pause_histogram() const override { return &pause_; }

 private:
  enum class State { kIdle, kRequested, kDone, kAbandoned };
  enum class Phase { kOther, kAcquiringGil };
  static constexpr std::uint64_t kGilSpan = 256;

  bool request(Sample& out, Nanos timeout, bool frames, long target, bool others) {
    std::unique_lock<std::mutex> lock(mutex_);
    // A previous request still waiting for the GIL: native code holds it. Do not queue more.
    if (stop_) return false;
    if (state_ != State::kIdle) {
      // Still waiting for the GIL on an earlier request. If the watchdog now knows which thread
      // holds it, that thread's stack is what the pending capture should take.
      if (target != 0) target_ = target;
      queue_loop_capture();
      return false;
    }
    state_ = State::kRequested;
    want_frames_ = frames;
    want_others_ = others;
    target_ = target;
    cv_.notify_all();
    const auto done = [this] { return state_ == State::kDone; };
    // After a millisecond the sampler is surely waiting for the GIL: a chance to learn its address.
    const Nanos first = std::min<Nanos>(timeout, kMs);
    if (!cv_.wait_for(lock, std::chrono::nanoseconds(first), done)) {
      lock.unlock();
      learn_gil_address();
      lock.lock();
      if (!cv_.wait_for(lock, std::chrono::nanoseconds(timeout - first), done)) {
        state_ = State::kAbandoned;
        queue_loop_capture();
        return false;
      }
    }
    state_ = State::kIdle;
    if (!result_ok_) return false;
    out.token = result_.token;
    out.has_stack = result_.has_stack;
    out.frames = std::move(result_.frames);
    out.culprit = result_.culprit;
    out.task = std::move(result_.task);
    out.culprit_is_library = result_.culprit_is_library;
    out.thread = result_.thread;
    out.others = std::move(result_.others);
    return result_.found;
  }

  void learn_gil_address() {
    const long tid = tid_.load(std::memory_order_acquire);
    if (tid <= 0 || phase_.load(std::memory_order_acquire) != Phase::kAcquiringGil) return;
    const OsState st = read_thread_syscall(tid);
    // Only trust the reading if the thread was still acquiring the GIL after it was taken.
    if (phase_.load(std::memory_order_acquire) != Phase::kAcquiringGil) return;
#ifdef SYS_futex
    if (st.where != OsState::Where::kSyscall || st.syscall != SYS_futex || st.arg0 == 0) return;
    if (is_gil_futex(st.arg0)) return;
    const std::size_t slot =
        next_slot_.fetch_add(1, std::memory_order_relaxed) % gil_futexes_.size();
    gil_futexes_[slot].store(st.arg0, std::memory_order_relaxed);
#else
    (void)st;
#endif
  }

  // The sampler gave up waiting for the GIL. It keeps waiting, but when the GIL is handed over it
  // competes with the loop thread, and losing costs the moment: a GIL holder in the threadpool
  // may finish its request before the sampler's turn comes, and then its stack and Context name
  // nothing. The loop thread, though, runs CPython's pending calls as soon as it has the GIL
  // again, while the holder still waits to get it back (a forced switch), frozen right after the
  // call that held it. So when the loop runs on the main thread, the loop thread is asked to take
  // the pending capture itself; whichever of the two gets there first serves it.
  // Called with mutex_ held; Py_AddPendingCall needs neither the GIL nor a thread state.
  void queue_loop_capture() {
    // Without frames the capture could only name the request, and a late sample is only used
    // for its stack.
    if (!config_.loop_is_main_thread || !want_frames_ || loop_capture_queued_ ||
        compat::is_finalizing()) {
      return;
    }
    if (Py_AddPendingCall(&PySampler::run_loop_capture, reinterpret_cast<void*>(id_)) == 0) {
      loop_capture_queued_ = true;  // a full queue (-1) just leaves it to the sampler thread
    }
  }

  void capture_on_loop_thread() {
    long target = 0;
    bool frames = true;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      loop_capture_queued_ = false;
      if (state_ != State::kAbandoned || served_) return;
      target = target_;
      frames = want_frames_;
    }
    Sample local;
    local.t = monotonic_now();
    reader_.capture(local, frames, target);
    pause_.record(monotonic_now() - local.t);
    std::lock_guard<std::mutex> guard(mutex_);
    if (state_ != State::kAbandoned || served_ || !local.found || !local.has_stack) return;
    late_ = std::move(local);
    late_ready_ = true;
    served_ = true;  // the sampler thread's own capture, once it gets the GIL, is later: dropped
    cv_.notify_all();
  }

  void run() {
    tid_.store(current_tid(), std::memory_order_release);
#ifdef __linux__
    ::pthread_setname_np(::pthread_self(), "loopguard-stack");
#endif
    if (compat::is_finalizing()) return;
    // One thread state for the life of the thread, so a sample costs a GIL hand-over only.
    phase_.store(Phase::kAcquiringGil, std::memory_order_release);
    const PyGILState_STATE gil = PyGILState_Ensure();
    phase_.store(Phase::kOther, std::memory_order_release);
    PyThreadState* self = PyEval_SaveThread();
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      // An abandoned request is served too: the watchdog may have given up on one before this
      // thread ever picked it up (it was still waiting for the GIL to create its thread state,
      // right after the engine started). Left waiting, it would block every later request.
      cv_.wait(lock, [this] {
        return stop_ || state_ == State::kRequested || state_ == State::kAbandoned;
      });
      if (stop_) break;
      const bool frames = want_frames_;
      const bool others = want_others_;
      lock.unlock();
      Sample local;
      bool ok = false;
      if (!compat::is_finalizing()) {
        phase_.store(Phase::kAcquiringGil, std::memory_order_release);
        PyEval_RestoreThread(self);
        g_samplers_holding_gil.fetch_add(1, std::memory_order_relaxed);
        phase_.store(Phase::kOther, std::memory_order_release);
        // Read the target only now: while we waited for the GIL the watchdog may have learned
        // that another thread holds it, and that thread is the one worth seeing (see request()).
        long target = 0;
        {
          std::lock_guard<std::mutex> guard(mutex_);
          target = target_;
        }
        const Nanos t0 = monotonic_now();
        local.t = t0;
        reader_.capture(local, frames, target);
        if (others && target == 0 && local.found) reader_.read_others(local.others);
        pause_.record(monotonic_now() - t0);
        g_samplers_holding_gil.fetch_sub(1, std::memory_order_relaxed);
        self = PyEval_SaveThread();
        ok = true;
      }
      lock.lock();
      if (state_ == State::kRequested) {
        result_ = std::move(local);
        result_ok_ = ok;
        state_ = State::kDone;
        cv_.notify_all();
      } else {
        // The watchdog gave up waiting: native code held the GIL. Keep what we saw once it let
        // go (unless the loop thread already did); the watchdog fills the stall's missing stacks
        // with it.
        if (ok && local.found && local.has_stack && !served_) {
          late_ = std::move(local);
          late_ready_ = true;
        }
        served_ = false;
        state_ = State::kIdle;
        cv_.notify_all();
      }
    }
    lock.unlock();
    // During finalization taking the GIL back may end this thread inside CPython; leak the thread
    // state instead (the process is exiting).
    if (compat::is_finalizing()) return;
    PyEval_RestoreThread(self);
    PyGILState_Release(gil);
  }

  const SamplerConfig config_;
  PyReader reader_;
  const pid_t pid_;
  std::uintptr_t id_ = 0;
  LagHistogram pause_;
  std::array<std::atomic<std::uint64_t>, 4> gil_futexes_{};
  std::atomic<std::size_t> next_slot_{0};
  std::atomic<long> tid_{-1};
  std::atomic<Phase> phase_{Phase::kOther};

  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;
  State state_ = State::kIdle;
  bool want_frames_ = true;
  bool want_others_ = false;
  long target_ = 0;
  Sample result_;
  bool result_ok_ = false;
  Sample late_;
  bool late_ready_ = false;
  bool loop_capture_queued_ = false;  // a pending call is queued and has not run yet
  bool served_ = false;               // the abandoned capture was taken on the loop thread
};

}  // namespace

std::unique_ptr<StackSampler> make_py_sampler(PyThreadState* loop, PyObject* request_var,
                                              TaskLookup tasks, SamplerConfig config) {
  return std::make_unique<PySampler>(loop, request_var, tasks, std::move(config));
}

}  // namespace loopguard
