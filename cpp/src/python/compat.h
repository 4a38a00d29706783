// Every CPython-version-specific access of the engine lives here, each with the reason it exists.
// The sampler reads another thread's state (its frames and its contextvars Context) while holding
// the GIL; that is exactly the part of CPython that moves between versions.
//
// Supported: CPython 3.11, 3.12, 3.13 and 3.14, each built and tested by `make test-matrix` (3.12
// where the machine has a 3.12 interpreter: no Debian release ships one). Every field and function
// used below was checked against those four versions' headers; where they agree no branch is
// needed. Each side of the branches left is compiled and run by a leg of the matrix:
// is_finalizing() splits 3.11/3.12 from 3.13/3.14, running_task() 3.11 to 3.13 from 3.14, and
// take_error()/restore_error() 3.11 from 3.12 on, and the unlocked frame readers theirs (below).
//
// 3.12 needs no branch of its own. Checked against its headers (3.12.1) and the C API part of its
// "What's New": PyThreadState still has context and native_thread_id (cpython/pystate.h);
// _Py_IsFinalizing is still the only spelling (cpython/pylifecycle.h); PyCodeObject still has
// co_filename, co_qualname, co_flags and co_firstlineno, and CO_COROUTINE is unchanged
// (cpython/code.h). What py_sampler.cpp calls is all there with the same signatures and reference
// semantics: the frame accessors (PyThreadState_GetFrame, PyFrame_GetCode, PyFrame_GetBack,
// PyFrame_GetLasti, PyCode_Addr2Line), PyInterpreterState_ThreadHead/PyThreadState_Next,
// PyGILState_*, PyEval_SaveThread/RestoreThread, PyGC_Disable/Enable and PyUnicode_AsUTF8AndSize.
// Py_AddPendingCall, whose pending calls 3.12 made per interpreter, still queues for the main
// thread of the main interpreter, which is where PySampler's loop capture wants to run.
// Nothing 3.12 removed (the Py_UNICODE APIs, token.h) is used, and immortal objects (PEP 683) only
// make some of our INCREF/DECREFs no-ops.
//
// Free-threaded builds (Py_GIL_DISABLED) have no GIL to serialise the sampler against the loop
// thread, so reading that thread's frames would race with it. fastapi_loopguard/_native.py refuses
// them with an ImportError before this extension is loaded, so nothing here branches on them.
#pragma once

#include <Python.h>

#include <cstddef>
#include <cstdint>

// The interpreter's own frame records, for reading a thread's stack without the GIL (see "Reading
// a stack without the GIL" below). They are only declared in CPython's internal headers, which
// refuse to be included unless Py_BUILD_CORE is defined; it is defined around this include alone,
// after Python.h, so that nothing else here is compiled as if it were CPython itself. 3.14 split
// the frame helpers out into pycore_interpframe.h.
#define Py_BUILD_CORE
#if PY_VERSION_HEX >= 0x030E0000
#include <internal/pycore_interpframe.h>
#else
#include <internal/pycore_frame.h>
#endif
#undef Py_BUILD_CORE
#if PY_VERSION_HEX < 0x030C0000
// The opcode numbers (public in 3.11), for backward_jump_target.
#include <opcode.h>
#endif

