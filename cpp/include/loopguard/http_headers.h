// The HTTP headers the guard reads and writes on every request: the request id it takes from
// X-Request-ID (or makes), and the values of the headers a guarded response carries in dev and
// warn/strict mode (X-Blocking-Count, X-Blocking-Total-Ms, X-Blocking-Detected and, in dev mode,
// Server-Timing). Here rather than in Python because every request pays for them: Python's
// header scan, id formatting, float formatting and f-strings cost more than the rest of the
// guard's request path.
#pragma once

#include <string>
#include <string_view>

namespace loopguard {

// Whether an incoming X-Request-ID may be reused as it is: 1 to 128 of [A-Za-z0-9._-]
// (asgi-correlation-id's rule). Anything else (CRLF, too long, non-ASCII) is replaced, so a
// hostile id never reaches a response header or a log line.
bool valid_request_id(std::string_view id);

// A process-unique id: 12 random hex digits, drawn once, and a hex counter of
// at least 10 digits. No system
// call after the first: drawing randomness per request would release the GIL, which is where a
// sampler waiting for it gets in, biasing samples towards the guard. Thread-safe.
std::string new_request_id();

// `ms` to `decimals` places, rounded as printf (and so Python's format()) round the exact binary
// value: the header and the event's log line never disagree on a digit.
std::string fixed_ms(double ms, int decimals);

// Server-Timing's two entries: the time the request was frozen by others' blocks, and the time
// its own code blocked the loop. Durations to a tenth of a millisecond, a whole number without
// its ".0" (devtools show "12" rather than "12.0").
std::string server_timing(double wait_ms, double block_ms);

}  // namespace loopguard
