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

#include "loopguard/watchdog.h"

namespace loopguard {

struct SamplerConfig {
  std::vector<std::string> library_prefixes;      // frames under these are not application code
  std::vector<std::string> application_prefixes;  // ... unless they are also under one of these
  std::size_t max_depth = 64;
  // The loop runs on the main thread (uvicorn, gunicorn workers): CPython runs pending calls
  // there, which lets the loop thread take a stack itself the moment it gets the GIL back.
  bool loop_is_main_thread = false;
};

class PyEngine {
 public:
  // Must be called on the loop thread, with the GIL: that thread is the one being watched.
  PyEngine(const WatchdogConfig& watchdog, const ThresholdConfig& threshold,
           const SamplerConfig& sampler, PyObject* request_var);
  ~PyEngine();
  PyEngine(const PyEngine&) = delete;
  PyEngine& operator=(const PyEngine&) = delete;

  void start() { engine().start(); }
  // Releases the GIL while joining: the sampler thread may be waiting for it.
  void stop();
  void abandon_after_fork();

  // The per-iteration calls stay silent no-ops after abandon_after_fork(): a forked child may keep
  // running a loop whose selector still calls them.
  void wait_begin() noexcept {
    if (engine_) engine_->wait_begin();
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
  std::uint64_t begin_request(std::string label) {
    return engine().begin_request(std::move(label));
  }
  void gc_begin() noexcept {
    if (engine_) engine_->gc_begin();
  }
  void gc_end() noexcept {
    if (engine_) engine_->gc_end();
  }
  void end_request(std::uint64_t token) { engine().end_request(token); }
  int record_step(std::uint64_t token, Nanos start, Nanos end, Nanos cpu) {
    return static_cast<int>(engine().record_step(token, start, end, cpu));
  }
  std::optional<Event> take_cumulative() { return engine().take_cumulative(); }
  RequestCounters request_counters(std::uint64_t token) { return engine().request_counters(token); }
  std::vector<Event> drain() { return engine().drain(); }
  void calibrate(std::vector<Nanos> lags) { engine().calibrate(std::move(lags)); }
  bool wants_heartbeat() { return engine().wants_heartbeat(); }
  int notify_fd() { return engine().notify_fd(); }
  Nanos threshold() { return engine().threshold(); }
  Nanos now() { return engine().clock().now(); }
  EngineStats stats() { return engine().stats(); }
  std::vector<std::uint64_t> lag_cumulative(const std::vector<Nanos>& bounds) {
    return engine().lag_histogram().cumulative(bounds);
  }
  Nanos lag_sum() { return engine().lag_histogram().sum(); }
  bool alive() const noexcept { return engine_ != nullptr; }

 private:
  Engine& engine();

  std::unique_ptr<Engine> engine_;
  PyObject* request_var_;  // strong reference, released with the GIL in the destructor
};

}  // namespace loopguard
