// The request's headers as the guard reads and writes them (see http_headers.h), with the C API.
#pragma once

#include <Python.h>

#include <cstdint>

namespace loopguard {

// The request's id (a new str): its X-Request-ID when that may be reused, else a new one.
// `headers` is an ASGI scope's (None, or an iterable of name/value pairs of bytes); only the
// first X-Request-ID counts. Headers it cannot read (not pairs, not bytes) count as no
// X-Request-ID. nullptr with a Python error set only when out of memory.
PyObject* request_id_of(PyObject* headers);

// A new list: `headers` (None or any iterable of header pairs, left as it is) followed by
// X-Request-ID, X-Blocking-Count, X-Blocking-Total-Ms and X-Blocking-Detected, and with
// `wait_ms` >= 0 a Server-Timing header too. `request_id` must be an ASCII str. nullptr with a
// Python error set on failure (a non-ASCII id, headers that are not iterable, no memory).
PyObject* with_guard_headers(PyObject* headers, PyObject* request_id, std::uint32_t count,
                             double total_ms, double wait_ms);

}  // namespace loopguard
