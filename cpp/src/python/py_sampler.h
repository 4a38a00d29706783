// The sampler over CPython, as the rest of the extension sees it: its configuration, the Python
// objects it reads, and a factory. The class itself stays inside py_sampler.cpp.
#pragma once

#include <Python.h>

#include <cstddef>
#include <memory>

#include "loopguard/frame_filter.h"
#include "loopguard/stack_sampler.h"

namespace loopguard {

struct SamplerConfig {
  FrameFilterConfig frames;  // which frame of a stack is the culprit
  std::size_t max_depth = 64;
  // The loop runs on the main thread (uvicorn, gunicorn workers): CPython runs pending calls
  // there, which lets the loop thread take a stack itself the moment it gets the GIL back.
  bool loop_is_main_thread = false;
};

// The Python objects the sampler reads to name the task outside requests (see compat.h's
// running_task): the loop, asyncio's current-task dict (3.11 to 3.13), _asyncio's current_task
// function (3.14), and the exact Task type whose get_name is C code. Any of them may be None; the
// engine holds strong references.
struct TaskLookup {
  PyObject* loop = nullptr;
  PyObject* current_tasks = nullptr;
  PyObject* current_task = nullptr;
  PyObject* task_type = nullptr;
};

// A sampler for the loop thread `loop` (its thread state), with its own thread that takes the
// GIL on request. Call with the GIL. `request_var` and the objects in `tasks` are borrowed: the
// caller keeps them alive for as long as the sampler lives.
std::unique_ptr<StackSampler> make_py_sampler(PyThreadState* loop, PyObject* request_var,
                                              TaskLookup tasks, SamplerConfig config);

}  // namespace loopguard
