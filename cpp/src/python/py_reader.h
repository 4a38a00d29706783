// Reading one interpreter's Python state into plain C++ data: a thread's frames, the request token
// in its contextvars Context, the running task's name. No threads and no waiting here: the sampler
// (py_sampler.cpp) decides when to read, and while holding what.
//
// Nothing here calls back into user code: no Python-level calls but the exact Task type's C
// get_name, no attribute lookups, and the cyclic GC disabled around the few allocations made
// under the GIL (a collection would run __del__ methods on the reading thread).
#pragma once

#include <Python.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "loopguard/event.h"
#include "loopguard/frame_filter.h"
#include "loopguard/stack_sampler.h"
#include "py_sampler.h"

namespace loopguard {

class PyReader {
 public:
  // `loop` is the loop thread's state; `request_var` and the objects in `tasks` are borrowed (the
  // engine keeps them alive for as long as the reader lives). Call with the GIL.
  PyReader(PyThreadState* loop, PyObject* request_var, TaskLookup tasks,
           const FrameFilterConfig& frames, std::size_t max_depth);

  // With the GIL: the Context's request token of the loop thread (target 0) or of the thread
  // whose kernel id is `target`, and with `frames` its stack, culprit and, outside requests, the
  // task that ran.
  void capture(Sample& out, bool frames, long target);

  // Every other thread that runs Python, bounded in threads and depth. With the GIL.
  void read_others(std::vector<ThreadStack>& out);

  // Without the GIL, while the loop thread holds it (see StackSampler::read_without_gil): the
  // loop thread's stack, and the others' if asked. The caller has checked that this process owns
  // the threads and is not finalizing.
  bool read_without_gil(Sample& out, std::vector<ThreadStack>* others);

 private:
  PyThreadState* find_thread(long target) const;
  std::uint64_t read_token(PyThreadState* tstate) const;
  std::string describe_task(const std::string& coroutine) const;
  void walk(PyThreadState* tstate, std::size_t depth, std::vector<FrameInfo>& frames);
  void read_others_locked(std::vector<ThreadStack>& out);

  struct RawFrame {
    char filename[512];
    char function[256];
    int line;
  };
  static constexpr std::size_t kMaxRecords = 1024;  // records walked per thread, shims included
  static constexpr std::size_t kMaxOtherThreads = 16;
  static constexpr std::size_t kOtherThreadDepth = 24;

  PyThreadState* const loop_;
  PyInterpreterState* const interp_;
  PyObject* const request_var_;
  const TaskLookup tasks_;
  const std::size_t max_depth_;
  FrameFilter filter_;
  std::mutex walk_mutex_;  // guards raw_, which a walk fills with or without the GIL
  std::vector<RawFrame> raw_;
};

}  // namespace loopguard
