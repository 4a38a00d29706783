// The select pulse (see select_pulse.h), written against the C API like the step timer: its
// tp_call is what the loop runs on every iteration.
#include "select_pulse.h"

#include "py_engine.h"

namespace loopguard {
namespace {

struct SelectPulse {
  PyObject ob_base;        // what PyObject_HEAD expands to
  PyObject* engine_owner;  // strong, until release(): keeps `engine` alive
  PyEngine* engine;        // null once released: calls pass straight through
  PyObject* original;      // strong; the `select` this pulse stands in for
  PyObject* below;         // strong or null; the pulse (or anything) it replaced on the selector
};

PyTypeObject* type = nullptr;

PyObject* pulse_call(PyObject* self, PyObject* args, PyObject* kwargs) {
  auto* p = reinterpret_cast<SelectPulse*>(self);
  PyEngine* engine = p->engine;
  if (engine == nullptr) return PyObject_Call(p->original, args, kwargs);
  engine->wait_begin();
  PyObject* result = PyObject_Call(p->original, args, kwargs);
  // wait_end() touches no Python state: an exception select raised stays set as it is.
  engine->wait_end();
  return result;
}

// Lets go of the engine: from now on a pass-through (see select_pulse.h).
PyObject* pulse_release(PyObject* self, PyObject* /*unused*/) {
  auto* p = reinterpret_cast<SelectPulse*>(self);
  p->engine = nullptr;
  Py_CLEAR(p->engine_owner);
  Py_RETURN_NONE;
}

PyObject* get_below(PyObject* self, void* /*closure*/) {
  PyObject* below = reinterpret_cast<SelectPulse*>(self)->below;
  return Py_NewRef(below != nullptr ? below : Py_None);
}

int set_below(PyObject* self, PyObject* value, void* /*closure*/) {
  auto* p = reinterpret_cast<SelectPulse*>(self);
  PyObject* old = p->below;
  p->below = value == nullptr || value == Py_None ? nullptr : Py_NewRef(value);
  Py_XDECREF(old);
  return 0;
}

PyObject* get_inert(PyObject* self, void* /*closure*/) {
  return PyBool_FromLong(reinterpret_cast<SelectPulse*>(self)->engine == nullptr);
}

int pulse_traverse(PyObject* self, visitproc visit, void* arg) {
  auto* p = reinterpret_cast<SelectPulse*>(self);
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(p->engine_owner);
  Py_VISIT(p->original);
  Py_VISIT(p->below);
  return 0;
}

int pulse_clear(PyObject* self) {
  auto* p = reinterpret_cast<SelectPulse*>(self);
  p->engine = nullptr;
  Py_CLEAR(p->engine_owner);
  Py_CLEAR(p->original);
  Py_CLEAR(p->below);
  return 0;
}

void pulse_dealloc(PyObject* self) {
  PyTypeObject* tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  pulse_clear(self);
  tp->tp_free(self);
  Py_DECREF(tp);
}

PyMethodDef pulse_methods[] = {
    {"release", pulse_release, METH_NOARGS, "Lets go of the engine: a pass-through from now on."},
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef pulse_getset[] = {
    {"_loopguard_below", get_below, set_below,
     "What this pulse replaced on the selector (None: the selector's own select).", nullptr},
    {"_loopguard_inert", get_inert, nullptr, "Released: calls pass straight through.", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyType_Slot pulse_slots[] = {
    {Py_tp_doc,
     const_cast<char*>("A selector's select, each call bracketed for the engine's pulse.")},
    {Py_tp_call, reinterpret_cast<void*>(pulse_call)},
    {Py_tp_dealloc, reinterpret_cast<void*>(pulse_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(pulse_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(pulse_clear)},
    {Py_tp_methods, pulse_methods},
    {Py_tp_getset, pulse_getset},
    {0, nullptr},
};

PyType_Spec pulse_spec = {
    "fastapi_loopguard._core.SelectPulse",
    sizeof(SelectPulse),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    pulse_slots,
};

}  // namespace

PyObject* make_select_pulse(PyObject* engine_owner, PyEngine* engine, PyObject* original) {
  if (type == nullptr) {
    type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&pulse_spec));
    if (type == nullptr) return nullptr;
  }
  auto* self = PyObject_GC_New(SelectPulse, type);
  if (self == nullptr) return nullptr;
  self->engine_owner = Py_NewRef(engine_owner);
  self->engine = engine;
  self->original = Py_NewRef(original);
  self->below = nullptr;
  PyObject_GC_Track(self);
  return reinterpret_cast<PyObject*>(self);
}

}  // namespace loopguard