namespace loopguard::compat {

// The Context the thread is running in right now (asyncio and uvloop enter the task's Context
// around every step and callback). There is no API to read *another* thread's Context, so this
// reads PyThreadState.context, the field contextvars itself uses; it has kept its name and meaning
// from 3.7 through 3.14. NULL means the thread never entered a Context (the empty one).
// 3.14 also keeps asyncio's running task in the thread state (see running_task), but a task names
// no request for a plain callback; the Context does, on both loops, so 3.14 needs no other way in.
inline PyObject* thread_context(PyThreadState* tstate) { return tstate->context; }

// The kernel thread id of a thread state, to find the thread /proc says is running. The field
// exists (under this name, set at thread start) from 3.8 through 3.14.
inline unsigned long thread_native_id(PyThreadState* tstate) { return tstate->native_thread_id; }

// 3.13 made the finalization check public and dropped the private spelling from its headers;
// 3.11 only has the private one.
inline bool is_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// co_qualname ("Class.method") exists from 3.11, the oldest version we support; the field is
// read directly because PyCode_GetXxx accessors for it do not exist and getattr could allocate.
inline PyObject* code_filename(PyCodeObject* code) { return code->co_filename; }
inline PyObject* code_qualname(PyCodeObject* code) { return code->co_qualname; }

// The task the loop runs right now, or NULL (a new reference). 3.11 to 3.13 keep it in _asyncio's
// current_tasks dict, exported as asyncio.tasks._current_tasks and keyed by loop; the caller passes
// that dict. The lookup hashes the loop, so it is only done when the loop's type hashes by
// identity (object's own tp_hash): a loop class with its own __hash__ would be Python code run on
// the sampler thread. Checked by running a named task on 3.11.7, 3.12.1 and 3.13.0: that dict is
// _asyncio's own and maps the loop to asyncio.current_task(), also during the first step of 3.12's
// eager tasks (_swap_current_task sets it); such a task still has its default name then, as
// create_task names a factory's task only once the factory has returned.
// 3.14 moved the running task into the thread state (_PyThreadStateImpl, an internal header), and
// that dict is no longer filled by the C Task. Its _asyncio.current_task(loop), given a loop that
// is not the calling thread's, walks the interpreter's thread states under the runtime's lock and
// returns the task of the thread running that loop: C only, comparing loops by identity, so it is
// called instead of mirroring the internal struct. It is only called when it is that C function
// (asyncio's pure-Python fallback would hash the loop). Checked on 3.14.10, both loops: uvloop
// sets the running loop through asyncio's _set_running_loop, and its tasks are asyncio's C Task.
inline PyObject* running_task(PyObject* current_tasks, PyObject* current_task, PyObject* loop) {
  if (loop == nullptr) return nullptr;
#if PY_VERSION_HEX >= 0x030E0000
  (void)current_tasks;
  if (current_task == nullptr || !PyCFunction_Check(current_task)) return nullptr;
  PyObject* task = PyObject_CallOneArg(current_task, loop);
  if (task == nullptr) PyErr_Clear();
  if (task == Py_None) Py_CLEAR(task);
  return task;
#else
  (void)current_task;
  if (current_tasks == nullptr || !PyDict_CheckExact(current_tasks) ||
      Py_TYPE(loop)->tp_hash != PyBaseObject_Type.tp_hash) {
    return nullptr;
  }
  PyObject* task = PyDict_GetItemWithError(current_tasks, loop);
  if (task == nullptr) PyErr_Clear();
  Py_XINCREF(task);
  return task;
#endif
}

// Whether a code object is a coroutine's (async def): co_flags has been public, under this name,
// in every supported version.
inline bool is_coroutine_code(PyCodeObject* code) { return (code->co_flags & CO_COROUTINE) != 0; }

// ---- The current exception, as one object ----------------------------------------------------
// The step timer (timed_steps.cpp) sets aside the exception a step raised while it calls back
// into Python, and takes StopIteration's value when a thrown-into coroutine returns. 3.12 made the
// raised exception one object (PyErr_GetRaisedException) and deprecated the (type, value,
// traceback) triple that 3.11 only has; on 3.11 the triple is normalised into that one object.

// The pending exception (a new reference, the error indicator cleared), or NULL when none is set.
inline PyObject* take_error() {
#if PY_VERSION_HEX >= 0x030C0000
  return PyErr_GetRaisedException();
#else
  PyObject* type = nullptr;
  PyObject* value = nullptr;
  PyObject* traceback = nullptr;
  PyErr_Fetch(&type, &value, &traceback);
  if (type == nullptr) return nullptr;
  PyErr_NormalizeException(&type, &value, &traceback);
  if (traceback != nullptr && value != nullptr) PyException_SetTraceback(value, traceback);
  Py_XDECREF(type);
  Py_XDECREF(traceback);
  return value;
#endif
}

// Sets `error` (stolen; NULL: nothing) as the pending exception again.
inline void restore_error(PyObject* error) {
  if (error == nullptr) return;
#if PY_VERSION_HEX >= 0x030C0000
  PyErr_SetRaisedException(error);
#else
  PyErr_Restore(Py_NewRef(reinterpret_cast<PyObject*>(Py_TYPE(error))), error,
                PyException_GetTraceback(error));
#endif
}

// The value of the pending StopIteration (a new reference), the error indicator cleared. The
// caller has checked that StopIteration is what is pending.
inline PyObject* take_stop_iteration_value() {
  PyObject* stop = take_error();
  if (stop == nullptr) return Py_NewRef(Py_None);
  PyObject* value = reinterpret_cast<PyStopIterationObject*>(stop)->value;
  Py_XINCREF(value);
  Py_DECREF(stop);
  return value != nullptr ? value : Py_NewRef(Py_None);
}

// ---- Reading a stack without the GIL ----------------------------------------------------------
// When native code holds the GIL for seconds (a C extension in a long computation or a deadlock),
// no stack can be had through the API, so a hang line would name nothing while it lasts. The
// thread's frames can still be read, as faulthandler reads them from its watchdog thread: plain
// loads from the interpreter's frame records and code objects, nothing that needs the GIL,
// allocates, or touches a reference count. That is only sound while no thread can move those
// records, and the caller (PySampler::read_without_gil) decides when that is; everything below is
// bounded by the caller's depth and buffer sizes and checks each object's type before using it.
using InterpreterFrame = _PyInterpreterFrame;

// The innermost frame of a thread. 3.11 and 3.12 reach it through the C-level frame chain
// (PyThreadState.cframe, public in cpython/pystate.h); 3.13 dropped _PyCFrame and keeps the frame
// in the thread state itself.
inline InterpreterFrame* unlocked_top_frame(PyThreadState* tstate) {
#if PY_VERSION_HEX >= 0x030D0000
  return tstate->current_frame;
#else
  return tstate->cframe != nullptr ? tstate->cframe->current_frame : nullptr;
#endif
}

// The frame that called this one: a plain field in every supported version.
inline InterpreterFrame* unlocked_previous(InterpreterFrame* frame) { return frame->previous; }

// The code object a frame runs, or NULL for a record that is no Python frame of the user's to show:
// - the C-stack shim frames 3.12 put between the interpreter and C callers (FRAME_OWNED_BY_CSTACK;
//   3.14 also has FRAME_OWNED_BY_INTERPRETER, which its _PyFrame_IsIncomplete tests for);
// - a frame not yet past its RESUME (_PyFrame_IsIncomplete), which tracebacks skip as well;
// - anything whose executable is not a code object: 3.13 made the field an object pointer that may
//   be None, and 3.14 a tagged stack reference, read with PyStackRef_AsPyObjectBorrow (no
//   reference count is touched). PyCode_Check only reads the object's type.
inline PyCodeObject* unlocked_code(InterpreterFrame* frame) {
#if PY_VERSION_HEX >= 0x030C0000 && PY_VERSION_HEX < 0x030E0000
  if (frame->owner == FRAME_OWNED_BY_CSTACK) return nullptr;
#elif PY_VERSION_HEX >= 0x030E0000
  if (frame->owner >= FRAME_OWNED_BY_INTERPRETER) return nullptr;
#endif
#if PY_VERSION_HEX >= 0x030E0000
  PyObject* executable = PyStackRef_AsPyObjectBorrow(frame->f_executable);
#elif PY_VERSION_HEX >= 0x030D0000
  PyObject* executable = frame->f_executable;
#else
  PyObject* executable = reinterpret_cast<PyObject*>(frame->f_code);
#endif
  if (executable == nullptr || !PyCode_Check(executable)) return nullptr;
  if (_PyFrame_IsIncomplete(frame)) return nullptr;
  return reinterpret_cast<PyCodeObject*>(executable);
}

// Where the backward jump at byte offset `offset` goes (a byte offset), or -1 if that instruction
// is no backward jump. Only 3.11 needs it: where a loop body's branches share the jump back, 3.11
// gives that jump no line, and the eval breaker checks there, so a CPU loop is sampled right on
// it. The loop's header, its target, is the line that runs. 3.12 gives every jump a line. The
// words are read as they are: specialisation may have quickened the jump in place (both spellings
// count), and a word misread as a prefix only names another line of the same function.
inline int backward_jump_target(PyCodeObject* code, int offset) {
#if PY_VERSION_HEX < 0x030C0000
  const _Py_CODEUNIT* words = _PyCode_CODE(code);
  const Py_ssize_t index = offset / static_cast<int>(sizeof(_Py_CODEUNIT));
  if (index < 0 || index >= Py_SIZE(code)) return -1;
  const int op = _Py_OPCODE(words[index]);
  if (op != JUMP_BACKWARD && op != JUMP_BACKWARD_QUICK && op != JUMP_BACKWARD_NO_INTERRUPT) {
    return -1;
  }
  Py_ssize_t distance = _Py_OPARG(words[index]);
  for (Py_ssize_t i = index - 1, shift = 8; i >= 0 && shift <= 24; --i, shift += 8) {
    const int prefix = _Py_OPCODE(words[i]);
    if (prefix != EXTENDED_ARG && prefix != EXTENDED_ARG_QUICK) break;
    distance |= static_cast<Py_ssize_t>(_Py_OPARG(words[i])) << shift;
  }
  const Py_ssize_t target = index + 1 - distance;
  return target >= 0 && target < index ? static_cast<int>(target) * 2 : -1;
#else
  (void)code;
  (void)offset;
  return -1;
#endif
}

// The line of the instruction at byte offset `offset` in `code`, for a sample's frame: arithmetic
// on the code's immutable bytes, so it is safe without the GIL. Some instructions carry no line:
// PyCode_Addr2Line answers -1, which is no line to show anyone. A backward jump belongs to its
// loop's header; any other (exception cleanup, say) to the statement before it. The search back is
// bounded; past it, or at the code's start, the line is the function's first.
inline int line_at(PyCodeObject* code, int offset) {
  const int line = PyCode_Addr2Line(code, offset);
  if (line >= 0) return line;
  const int target = backward_jump_target(code, offset);
  if (target >= 0) {
    const int header = PyCode_Addr2Line(code, target);
    if (header >= 0) return header;
  }
  constexpr int kMaxStepsBack = 64;
  offset -= static_cast<int>(sizeof(_Py_CODEUNIT));
  for (int step = 0; offset >= 0 && step < kMaxStepsBack; ++step) {
    const int earlier = PyCode_Addr2Line(code, offset);
    if (earlier >= 0) return earlier;
    offset -= static_cast<int>(sizeof(_Py_CODEUNIT));
  }
  return code->co_firstlineno;
}

// The byte offset of a frame's last instruction (what PyFrame_GetLasti answers for a frame
// object). 3.12 published it as PyUnstable_InterpreterFrame_GetLasti; 3.11 spells out the same
// computation.
inline int unlocked_offset(InterpreterFrame* frame) {
#if PY_VERSION_HEX >= 0x030C0000
  return PyUnstable_InterpreterFrame_GetLasti(frame);
#else
  return _PyInterpreterFrame_LASTI(frame) * static_cast<int>(sizeof(_Py_CODEUNIT));
#endif
}

// Copies a str's text into buf as UTF-8, at most cap - 1 bytes, NUL-terminated; returns the bytes
// written. Only compact strings are read (their characters follow the header; code objects' names
// always are), through the public macros that read the kind, length and data in place. 3.11 may
// still hold a legacy string whose characters are not ready: it is skipped. A lone surrogate
// becomes '?'.
inline std::size_t unlocked_text(PyObject* text, char* buf, std::size_t cap) {
  if (cap == 0) return 0;
  buf[0] = '\0';
  if (text == nullptr || !PyUnicode_Check(text)) return 0;
#if PY_VERSION_HEX < 0x030C0000
  if (!PyUnicode_IS_READY(text)) return 0;
#endif
  if (!PyUnicode_IS_COMPACT(text)) return 0;
  const int kind = PyUnicode_KIND(text);
  const void* data = PyUnicode_DATA(text);
  const Py_ssize_t length = PyUnicode_GET_LENGTH(text);
  std::size_t out = 0;
  for (Py_ssize_t i = 0; i < length; ++i) {
    Py_UCS4 c = PyUnicode_READ(kind, data, i);
    if (c >= 0xD800 && c <= 0xDFFF) c = '?';
    char bytes[4];
    std::size_t n = 0;
    if (c < 0x80) {
      bytes[n++] = static_cast<char>(c);
    } else if (c < 0x800) {
      bytes[n++] = static_cast<char>(0xC0 | (c >> 6));
      bytes[n++] = static_cast<char>(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
      bytes[n++] = static_cast<char>(0xE0 | (c >> 12));
      bytes[n++] = static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      bytes[n++] = static_cast<char>(0x80 | (c & 0x3F));
    } else {
      bytes[n++] = static_cast<char>(0xF0 | (c >> 18));
      bytes[n++] = static_cast<char>(0x80 | ((c >> 12) & 0x3F));
      bytes[n++] = static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      bytes[n++] = static_cast<char>(0x80 | (c & 0x3F));
    }
    if (out + n >= cap) break;
    for (std::size_t k = 0; k < n; ++k) buf[out++] = bytes[k];
  }
  buf[out] = '\0';
  return out;
}

// Whether a pointer read from another thread's records can be followed at all: non-null and
// aligned as the interpreter allocates them. A stale pointer can still pass; this only stops the
// walk at plainly broken ones.
inline bool plausible(const void* p) {
  return p != nullptr && reinterpret_cast<std::uintptr_t>(p) % alignof(void*) == 0;
}

}  // namespace loopguard::compat
