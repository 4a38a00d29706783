// The one binding file: it converts types between Python and the engine and holds no logic.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "loopguard/classify.h"
#include "loopguard/engine.h"
#include "loopguard/event.h"
#include "loopguard/frame_filter.h"
#include "py_engine.h"
#include "py_headers.h"
#include "select_pulse.h"
#include "timed_steps.h"

namespace nb = nanobind;
using namespace loopguard;

NB_MODULE(_core, m) {
  m.doc() = "fastapi-loopguard native engine";

  nb::class_<CumulativeConfig>(m, "CumulativeConfig")
      .def(nb::init<>())
      .def_rw("enabled", &CumulativeConfig::enabled)
      .def_rw("threshold_ns", &CumulativeConfig::threshold)
      .def_rw("window_ns", &CumulativeConfig::window);

  nb::class_<WatchdogConfig>(m, "WatchdogConfig")
      .def(nb::init<>())
      .def_rw("interval_ns", &WatchdogConfig::interval)
      .def_rw("idle_tick_ns", &WatchdogConfig::idle_tick)
      .def_rw("grace_ns", &WatchdogConfig::grace)
      .def_rw("confirm_delay_ns", &WatchdogConfig::confirm_delay)
      .def_rw("stack_timeout_ns", &WatchdogConfig::stack_timeout)
      .def_rw("max_samples", &WatchdogConfig::max_samples)
      .def_rw("queue_capacity", &WatchdogConfig::queue_capacity)
      .def_rw("settle_timeout_ns", &WatchdogConfig::settle_timeout)
      .def_rw("capture_stacks", &WatchdogConfig::capture_stacks)
      .def_rw("hang_threshold_ns", &WatchdogConfig::hang_threshold)
      .def_rw("hang_fd", &WatchdogConfig::hang_fd)
      .def_rw("cumulative", &WatchdogConfig::cumulative);

  nb::class_<ThresholdConfig>(m, "ThresholdConfig")
      .def(nb::init<>())
      .def_rw("multiplier", &ThresholdConfig::multiplier)
      .def_rw("fallback_ns", &ThresholdConfig::fallback)
      .def_rw("adaptive", &ThresholdConfig::adaptive)
      .def_rw("window", &ThresholdConfig::window)
      .def_rw("percentile", &ThresholdConfig::percentile)
      .def_rw("min_samples", &ThresholdConfig::min_samples)
      .def_rw("update_interval_ns", &ThresholdConfig::update_interval);

  nb::class_<FrameFilterConfig>(m, "FrameFilterConfig")
      .def(nb::init<>())
      .def_rw("application_prefixes", &FrameFilterConfig::application_prefixes)
      .def_rw("library_prefixes", &FrameFilterConfig::library_prefixes)
      .def_rw("runtime_prefixes", &FrameFilterConfig::runtime_prefixes)
      .def_rw("loop_prefixes", &FrameFilterConfig::loop_prefixes)
      .def_rw("own_prefixes", &FrameFilterConfig::own_prefixes)
      .def_rw("launcher_prefixes", &FrameFilterConfig::launcher_prefixes)
      .def_rw("loop_entry_functions", &FrameFilterConfig::loop_entry_functions)
      .def_rw("main_script", &FrameFilterConfig::main_script);

  nb::class_<FrameFilter>(m, "FrameFilter")
      .def(nb::init<FrameFilterConfig>(), nb::arg("config"))
      .def("normalized", &FrameFilter::normalized, nb::arg("path"))
      .def(
          "culprit",
          // (filename, function) pairs, innermost first -> (index or -1, is library code)
          [](FrameFilter& self, const std::vector<std::pair<std::string, std::string>>& frames) {
            std::vector<FrameInfo> stack(frames.size());
            for (std::size_t i = 0; i < frames.size(); ++i) {
              stack[i].filename = frames[i].first;
              stack[i].function = frames[i].second;
            }
            const Culprit c = self.apply(stack);
            return std::make_pair(c.index, c.library);
          },
          nb::arg("frames"));

  nb::class_<SamplerConfig>(m, "SamplerConfig")
      .def(nb::init<>())
      .def_rw("frames", &SamplerConfig::frames)
      .def_rw("max_depth", &SamplerConfig::max_depth)
      .def_rw("loop_is_main_thread", &SamplerConfig::loop_is_main_thread);

  nb::class_<FrameInfo>(m, "FrameInfo")
      .def_ro("filename", &FrameInfo::filename)
      .def_ro("function", &FrameInfo::function)
      .def_ro("line", &FrameInfo::line);

  m.def("event_kinds", [] {
    std::vector<std::string> names;
    for (const Kind k : kEventKinds) names.emplace_back(kind_name(k));
    return names;
  });

  m.def(
      "request_id",
      [](nb::handle headers) {
        PyObject* id = request_id_of(headers.ptr());
        if (id == nullptr) throw nb::python_error();
        return nb::steal(id);
      },
      nb::arg("headers").none(),
      nb::sig("def request_id(headers: collections.abc.Iterable[tuple[bytes, bytes]] | None, /) "
              "-> str"));
  m.def(
      "with_guard_headers",
      [](nb::handle headers, nb::handle request_id, std::uint32_t count, double total_ms,
         std::optional<double> wait_ms) {
        PyObject* list = with_guard_headers(headers.ptr(), request_id.ptr(), count, total_ms,
                                            wait_ms.value_or(-1));
        if (list == nullptr) throw nb::python_error();
        return nb::steal(list);
      },
      nb::arg("headers").none(), nb::arg("request_id"), nb::arg("count"), nb::arg("total_ms"),
      nb::arg("wait_ms").none(),
      nb::sig("def with_guard_headers(headers: collections.abc.Iterable[tuple[bytes, bytes]] | "
              "None, request_id: str, count: int, total_ms: float, wait_ms: float | None) -> "
              "list[tuple[bytes, bytes]]"));

  nb::class_<Event>(m, "Event")
      .def_ro("token", &Event::token)
      .def_ro("start_ns", &Event::start)
      .def_ro("duration_ns", &Event::duration)
      .def_ro("cpu_ns", &Event::cpu)
      .def_prop_ro("kind", [](const Event& e) { return kind_name(e.kind); })
      .def_ro("stack", &Event::stack)
      .def_ro("culprit", &Event::culprit)
      .def_ro("culprit_is_library", &Event::culprit_is_library)
      .def_ro("victims", &Event::victims)
      .def_ro("queued", &Event::queued)
      .def_ro("samples", &Event::samples)
      .def_ro("stack_missing", &Event::stack_missing)
      .def_ro("hang", &Event::hang)
      .def_ro("task", &Event::task)
      .def_ro("origin", &Event::origin)
      .def_prop_ro("holder_thread", [](const Event& e) { return e.holder.thread; })
      .def_prop_ro("holder_stack", [](const Event& e) { return e.holder.frames; })
      .def_prop_ro("holder_culprit", [](const Event& e) { return e.holder.culprit; });

  nb::class_<EngineStats>(m, "EngineStats")
      .def_ro("stalls", &EngineStats::stalls)
      .def_ro("events_emitted", &EngineStats::events_emitted)
      .def_ro("events_dropped", &EngineStats::events_dropped)
      .def_ro("events_detected", &EngineStats::events_detected)
      .def_ro("samples", &EngineStats::samples)
      .def_ro("stack_timeouts", &EngineStats::stack_timeouts)
      .def_ro("hangs", &EngineStats::hangs)
      .def_ro("late_stacks", &EngineStats::late_stacks)
      .def_ro("unlocked_stacks", &EngineStats::unlocked_stacks)
      .def_ro("cumulative_events", &EngineStats::cumulative_events)
      .def_ro("saturated_ns", &EngineStats::saturated)
      .def_ro("threshold_ns", &EngineStats::threshold)
      .def_ro("baseline_ns", &EngineStats::baseline)
      .def_ro("lag_count", &EngineStats::lag_count)
      .def_ro("lag_p50_ns", &EngineStats::lag_p50)
      .def_ro("lag_p90_ns", &EngineStats::lag_p90)
      .def_ro("lag_p99_ns", &EngineStats::lag_p99)
      .def_ro("lag_max_ns", &EngineStats::lag_max)
      .def_ro("inflight", &EngineStats::inflight)
      .def_ro("pause_count", &EngineStats::pause_count)
      .def_ro("pause_p50_ns", &EngineStats::pause_p50)
      .def_ro("pause_p99_ns", &EngineStats::pause_p99)
      .def_ro("pause_max_ns", &EngineStats::pause_max);

  nb::class_<PyEngine>(m, "Engine")
      .def(
          "__init__",
          [](PyEngine* self, const WatchdogConfig& w, const ThresholdConfig& t,
             const SamplerConfig& s, nb::handle request_var, nb::handle loop,
             nb::handle current_tasks, nb::handle current_task, nb::handle task_type) {
            const auto or_null = [](nb::handle h) { return h.is_none() ? nullptr : h.ptr(); };
            new (self) PyEngine(w, t, s, request_var.ptr(),
                                TaskLookup{or_null(loop), or_null(current_tasks),
                                           or_null(current_task), or_null(task_type)});
          },
          nb::arg("watchdog"), nb::arg("threshold"), nb::arg("sampler"), nb::arg("request_var"),
          nb::arg("loop").none(), nb::arg("current_tasks").none(), nb::arg("current_task").none(),
          nb::arg("task_type").none())
      .def("start", &PyEngine::start)
      .def("stop", &PyEngine::stop)
      .def("abandon_after_fork", &PyEngine::abandon_after_fork)
      .def("wait_begin", &PyEngine::wait_begin)
      .def("wait_end", &PyEngine::wait_end)
      .def("heartbeat", &PyEngine::heartbeat)
      .def("heartbeat_off", &PyEngine::heartbeat_off)
      .def("gc_begin", &PyEngine::gc_begin)
      .def("gc_end", &PyEngine::gc_end)
      .def("gc_elsewhere_begin", &PyEngine::gc_elsewhere_begin)
      .def("gc_elsewhere_end", &PyEngine::gc_elsewhere_end)
      .def(
          "begin_request",
          [](PyEngine& e, nb::handle method, nb::handle path, nb::handle request_id) {
            return e.begin_request(method.ptr(), path.ptr(), request_id.ptr());
          },
          nb::arg("method").none(), nb::arg("path"), nb::arg("request_id"),
          nb::sig("def begin_request(self, method: str | None, path: str, request_id: str) -> int"))
      // Both as tuples: an object's fields would each be one more crossing, on every request.
      .def(
          "end_request",
          [](PyEngine& e, std::uint64_t token) {
            const RequestEnd end = e.end_request(token);
            return std::make_tuple(end.pending, end.count, end.total, end.wait);
          },
          nb::arg("token"),
          nb::sig("def end_request(self, token: int) -> tuple[bool, int, int, int]"))
      .def("settle", &PyEngine::settle)
      .def("watch_thread_exit", &PyEngine::watch_thread_exit)
      .def(
          "attach_uvloop",
          [](PyEngine& e, nb::handle loop, const std::string& library) {
            return e.attach_uvloop(loop.ptr(), library);
          },
          nb::arg("loop"), nb::arg("library"))
      .def("close_uvloop", &PyEngine::close_uvloop)
      .def("pause", &PyEngine::pause)
      .def("resume", &PyEngine::resume)
      .def(
          "select_pulse",
          [](nb::handle self, nb::handle original) {
            PyObject* pulse =
                make_select_pulse(self.ptr(), nb::inst_ptr<PyEngine>(self), original.ptr());
            if (pulse == nullptr) throw nb::python_error();
            return nb::steal(pulse);
          },
          // A C type of its own, as the step timer: the signature says what it stands for.
          nb::sig("def select_pulse(self, original: collections.abc.Callable[..., typing.Any], /) "
                  "-> typing.Any"))
      .def(
          "timed",
          [](nb::handle self, nb::handle coro, std::uint64_t token, nb::handle report,
             nb::handle info) {
            PyObject* timer = make_timed_steps(self.ptr(), nb::inst_ptr<PyEngine>(self), coro.ptr(),
                                               token, report.ptr(), info.ptr());
            if (timer == nullptr) throw nb::python_error();
            return nb::steal(timer);
          },
          // The timer is a C type of its own: the signature says what it stands for.
          nb::sig("def timed(self, coro: collections.abc.Coroutine[typing.Any, typing.Any, "
                  "typing.Any], token: int, report: collections.abc.Callable[..., None], "
                  "info: object, /) -> collections.abc.Awaitable[typing.Any]"))
      .def("take_cumulative", &PyEngine::take_cumulative)
      .def(
          "request_counters",
          [](PyEngine& e, std::uint64_t token) {
            const RequestCounters counters = e.request_counters(token);
            return std::make_tuple(counters.count, counters.total, counters.wait);
          },
          nb::arg("token"),
          nb::sig("def request_counters(self, token: int) -> tuple[int, int, int]"))
      .def("drain", &PyEngine::drain)
      .def("calibrate", &PyEngine::calibrate)
      .def("wants_heartbeat", &PyEngine::wants_heartbeat)
      .def("notify_fd", &PyEngine::notify_fd)
      .def("now_ns", &PyEngine::now)
      .def("stats", &PyEngine::stats)
      .def("lag_cumulative", &PyEngine::lag_cumulative)
      .def("lag_sum_ns", &PyEngine::lag_sum);
}
