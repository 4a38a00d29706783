// The asyncio pulse: a callable that stands in for a selector loop's `selector.select` and
// brackets each call with the engine's wait_begin/wait_end, which is how the engine learns,
// exactly and without a timer, when the loop waits and when it runs (see loop_pulse.h).
//
// A C type rather than a Python closure because the loop calls it on every iteration: as a
// closure it cost about 1.7k instructions an iteration, a Python frame and two bound-method
// crossings into the engine (docs/benchmarks.md). It calls no Python but the selector's own
// `select`.
//
// Guards stack their pulses on one loop (the pytest plugin's and the app's). Each pulse keeps the
// one it replaced as `_loopguard_below`, and once released (`release()`, its guard stopped) it
// passes calls straight through, holds no engine, and says `_loopguard_inert`: the chain stays
// callable wherever a released pulse is buried in it.
#pragma once

#include <Python.h>

namespace loopguard {

class PyEngine;

// A new pulse around `original` (a new reference), or NULL with a Python error set.
// `engine_owner` is the Python object that owns `engine`, kept alive until release().
PyObject* make_select_pulse(PyObject* engine_owner, PyEngine* engine, PyObject* original);

}  // namespace loopguard
