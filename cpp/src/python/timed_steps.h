// The cumulative-blocking step timer: an awaitable that drives a request's own coroutine as
// `await` would, and hands each step it runs on the loop to the engine.
//
// A step runs from the loop resuming the coroutine (send/throw) until it suspends again or
// finishes. Its wall time is what the request's code held the loop for, plus any wait for the GIL
// or a CPU that other threads caused; once the engine finds the request suspect, each step's CPU
// time (the thread's CPU clock) is passed too. Per step that is two reads of CLOCK_MONOTONIC
// (the vDSO, no system call) and one call into the engine, with no Python frame of ours in
// between: the timer is on the path of every step of every request, and as a Python generator
// it cost about 10k instructions a request (docs/benchmarks.md).
//
// When a step completes a cumulative event, `report(info, coro)` is called, with `coro` None once
// the coroutine is done: the Python side builds the event (it points at where the coroutine
// waits now). That is the only Python this timer calls, and only then.
#pragma once

#include <Python.h>

#include <cstdint>

namespace loopguard {

class PyEngine;

// Readies the timer's type; false with a Python error set when it cannot be made.
bool ready_timed_steps();

// A new timer (a new reference), or NULL with a Python error set. `engine_owner` is the Python
// object that owns `engine`, kept alive as long as the timer.
PyObject* make_timed_steps(PyObject* engine_owner, PyEngine* engine, PyObject* coro,
                           std::uint64_t token, PyObject* report, PyObject* info);

}  // namespace loopguard
