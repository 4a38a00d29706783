// The engine as the extension module sees it: built on the loop thread, wired to CPython through
// PySampler, and owning the Python references it needs. The binding file converts types only and
// calls straight into this class.
#pragma once

#include <Python.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "loopguard/engine.h"
#include "loopguard/uv_pulse.h"
#include "py_sampler.h"

namespace loopguard {

// What a request's end hands back to Python, in one crossing: its final counters, and whether
// events wait to be drained.
struct RequestEnd : RequestCounters {
  bool pending = false;
};

class PyEngine {
 public:
  // Must be called on the loop thread, with the GIL: that thread is the one being watched.
  PyEngine(const WatchdogConfig& watchdog, const ThresholdConfig& threshold,
           const SamplerConfig& sampler, PyObject* request_var, TaskLookup tasks);
  ~PyEngine();
  PyEngine(const PyEngine&) = delete;
  PyEngine& operator=(const PyEngine&) = delete;

  void start() { engine().start(); }
  // Releases the GIL while joining: the sampler thread may be waiting for it.
  void stop();
  void abandon_after_fork();

  // The per-iteration calls stay silent no-ops after abandon_after_fork(): a forked child may keep
  // running a loop whose selector still calls them.
  // The loop is about to wait in select. When that ends a stall, the stall is finished now (GIL
  // released; once per stall), so its events are drained in the very next loop iteration rather
  // than one watchdog tick later.
  void wait_begin() noexcept {
    if (engine_ && engine_->wait_begin()) {
      Py_BEGIN_ALLOW_THREADS(void) engine_->settle(true);
      Py_END_ALLOW_THREADS
    }
  }
  void wait_end() noexcept {
    if (engine_) engine_->wait_end();
  }
  void heartbeat() noexcept {
    if (engine_) engine_->heartbeat();
  }
  void heartbeat_off() noexcept {
    if (engine_) engine_->heartbeat_off();
  }
  // A request (or labelled work: `method` None) begins: one crossing, the label put together here
  // rather than in Python (see request_label()). Each argument is a str, or anything else read
  // as empty.
  std::uint64_t begin_request(PyObject* method, PyObject* path, PyObject* request_id);
  void gc_begin() noexcept {
    if (engine_) engine_->gc_begin();
  }
  void gc_end() noexcept {
    if (engine_) engine_->gc_end();
  }
  void gc_elsewhere_begin(long tid) noexcept {
    if (engine_) engine_->gc_elsewhere_begin(tid);
  }
  void gc_elsewhere_end() noexcept {
    if (engine_) engine_->gc_elsewhere_end();
  }
  // Ends the request. When its code was part of a stall still in progress, that stall is over
  // (the request's code ran again, to finish), so it is settled now: its events are delivered
  // before the request is done. `pending`: events are ready to drain. One crossing per request
  // end; the GIL is released only when there is a stall of this request's to settle. It is
  // settled while the request is still in the table, so the stall's commit credits it and the
  // counters handed back are final, not the live estimate; should the watchdog not finish it in
  // time, end_request still says so, and it is settled once more after the end.
  RequestEnd end_request(std::uint64_t token) {
    Engine& e = engine();
    RequestEnd out;
    if (e.ends_stall(token)) (void)settle();
    out.pending = e.end_request(token, &out) ? settle() : e.has_events();
    return out;
  }
  // The same, without ending a request (strict mode at response start, a loop about to stop).
  bool settle() {
    Engine& e = engine();
    bool pending = false;
    Py_BEGIN_ALLOW_THREADS pending = e.settle();
    Py_END_ALLOW_THREADS return pending;
  }
  void watch_thread_exit() { engine().watch_thread_exit(); }
  // uvloop: hooks the running loop's libuv prepare/check handles as the pulse (see uv_pulse.h).
  // `library` is uvloop's extension, which exports libuv. Loop thread. "" on success, otherwise
  // why not (the caller falls back to the heartbeat).
  std::string attach_uvloop(PyObject* loop, const std::string& library);
  // Loop thread: closes those handles; uvloop's close() needs them closed first. Idempotent.
  void close_uvloop() {
    if (uv_) uv_->close();
  }
  void pause() noexcept {
    if (engine_) engine_->pause();
  }
  void resume() noexcept {
    if (engine_) engine_->resume();
  }
  // One step of a request's coroutine, from the step timer (timed_steps.h). Never throws: a
  // guard that fails must not fail the request; after fork()'s abandonment it records nothing.
  StepVerdict timed_step(std::uint64_t token, Nanos start, Nanos end, Nanos cpu) noexcept {
    if (!engine_) return StepVerdict::kNone;
    try {
      return engine_->record_step(token, start, end, cpu);
    } catch (...) {
      return StepVerdict::kNone;
    }
  }
  std::optional<Event> take_cumulative() { return engine().take_cumulative(); }
  RequestCounters request_counters(std::uint64_t token) { return engine().request_counters(token); }
  std::vector<Event> drain() { return engine().drain(); }
  void calibrate(std::vector<Nanos> lags) { engine().calibrate(std::move(lags)); }
  bool wants_heartbeat() { return engine().wants_heartbeat(); }
  int notify_fd() { return engine().notify_fd(); }
  Nanos now() { return engine().clock().now(); }
  EngineStats stats() { return engine().stats(); }
  std::vector<std::uint64_t> lag_cumulative(const std::vector<Nanos>& bounds) {
    return engine().lag_histogram().cumulative(bounds);
  }
  Nanos lag_sum() { return engine().lag_histogram().sum(); }

 private:
  Engine& engine();

  // uvloop's pulse; the destructor detaches it from the engine before the engine goes.
  std::shared_ptr<UvPulse> uv_;
  std::unique_ptr<Engine> engine_;
  PyObject* request_var_;  // strong references, released with the GIL in the destructor
  TaskLookup tasks_;
};

}  // namespace loopguard
