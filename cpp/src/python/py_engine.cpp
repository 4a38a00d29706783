// PyEngine: building the engine on the loop thread, wired to CPython through the sampler, and
// the Python references it owns (see py_engine.h).
#include "py_engine.h"

#include <memory>
#include <stdexcept>
#include <string>

#include "loopguard/proc.h"

namespace loopguard {

namespace {

// A str's UTF-8. A path that held bytes which are not UTF-8 reaches us decoded with
// surrogateescape, which strict UTF-8 cannot encode: those characters become '?' instead.
std::string utf8_or_replaced(PyObject* text) {
  if (text == nullptr || !PyUnicode_Check(text)) return {};
  Py_ssize_t size = 0;
  if (const char* data = PyUnicode_AsUTF8AndSize(text, &size); data != nullptr) {
    return std::string(data, static_cast<std::size_t>(size));
  }
  PyErr_Clear();
  PyObject* bytes = PyUnicode_AsEncodedString(text, "utf-8", "replace");
  if (bytes == nullptr) {
    PyErr_Clear();
    return "?";
  }
  std::string out(PyBytes_AS_STRING(bytes), static_cast<std::size_t>(PyBytes_GET_SIZE(bytes)));
  Py_DECREF(bytes);
  return out;
}

}  // namespace

std::uint64_t PyEngine::begin_request(PyObject* method, PyObject* path, PyObject* request_id) {
  return engine().begin_request(request_label(utf8_or_replaced(method), utf8_or_replaced(path),
                                              utf8_or_replaced(request_id)));
}

PyEngine::PyEngine(const WatchdogConfig& watchdog, const ThresholdConfig& threshold,
                   const SamplerConfig& sampler, PyObject* request_var, TaskLookup tasks)
    : request_var_(request_var), tasks_(tasks) {
  Py_INCREF(request_var_);
  Py_XINCREF(tasks_.loop);
  Py_XINCREF(tasks_.current_tasks);
  Py_XINCREF(tasks_.current_task);
  Py_XINCREF(tasks_.task_type);
  auto probe = std::make_unique<OsThreadProbe>(current_tid(), pthread_self());
  // The GIL's futex is learned during the sampler's first wait for the GIL (request()), not
  // here: learning it now would mean holding the GIL on the loop thread while the new sampler
  // thread queues for it, a block of our own making at every engine start (on a busy host,
  // tens of milliseconds for each loop a test suite starts).
  auto stacks = make_py_sampler(PyThreadState_Get(), request_var_, tasks_, sampler);
  engine_ = std::make_unique<Engine>(watchdog, threshold, std::move(probe), std::move(stacks));
}

PyEngine::~PyEngine() {
  stop();
  if (uv_) uv_->set_engine(nullptr);  // handles the loop still has are inert from here on
  engine_.reset();
  Py_DECREF(request_var_);
  Py_XDECREF(tasks_.loop);
  Py_XDECREF(tasks_.current_tasks);
  Py_XDECREF(tasks_.current_task);
  Py_XDECREF(tasks_.task_type);
}

std::string PyEngine::attach_uvloop(PyObject* loop, const std::string& library) {
  if (uv_) return {};
  std::string why;
  uv_ = UvPulse::attach(loop, library, why);
  if (!uv_) return why.empty() ? std::string("unknown reason") : why;
  uv_->set_engine(&engine());
  return {};
}

void PyEngine::stop() {
  if (!engine_) return;
  Py_BEGIN_ALLOW_THREADS engine_->stop();
  Py_END_ALLOW_THREADS
}

void PyEngine::abandon_after_fork() {
  if (uv_) uv_->forget_engine();
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
