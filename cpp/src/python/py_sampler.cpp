// The only engine code that touches CPython: a sampler thread that takes the GIL on request and
// copies the loop thread's stack and request token into plain C++ data.
//
// Why a thread of its own: taking the GIL can block for as long as native code holds it, and the
// watchdog must never hang. So the watchdog asks, waits with a timeout, and moves on; this thread
// is the one that waits for the GIL.
//
// What runs under the GIL here can never call back into user code: no Python-level calls, no
// attribute lookups, and the cyclic GC is disabled for the few allocations made (frame objects,
// a UTF-8 cache), because a collection would run __del__ methods on this thread.
#include <Python.h>
#include <frameobject.h>

#include <condition_variable>
#include <mutex>
#include <thread>

#include "compat.h"
#include "loopguard/proc.h"
#include "py_engine.h"

namespace loopguard {

namespace {

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

class PySampler final : public StackSampler {
 public:
  PySampler(PyThreadState* loop, PyObject* request_var, SamplerConfig config)
      : loop_(loop), request_var_(request_var), config_(std::move(config)) {
    thread_ = std::thread([this] { run(); });
  }

  ~PySampler() override { shutdown(); }

  bool sample(Sample& out, Nanos timeout, bool frames) override {
    std::unique_lock<std::mutex> lock(mutex_);
    // A previous request still waiting for the GIL: native code holds it. Do not queue more.
    if (stop_ || state_ != State::kIdle) return false;
    state_ = State::kRequested;
    want_frames_ = frames;
    cv_.notify_all();
    if (!cv_.wait_for(lock, std::chrono::nanoseconds(timeout), [this] { return state_ == State::kDone; })) {
      state_ = State::kAbandoned;
      return false;
    }
    state_ = State::kIdle;
    if (!result_ok_) return false;
    out.token = result_.token;
    out.has_stack = result_.has_stack;
    out.frames = std::move(result_.frames);
    out.culprit = result_.culprit;
    return true;
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

  void run() {
    if (compat::is_finalizing()) return;
    // One thread state for the life of the thread, so a sample costs a GIL hand-over only.
    const PyGILState_STATE gil = PyGILState_Ensure();
    PyThreadState* self = PyEval_SaveThread();
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      cv_.wait(lock, [this] { return stop_ || state_ == State::kRequested; });
      if (stop_) break;
      const bool frames = want_frames_;
      lock.unlock();
      Sample local;
      bool ok = false;
      if (!compat::is_finalizing()) {
        PyEval_RestoreThread(self);
        const Nanos t0 = monotonic_now();
        capture(local, frames);
        pause_.record(monotonic_now() - t0);
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
        state_ = State::kIdle;  // the watchdog gave up on this one
      }
    }
    lock.unlock();
    // During finalization taking the GIL back may end this thread inside CPython; leak the thread
    // state instead (the process is exiting).
    if (compat::is_finalizing()) return;
    PyEval_RestoreThread(self);
    PyGILState_Release(gil);
  }

  bool loop_thread_alive() const {
    PyInterpreterState* interp = PyThreadState_GetInterpreter(PyThreadState_Get());
    for (PyThreadState* t = PyInterpreterState_ThreadHead(interp); t != nullptr; t = PyThreadState_Next(t)) {
      if (t == loop_) return true;
    }
    return false;
  }

  bool is_application(const std::string& filename) const {
    if (filename.empty() || filename[0] == '<') return false;  // <frozen ...>, <string>
    for (const auto& prefix : config_.application_prefixes) {
      if (filename.compare(0, prefix.size(), prefix) == 0) return true;
    }
    for (const auto& prefix : config_.library_prefixes) {
      if (filename.compare(0, prefix.size(), prefix) == 0) return false;
    }
    return true;
  }

  std::uint64_t read_token() const {
    PyObject* ctx = compat::thread_context(loop_);
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

  void capture(Sample& out, bool frames) {
    if (!loop_thread_alive()) return;
    const int gc_was_enabled = PyGC_Disable();
    out.token = read_token();
    if (frames) {
      PyFrameObject* frame = PyThreadState_GetFrame(loop_);
      while (frame != nullptr && out.frames.size() < config_.max_depth) {
        PyCodeObject* code = PyFrame_GetCode(frame);
        FrameInfo info;
        info.line = PyFrame_GetLineNumber(frame);
        info.filename = utf8_of(compat::code_filename(code));
        info.function = utf8_of(compat::code_qualname(code));
        Py_DECREF(code);
        if (out.culprit < 0 && is_application(info.filename)) out.culprit = static_cast<int>(out.frames.size());
        out.frames.push_back(std::move(info));
        PyFrameObject* back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
      }
      Py_XDECREF(frame);
      out.has_stack = true;
    }
    if (gc_was_enabled) PyGC_Enable();
    if (PyErr_Occurred()) PyErr_Clear();
  }

  PyThreadState* const loop_;
  PyObject* const request_var_;  // borrowed: PyEngine owns it and outlives this sampler
  const SamplerConfig config_;
  LagHistogram pause_;

  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;
  State state_ = State::kIdle;
  bool want_frames_ = true;
  Sample result_;
  bool result_ok_ = false;
};

}  // namespace

PyEngine::PyEngine(const WatchdogConfig& watchdog, const ThresholdConfig& threshold,
                   const SamplerConfig& sampler, PyObject* request_var)
    : request_var_(request_var) {
  Py_INCREF(request_var_);
  auto probe = std::make_unique<OsThreadProbe>(current_tid(), pthread_self());
  auto stacks = std::make_unique<PySampler>(PyThreadState_Get(), request_var_, sampler);
  engine_ = std::make_unique<Engine>(watchdog, threshold, std::move(probe), std::move(stacks));
}

PyEngine::~PyEngine() {
  stop();
  engine_.reset();
  Py_DECREF(request_var_);
}

void PyEngine::stop() {
  if (!engine_) return;
  Py_BEGIN_ALLOW_THREADS
  engine_->stop();
  Py_END_ALLOW_THREADS
}

void PyEngine::abandon_after_fork() {
  if (!engine_) return;
  engine_->abandon_after_fork();
  // Leaked with everything it holds; see Engine::abandon_after_fork.
  (void)engine_.release();
}

Engine& PyEngine::engine() {
  if (!engine_) throw std::runtime_error("loopguard engine was abandoned after fork()");
  return *engine_;
}

}  // namespace loopguard
