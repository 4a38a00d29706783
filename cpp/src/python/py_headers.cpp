// With the C API rather than nanobind's casters: this runs for every request (and every dev-mode
// response), and the scan and the list are a handful of tuples of bytes.
#include "py_headers.h"

#include <string>
#include <string_view>

#include "loopguard/http_headers.h"

namespace loopguard {

namespace {

// Steals both: appends (name, value) to `list`. False (error set) if any part is missing.
bool append_pair(PyObject* list, PyObject* name, PyObject* value) {
  if (name == nullptr || value == nullptr) {
    Py_XDECREF(name);
    Py_XDECREF(value);
    return false;
  }
  PyObject* pair = PyTuple_Pack(2, name, value);
  Py_DECREF(name);
  Py_DECREF(value);
  if (pair == nullptr) return false;
  const int failed = PyList_Append(list, pair);
  Py_DECREF(pair);
  return failed == 0;
}

PyObject* bytes_of(const char* text) { return PyBytes_FromString(text); }

// The header names, and the pairs of a response that did not block (nearly all of them), made
// once: per response that leaves two new pairs, the id's and Server-Timing's. Never freed, like
// the module's other type objects; only touched with the GIL held.
struct Constants {
  PyObject* request_id = bytes_of("x-request-id");
  PyObject* count = bytes_of("x-blocking-count");
  PyObject* total = bytes_of("x-blocking-total-ms");
  PyObject* detected = bytes_of("x-blocking-detected");
  PyObject* timing = bytes_of("server-timing");
  PyObject* no_count = pair_of(count, "0");
  PyObject* no_total = pair_of(total, "0.00");
  PyObject* not_detected = pair_of(detected, "false");
  PyObject* was_detected = pair_of(detected, "true");

  static PyObject* pair_of(PyObject* name, const char* value) {
    PyObject* bytes = name != nullptr ? bytes_of(value) : nullptr;
    PyObject* pair = bytes != nullptr ? PyTuple_Pack(2, name, bytes) : nullptr;
    Py_XDECREF(bytes);
    return pair;
  }
  bool complete() const {
    for (PyObject* o : {request_id, count, total, detected, timing, no_count, no_total,
                        not_detected, was_detected}) {
      if (o == nullptr) return false;
    }
    return true;
  }
};

const Constants* constants() {
  static const Constants* made = nullptr;
  if (made == nullptr) {
    auto* fresh = new Constants();
    if (!fresh->complete()) return nullptr;  // out of memory: error set, tried again next time
    made = fresh;
  }
  return made;
}

// Appends a pair made once (see Constants); PyList_Append takes its own reference.
bool append_made(PyObject* list, PyObject* pair) { return PyList_Append(list, pair) == 0; }

PyObject* bytes_of(const std::string& text) {
  return PyBytes_FromStringAndSize(text.data(), static_cast<Py_ssize_t>(text.size()));
}

PyObject* str_of(std::string_view ascii) {
  return PyUnicode_FromStringAndSize(ascii.data(), static_cast<Py_ssize_t>(ascii.size()));
}

// The bytes of an X-Request-ID value; false for anything that is not bytes-like.
bool value_bytes(PyObject* value, std::string_view* out) {
  if (PyBytes_Check(value)) {
    *out = {PyBytes_AS_STRING(value), static_cast<std::size_t>(PyBytes_GET_SIZE(value))};
  } else if (PyByteArray_Check(value)) {
    *out = {PyByteArray_AS_STRING(value), static_cast<std::size_t>(PyByteArray_GET_SIZE(value))};
  } else {
    return false;
  }
  return true;
}

// Whether `name` is X-Request-ID (ASGI's names are lowercase). -1 with an error set.
int is_request_id(PyObject* name) {
  static constexpr std::string_view kName = "x-request-id";
  if (PyBytes_Check(name)) {
    return std::string_view(PyBytes_AS_STRING(name),
                            static_cast<std::size_t>(PyBytes_GET_SIZE(name))) == kName;
  }
  PyObject* expected = PyBytes_FromStringAndSize(kName.data(), kName.size());
  if (expected == nullptr) return -1;
  const int equal = PyObject_RichCompareBool(name, expected, Py_EQ);
  Py_DECREF(expected);
  return equal;
}

}  // namespace

PyObject* request_id_of(PyObject* headers) {
  if (headers == nullptr || headers == Py_None) return str_of(new_request_id());
  PyObject* items = PySequence_Fast(headers, "headers");  // the message is never shown
  if (items == nullptr) {
    PyErr_Clear();  // unreadable: an id of its own, as below
    return str_of(new_request_id());
  }
  PyObject* id = nullptr;
  bool failed = false;
  // As Python's `for name, value in headers` would: every header up to the first X-Request-ID
  // must be a pair; that one decides.
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(items) && id == nullptr && !failed; ++i) {
    PyObject* pair = PySequence_Fast(PySequence_Fast_GET_ITEM(items, i), "a header");
    if (pair == nullptr) {
      failed = true;
      break;
    }
    const int found =
        PySequence_Fast_GET_SIZE(pair) == 2 ? is_request_id(PySequence_Fast_GET_ITEM(pair, 0)) : -1;
    std::string_view value;
    if (found < 0 || (found == 1 && !value_bytes(PySequence_Fast_GET_ITEM(pair, 1), &value))) {
      failed = true;
    } else if (found == 1) {
      // Made while the pair, which owns `value`'s bytes, is still held.
      id = valid_request_id(value) ? str_of(value) : str_of(new_request_id());
      failed = id == nullptr;
    }
    Py_DECREF(pair);
  }
  Py_DECREF(items);
  if (failed) {
    // Headers the guard cannot read are no reason to fail the request, nor to raise: the request
    // gets an id of its own, as one without X-Request-ID does. The error, if the C API raised
    // one (not a sequence, a comparison that failed), goes with them.
    PyErr_Clear();
    Py_XDECREF(id);
    id = nullptr;
  }
  return id != nullptr ? id : str_of(new_request_id());
}

PyObject* with_guard_headers(PyObject* headers, PyObject* request_id, std::uint32_t count,
                             double total_ms, double wait_ms) {
  const Constants* c = constants();
  if (c == nullptr) return nullptr;
  PyObject* list = headers == Py_None ? PyList_New(0) : PySequence_List(headers);
  if (list == nullptr) return nullptr;
  bool ok = append_pair(list, Py_NewRef(c->request_id), PyUnicode_AsASCIIString(request_id));
  if (count == 0 && total_ms == 0.0) {
    ok = ok && append_made(list, c->no_count) && append_made(list, c->no_total) &&
         append_made(list, c->not_detected);
  } else {
    ok = ok && append_pair(list, Py_NewRef(c->count), bytes_of(std::to_string(count))) &&
         append_pair(list, Py_NewRef(c->total), bytes_of(fixed_ms(total_ms, 2))) &&
         append_made(list, count ? c->was_detected : c->not_detected);
  }
  if (ok && wait_ms >= 0) {
    ok = append_pair(list, Py_NewRef(c->timing), bytes_of(server_timing(wait_ms, total_ms)));
  }
  if (!ok) {
    Py_DECREF(list);
    return nullptr;
  }
  return list;
}

}  // namespace loopguard
