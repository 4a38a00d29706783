// Other threads' stacks: which one a lock wait of the loop most likely waits on, and how a hang
// report lists them. No CPython in here; the sampler reads the stacks (py_sampler.cpp).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "loopguard/event.h"

namespace loopguard {

// The thread a lock wait of the loop most likely waits on, or a ThreadStack with thread 0.
//
// CPython's locks, conditions and futures record no owner, so the futex the loop sleeps on names
// nobody. What does is the work: the holder of a lock, or the thread that is to set a future, is
// running the user's code meanwhile, while idle pool workers (anyio's, concurrent.futures') wait
// in library code for their next job. So the holder is the only other thread whose culprit is a
// line of application code; failing any, the only other thread with a Python stack at all. With
// two candidates or more nobody is named: a wrong holder would send the user after the wrong
// thread, which is worse than naming none.
ThreadStack choose_holder(std::vector<ThreadStack> others);

// Appends `text` for a line written straight to a file descriptor: plain printable ASCII, bytes
// below 0x20 and DEL written as '?', at most `limit` bytes and "..." when cut.
void append_printable(std::string& out, const std::string& text, std::size_t limit);

// "file:line in function" of each frame, innermost first, joined by " <- " (called from), at
// most `max_frames` of them and "<- ..." when there are more.
std::string short_stack(const std::vector<FrameInfo>& frames, std::size_t max_frames);

// The threads of a hang report, in faulthandler's spirit: a "thread <id>" line for each, then one
// indented line per frame, innermost first, each bounded. The first entry is the loop thread.
std::string thread_dump(const std::vector<ThreadStack>& threads, long loop_thread,
                        std::size_t max_frames);

}  // namespace loopguard
