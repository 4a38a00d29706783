// The engine code that reads CPython's state: a sampler thread that takes the GIL on request and
// copies the loop thread's stack and request token into plain C++ data.
//
// Why a thread of its own: taking the GIL can block for as long as native code holds it, and the
// watchdog must never hang. So the watchdog asks, waits with a timeout, and moves on; this thread
// is the one that waits for the GIL. When it has waited too long, the loop thread itself may take
// the same capture through a CPython pending call (see queue_loop_capture()).
//
// What runs under the GIL here, on either thread, can never call back into user code: no
// Python-level calls, no attribute lookups, and the cyclic GC is disabled for the few allocations
// made (frame objects, a UTF-8 cache), because a collection would run __del__ methods on this
// thread.
#include "py_sampler.h"

#include <Python.h>
#include <frameobject.h>
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

namespace loopguard {

namespace {

// How many sampler threads (of every engine in the process) hold the GIL for a capture right now:
// the watchdog tells a loop waiting on one of them from a loop waiting on the app's own threads.
std::atomic<int> g_samplers_holding_gil{0};

std::string utf8_of(PyObject* text) {
  if (text == nullptr || !PyUnicode_Check(text)) return "?";
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(text, &size);
  if (data == nullptr) {
    PyErr_Clear();  // lone surrogates: keep going without the name
    return "?";
  }
  return std::string(data, static_cast<std::size_t>(size));
}

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
      : loop_(loop),
        interp_(PyThreadState_GetInterpreter(loop)),
        request_var_(request_var),
        tasks_(tasks),
        config_(std::move(config)),
        filter_(config_.frames),
        pid_(::getpid()),
        raw_(std::max(config_.max_depth, kOtherThreadDepth)) {
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
  // The thread list is walked with the same public accessors as find_thread(), plain field reads;
  // a thread can only leave it while holding the GIL, which the caller knows the loop thread has.
  bool read_without_gil(Sample& out, std::vector<ThreadStack>* others) override {
    if (pid_ != ::getpid() || compat::is_finalizing()) return false;
    std::lock_guard<std::mutex> guard(walk_mutex_);
    out.found = true;
    out.thread = 0;
    walk(loop_, config_.max_depth, out.frames);
    out.has_stack = !out.frames.empty();
    if (!out.has_stack) return false;
    const Culprit culprit = filter_.apply(out.frames);
    out.culprit = culprit.index;
    out.culprit_is_library = culprit.library;
    if (others != nullptr) read_others(*others);
    return true;
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
    capture(local, frames, target);
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
        capture(local, frames, target);
        if (others && target == 0 && local.found) {
          std::lock_guard<std::mutex> guard(walk_mutex_);
          read_others(local.others);
        }
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

  // The thread state to sample: the loop thread's, or the one whose kernel id is `target`.
  PyThreadState* find_thread(long target) const {
    PyInterpreterState* interp = PyThreadState_GetInterpreter(PyThreadState_Get());
    for (PyThreadState* t = PyInterpreterState_ThreadHead(interp); t != nullptr;
         t = PyThreadState_Next(t)) {
      if (target == 0 ? t == loop_
                      : compat::thread_native_id(t) == static_cast<unsigned long>(target)) {
        return t;
      }
    }
    return nullptr;  // the loop thread is gone, or the target runs no Python
  }

  std::uint64_t read_token(PyThreadState* tstate) const {
    PyObject* ctx = compat::thread_context(tstate);
    if (ctx == nullptr) return 0;
    // Context is a mapping; contains + getitem are plain HAMT lookups (a ContextVar's hash is
    // computed once at creation), so no Python code runs and no KeyError is raised.
    if (PySequence_Contains(ctx, request_var_) != 1) {
      PyErr_Clear();
      return 0;
    }
    PyObject* value = PyObject_GetItem(ctx, request_var_);
    if (value == nullptr) {
      PyErr_Clear();
      return 0;
    }
    std::uint64_t token = 0;
    if (PyLong_CheckExact(value)) {
      token = PyLong_AsUnsignedLongLong(value);
      if (PyErr_Occurred()) {
        PyErr_Clear();
        token = 0;
      }
    }
    Py_DECREF(value);
    return token;
  }

  // Outside requests, what ran: "name (coroutine)" for a task whose name can be read, the
  // coroutine alone otherwise, "(callback)" when no coroutine is on the stack (a plain handle).
  // The name comes from the exact asyncio Task type's get_name, which is C code; a subclass could
  // override it in Python, so a subclass is named by its coroutine only.
  std::string describe_task(const std::string& coroutine) const {
    if (coroutine.empty()) return "(callback)";
    PyObject* task = compat::running_task(tasks_.current_tasks, tasks_.current_task, tasks_.loop);
    if (task == nullptr || tasks_.task_type == nullptr ||
        Py_TYPE(task) != reinterpret_cast<PyTypeObject*>(tasks_.task_type)) {
      Py_XDECREF(task);
      return coroutine;
    }
    PyObject* name = PyObject_CallMethod(task, "get_name", nullptr);
    Py_DECREF(task);
    if (name == nullptr) {
      PyErr_Clear();
      return coroutine;
    }
    std::string text = utf8_of(name);
    Py_DECREF(name);
    return text + " (" + coroutine + ")";
  }

  void capture(Sample& out, bool frames, long target) {
    out.found = false;
    out.thread = target;
    PyThreadState* tstate = find_thread(target);
    if (tstate == nullptr) return;
    out.found = true;
    const int gc_was_enabled = PyGC_Disable();
    out.token = read_token(tstate);
    if (frames) {
      // The outermost coroutine frame is the running task's own coroutine: the task step that
      // drives it is C, so the loop's frames come right below it.
      std::string outermost_coroutine;
      PyFrameObject* frame = PyThreadState_GetFrame(tstate);
      while (frame != nullptr && out.frames.size() < config_.max_depth) {
        PyCodeObject* code = PyFrame_GetCode(frame);
        FrameInfo info;
        info.line = compat::line_at(code, PyFrame_GetLasti(frame));
        info.filename = utf8_of(compat::code_filename(code));
        info.function = utf8_of(compat::code_qualname(code));
        if (compat::is_coroutine_code(code)) outermost_coroutine = info.function;
        Py_DECREF(code);
        out.frames.push_back(std::move(info));
        PyFrameObject* back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
      }
      Py_XDECREF(frame);
      out.has_stack = true;
      // File names are normalised here, through the filter's cache, so that events, reports and
      // the culprit rule all see one spelling of each path (never "venv/bin/../lib/...").
      const Culprit culprit = filter_.apply(out.frames);
      out.culprit = culprit.index;
      out.culprit_is_library = culprit.library;
      // Named even with a request token: the engine keeps the name only if that request has
      // ended (a task it left behind), and it cannot tell from here.
      if (target == 0) out.task = describe_task(outermost_coroutine);
    }
    if (gc_was_enabled) PyGC_Enable();
    if (PyErr_Occurred()) PyErr_Clear();
  }

  // A thread's frames, innermost first, read without touching a reference count or allocating
  // while the records are read (see compat.h): the names are copied into fixed buffers first and
  // only turned into strings once the walk is over. Called with walk_mutex_ held, which guards
  // raw_; with the GIL (sample_all) or without it (read_without_gil).
  void walk(PyThreadState* tstate, std::size_t depth, std::vector<FrameInfo>& frames) {
    frames.clear();
    std::size_t n = 0;
    compat::InterpreterFrame* frame = compat::unlocked_top_frame(tstate);
    for (std::size_t seen = 0;
         compat::plausible(frame) && n < raw_.size() && n < depth && seen < kMaxRecords; ++seen) {
      PyCodeObject* code = compat::unlocked_code(frame);
      if (code != nullptr) {
        RawFrame& raw = raw_[n++];
        raw.line = compat::line_at(code, compat::unlocked_offset(frame));
        compat::unlocked_text(compat::code_filename(code), raw.filename, sizeof raw.filename);
        compat::unlocked_text(compat::code_qualname(code), raw.function, sizeof raw.function);
      }
      compat::InterpreterFrame* back = compat::unlocked_previous(frame);
      if (back == frame) break;
      frame = back;
    }
    frames.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      FrameInfo info;
      info.filename = raw_[i].filename;
      info.function = raw_[i].function;
      info.line = raw_[i].line;
      frames.push_back(std::move(info));
    }
  }

  // Every other thread that runs Python, bounded in threads and depth; the sampler threads of
  // every guard have no Python frame and are left out with the rest of such threads.
  void read_others(std::vector<ThreadStack>& out) {
    out.clear();
    for (PyThreadState* t = PyInterpreterState_ThreadHead(interp_);
         compat::plausible(t) && out.size() < kMaxOtherThreads; t = PyThreadState_Next(t)) {
      if (t == loop_) continue;
      ThreadStack stack;
      walk(t, kOtherThreadDepth, stack.frames);
      if (stack.frames.empty()) continue;
      stack.thread = static_cast<long>(compat::thread_native_id(t));
      const Culprit culprit = filter_.apply(stack.frames);
      stack.culprit = culprit.index;
      stack.culprit_is_library = culprit.library;
      out.push_back(std::move(stack));
    }
  }

  struct RawFrame {
    char filename[512];
    char function[256];
    int line;
  };
  static constexpr std::size_t kMaxRecords = 1024;  // records walked per thread, shims included
  static constexpr std::size_t kMaxOtherThreads = 16;
  static constexpr std::size_t kOtherThreadDepth = 24;

  PyThreadState* const loop_;
  PyInterpreterState* const interp_;
  PyObject* const request_var_;  // borrowed: PyEngine owns it and outlives this sampler
  const TaskLookup tasks_;       // borrowed, likewise
  const SamplerConfig config_;
  FrameFilter filter_;
  const pid_t pid_;
  std::mutex walk_mutex_;
  std::vector<RawFrame> raw_;
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
