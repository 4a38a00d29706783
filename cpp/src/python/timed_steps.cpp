// The step timer (see timed_steps.h): a small CPython type, written against the C API rather
// than bound through nanobind, because its slots are what the interpreter calls on every step:
// tp_iternext when the awaiting coroutine resumes it with None (nearly always), `send` and
// `throw` otherwise, `close` when that coroutine is closed.
#include "timed_steps.h"

#include <ctime>

#include "compat.h"
#include "loopguard/clock.h"
#include "loopguard/cumulative.h"
#include "py_engine.h"

namespace loopguard {
namespace {

struct TimedSteps {
  PyObject ob_base;        // what PyObject_HEAD expands to
  PyObject* engine_owner;  // strong: keeps `engine` alive
  PyEngine* engine;
  PyObject* coro;    // strong; the request's own coroutine
  PyObject* report;  // strong; report(info, coro or None) when a step completes an event
  PyObject* info;    // strong; the request, handed back to report
  std::uint64_t token;
  bool measure;  // the engine asked for each step's CPU time
};

PyTypeObject* type = nullptr;

Nanos thread_cpu_now() noexcept {
  timespec ts{};
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) return -1;
  return static_cast<Nanos>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// Raises StopIteration carrying `value` (stolen), as a generator returning it would: a tuple or
// an exception instance is wrapped, or StopIteration would take it for its arguments.
PyObject* stop_with(PyObject* value) {
  if (value == Py_None) {
    Py_DECREF(value);
    PyErr_SetNone(PyExc_StopIteration);
    return nullptr;
  }
  if (!PyTuple_Check(value) && !PyExceptionInstance_Check(value)) {
    PyErr_SetObject(PyExc_StopIteration, value);
    Py_DECREF(value);
    return nullptr;
  }
  PyObject* stop = PyObject_CallOneArg(PyExc_StopIteration, value);
  Py_DECREF(value);
  if (stop != nullptr) {
    PyErr_SetObject(PyExc_StopIteration, stop);
    Py_DECREF(stop);
  }
  return nullptr;
}

// After the step: tells the engine, and on a completed event calls report(), keeping whatever
// exception the step itself raised. A failing report is the guard's failure, never the request's:
// it is printed as unraisable and the request goes on.
void after_step(TimedSteps* self, Nanos start, Nanos cpu_start, bool done) {
  const Nanos end = monotonic_now();
  const Nanos cpu = cpu_start >= 0 ? thread_cpu_now() - cpu_start : -1;
  const StepVerdict verdict = self->engine->timed_step(self->token, start, end, cpu);
  if (verdict == StepVerdict::kMeasureCpu) self->measure = true;
  if (verdict != StepVerdict::kReport) return;
  self->measure = true;
  PyObject* pending = compat::take_error();
  PyObject* result =
      PyObject_CallFunctionObjArgs(self->report, self->info, done ? Py_None : self->coro, nullptr);
  if (result == nullptr) {
    PyErr_WriteUnraisable(self->report);
  } else {
    Py_DECREF(result);
  }
  compat::restore_error(pending);
}

// One step: resumes the coroutine with `value`, or throws `throw_args` into it.
PyObject* step(TimedSteps* self, PyObject* value, PyObject* throw_args) {
  if (self->coro == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the timed coroutine is gone");
    return nullptr;
  }
  const Nanos start = monotonic_now();
  const Nanos cpu_start = self->measure ? thread_cpu_now() : -1;
  PyObject* result = nullptr;
  PySendResult sent;
  if (throw_args == nullptr) {
    sent = PyIter_Send(self->coro, value, &result);
  } else {
    PyObject* method = PyObject_GetAttrString(self->coro, "throw");
    result = method != nullptr ? PyObject_Call(method, throw_args, nullptr) : nullptr;
    Py_XDECREF(method);
    sent = PYGEN_NEXT;
    if (result == nullptr) {
      sent = PYGEN_ERROR;
      if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
        result = compat::take_stop_iteration_value();
        sent = PYGEN_RETURN;
      }
    }
  }
  after_step(self, start, cpu_start, sent != PYGEN_NEXT);
  if (sent == PYGEN_NEXT) return result;
  if (sent == PYGEN_ERROR) return nullptr;
  return stop_with(result);
}

PyObject* timed_next(PyObject* self) {
  return step(reinterpret_cast<TimedSteps*>(self), Py_None, nullptr);
}

PyObject* timed_send(PyObject* self, PyObject* value) {
  return step(reinterpret_cast<TimedSteps*>(self), value, nullptr);
}

PyObject* timed_throw(PyObject* self, PyObject* args) {
  return step(reinterpret_cast<TimedSteps*>(self), nullptr, args);
}

// The awaiting coroutine is closed: so is the request's (not a step: nothing of the request runs
// on the loop that the engine has to time).
PyObject* timed_close(PyObject* self, PyObject* /*unused*/) {
  PyObject* coro = reinterpret_cast<TimedSteps*>(self)->coro;
  if (coro == nullptr) Py_RETURN_NONE;
  return PyObject_CallMethod(coro, "close", nullptr);
}

PyObject* timed_self(PyObject* self) { return Py_NewRef(self); }

int timed_traverse(PyObject* self, visitproc visit, void* arg) {
  auto* t = reinterpret_cast<TimedSteps*>(self);
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(t->engine_owner);
  Py_VISIT(t->coro);
  Py_VISIT(t->report);
  Py_VISIT(t->info);
  return 0;
}

int timed_clear(PyObject* self) {
  auto* t = reinterpret_cast<TimedSteps*>(self);
  t->engine = nullptr;
  Py_CLEAR(t->coro);
  Py_CLEAR(t->report);
  Py_CLEAR(t->info);
  Py_CLEAR(t->engine_owner);
  return 0;
}

void timed_dealloc(PyObject* self) {
  PyTypeObject* tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  timed_clear(self);
  tp->tp_free(self);
  Py_DECREF(tp);
}

PyMethodDef timed_methods[] = {
    {"send", timed_send, METH_O, "Resumes the coroutine with a value: one timed step."},
    {"throw", timed_throw, METH_VARARGS, "Throws into the coroutine: one timed step."},
    {"close", timed_close, METH_NOARGS, "Closes the coroutine."},
    {nullptr, nullptr, 0, nullptr},
};

PyType_Slot timed_slots[] = {
    {Py_tp_doc,
     const_cast<char*>("A request's coroutine, each of its steps timed for the engine.")},
    {Py_tp_dealloc, reinterpret_cast<void*>(timed_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(timed_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(timed_clear)},
    {Py_tp_iter, reinterpret_cast<void*>(timed_self)},
    {Py_tp_iternext, reinterpret_cast<void*>(timed_next)},
    {Py_am_await, reinterpret_cast<void*>(timed_self)},
    {Py_tp_methods, timed_methods},
    {0, nullptr},
};

PyType_Spec timed_spec = {
    "fastapi_loopguard._core.TimedSteps",
    sizeof(TimedSteps),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    timed_slots,
};

}  // namespace

bool ready_timed_steps() {
  if (type != nullptr) return true;
  type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&timed_spec));
  return type != nullptr;
}

PyObject* make_timed_steps(PyObject* engine_owner, PyEngine* engine, PyObject* coro,
                           std::uint64_t token, PyObject* report, PyObject* info) {
  if (!ready_timed_steps()) return nullptr;
  auto* self = PyObject_GC_New(TimedSteps, type);
  if (self == nullptr) return nullptr;
  self->engine_owner = Py_NewRef(engine_owner);
  self->engine = engine;
  self->coro = Py_NewRef(coro);
  self->report = Py_NewRef(report);
  self->info = Py_NewRef(info);
  self->token = token;
  self->measure = false;
  PyObject_GC_Track(self);
  return reinterpret_cast<PyObject*>(self);
}

}  // namespace loopguard
