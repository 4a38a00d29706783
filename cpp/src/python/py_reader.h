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
#include <deque>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
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
  // With the GIL: lets go of the code objects the reader keeps (see codes_).
  ~PyReader();
  PyReader(const PyReader&) = delete;
  PyReader& operator=(const PyReader&) = delete;

  // What a sample needs of one code object, kept from one sample to the next: its names as UTF-8
  // and the lines of the offsets it has been sampled at. Finding a line scans the code's line
  // table from the start, which made the line numbers two thirds of a sample's time; a server's
  // stall is sampled in the same few dozen frames again and again.
  struct CodeInfo {
    std::string filename;
    std::string function;
    bool coroutine = false;
    std::vector<std::pair<int, int>> lines;  // (byte offset, line), in the order first seen
  };
  // A stack as capture() reads it under the GIL: each frame's code and line, the names left in
  // the reader's cache. finish() turns it into frames, with or without the GIL, so the loop waits
  // for no string copies and no path lookups.
  struct Walked {
    struct Frame {
      const CodeInfo* code;
      int line;
    };
    std::vector<Frame> frames;
    std::deque<CodeInfo> uncached;  // the names of code past kMaxCodes, read the long way
  };

  // With the GIL: the Context's request token of the loop thread (target 0) or of the thread
  // whose kernel id is `target`, and with `frames` its stack (into `walked`) and, outside
  // requests, the task that ran.
  void capture(Sample& out, bool frames, long target, Walked& walked);

  // After capture(), with or without the GIL: the walked stack as out's frames, their file names
  // normalised, and its culprit.
  void finish(Sample& out, const Walked& walked);

  // Every other thread that runs Python, bounded in threads and depth. With the GIL.
  void read_others(std::vector<ThreadStack>& out);

  // Without the GIL, while the loop thread holds it (see StackSampler::read_without_gil): the
  // loop thread's stack, and the others' if asked. The caller has checked that this process owns
  // the threads and is not finalizing.
  bool read_without_gil(Sample& out, std::vector<ThreadStack>* others);

 private:
  PyThreadState* find_thread(long target) const;
  std::uint64_t read_token(PyThreadState* tstate) const;
  std::string describe_task(const CodeInfo* coroutine) const;
  void walk(PyThreadState* tstate, std::size_t depth, std::vector<FrameInfo>& frames);
  const CodeInfo* walk_with_gil(PyThreadState* tstate, Walked& walked);
  void read_others_locked(std::vector<ThreadStack>& out);

  CodeInfo* code_info(PyCodeObject* code);
  static int line_of(CodeInfo& info, PyCodeObject* code, int offset);

  struct RawFrame {
    char filename[512];
    char function[256];
    int line;
  };
  static constexpr std::size_t kMaxRecords = 1024;  // records walked per thread, shims included
  static constexpr std::size_t kMaxOtherThreads = 16;
  static constexpr std::size_t kOtherThreadDepth = 24;
  static constexpr std::size_t kMaxCodes = 2048;
  static constexpr std::size_t kMaxLinesPerCode = 32;

  PyThreadState* const loop_;
  PyInterpreterState* const interp_;
  PyObject* const request_var_;
  const TaskLookup tasks_;
  const std::size_t max_depth_;
  FrameFilter filter_;
  std::mutex walk_mutex_;  // guards raw_, which a walk fills with or without the GIL
  std::vector<RawFrame> raw_;
  // Keyed by the code object, each one held by a strong reference: its address cannot be reused
  // by another code object while it is a key. Only added to, with the GIL, until kMaxCodes; past
  // that, frames are read the long way. Never shrunk while the reader lives, because letting go
  // of a code object on the sampler thread could free it there, and freeing runs its weak
  // references' callbacks: user code. Changed only with the GIL, which guards it; finish() reads
  // entries' names without it, which is sound because an entry's names are written once, before
  // its address is handed out, and no entry is removed while the reader lives.
  std::unordered_map<PyCodeObject*, CodeInfo> codes_;
};

}  // namespace loopguard
