// See py_reader.h. The frame records are read through compat.h, which holds every
// CPython-version-specific access.
#include "py_reader.h"

#include <Python.h>
#include <frameobject.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "compat.h"

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

}  // namespace

PyReader::PyReader(PyThreadState* loop, PyObject* request_var, TaskLookup tasks,
                   const FrameFilterConfig& frames, std::size_t max_depth)
    : loop_(loop),
      interp_(PyThreadState_GetInterpreter(loop)),
      request_var_(request_var),
      tasks_(tasks),
      max_depth_(max_depth),
      filter_(frames),
      raw_(std::max(max_depth, kOtherThreadDepth)) {}

void PyReader::read_others(std::vector<ThreadStack>& out) {
  std::lock_guard<std::mutex> guard(walk_mutex_);
  read_others_locked(out);
}

bool PyReader::read_without_gil(Sample& out, std::vector<ThreadStack>* others) {
  std::lock_guard<std::mutex> guard(walk_mutex_);
  out.found = true;
  out.thread = 0;
  walk(loop_, max_depth_, out.frames);
  out.has_stack = !out.frames.empty();
  if (!out.has_stack) return false;
  const Culprit culprit = filter_.apply(out.frames);
  out.culprit = culprit.index;
  out.culprit_is_library = culprit.library;
  if (others != nullptr) read_others_locked(*others);
  return true;
}

// The thread state to sample: the loop thread's, or the one whose kernel id is `target`.
PyThreadState* PyReader::find_thread(long target) const {
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

std::uint64_t PyReader::read_token(PyThreadState* tstate) const {
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
std::string PyReader::describe_task(const std::string& coroutine) const {
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

void PyReader::capture(Sample& out, bool frames, long target) {
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
    while (frame != nullptr && out.frames.size() < max_depth_) {
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
// raw_; with the GIL (read_others) or without it (read_without_gil).
void PyReader::walk(PyThreadState* tstate, std::size_t depth, std::vector<FrameInfo>& frames) {
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
void PyReader::read_others_locked(std::vector<ThreadStack>& out) {
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

}  // namespace loopguard
