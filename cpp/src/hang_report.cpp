// The hang report: what the watchdog writes to hang_fd while a stall longer than hang_threshold
// lasts, and when a stack may be read for it without the GIL.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <string>
#include <vector>

#include "loopguard/classify.h"
#include "loopguard/engine.h"
#include "loopguard/thread_stacks.h"

namespace loopguard {

namespace {
// How much of a stack a hang report writes: the short stack of the line, and each thread's in
// the dump of the first report.
constexpr std::size_t kHangLineFrames = 6;
constexpr std::size_t kHangDumpFrames = 24;

void write_all(int fd, const std::string& text) {
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n > 0) {
      done += static_cast<std::size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      break;  // a closed or full stderr must not stop the watchdog
    }
  }
}
}  // namespace

// Which Python frames cannot move while a sample that got no GIL in time says what it says. A
// thread changes its frames only while it holds the GIL and runs bytecode, and a thread running
// bytecode hands the GIL over within the switch interval, far less than the sampler waited. So:
// - the loop thread in a blocking system call (sleep, I/O, a lock) or in native code (running,
//   with the CPU clock advancing and the GIL kept) runs no bytecode, and nobody else got the GIL
//   either: it is the loop's, or held in native code by a thread just as stuck. Every thread's
//   frames stand still.
// - the loop waiting for the GIL: its own frames stand still, but the GIL's holder may be running
//   Python that only lets the GIL go to others, so the other threads are not read.
// - anything else (Python on the CPU that the sampler lost the GIL race to, a starved sampler, a
//   collection that may run finalizers) may be moving its frames: nothing is read.
Engine::Frozen Engine::frozen_without_gil(const Sample& latest) {
  if (!latest.no_gil) return Frozen::kNothing;
  switch (latest.kind) {
    case Kind::kNative:
    case Kind::kSleep:
    case Kind::kIo:
    case Kind::kLock:
      return Frozen::kEveryThread;
    case Kind::kGil:
      return Frozen::kLoopThread;
    default:
      return Frozen::kNothing;
  }
}

void Engine::report_hang(Nanos now) {
  if (config_.hang_threshold <= 0) return;
  if (now - stall_.start < config_.hang_threshold || now < stall_.next_hang_report) return;
  const bool first = !stall_.hang;
  if (first) {
    stall_.hang = true;
    stall_.hang_every = config_.hang_threshold;
    hangs_.fetch_add(1, std::memory_order_relaxed);
  } else {
    stall_.hang_every = std::min<Nanos>(stall_.hang_every * 2, 60'000 * kMs);
  }
  stall_.next_hang_report = now + stall_.hang_every;
  if (config_.hang_fd < 0) return;  // counted and marked, but nowhere to write

  const Sample* latest = stall_.samples.empty() ? nullptr : &stall_.samples.back();
  const Sample* named = nullptr;
  for (auto it = stall_.samples.rbegin(); it != stall_.samples.rend() && named == nullptr; ++it) {
    if (it->has_stack && !it->frames.empty()) named = &*it;
  }
  // The other threads, listed once, at the first report: with the GIL when it can be had,
  // otherwise read without it below.
  std::vector<ThreadStack> others;
  if (first && named != nullptr && sampler_ && config_.capture_stacks && latest != nullptr &&
      !latest->no_gil) {
    Sample all;
    if (sampler_->sample_all(all, config_.stack_timeout)) others = std::move(all.others);
  }
  // No stack through the GIL: read the loop thread's frames without it, which is only sound
  // while nothing can move them (see frozen_without_gil).
  Sample unlocked;
  bool without_gil = false;
  Frozen frozen = latest != nullptr ? frozen_without_gil(*latest) : Frozen::kNothing;
  // The sample may be an interval old: a loop that has just come back from its system call runs
  // bytecode again and moves its frames. Looked at again right before the read, it must still be
  // in a system call (a native holder of the GIL cannot be told from Python this way, and is
  // trusted to the sample).
  if (frozen != Frozen::kNothing && latest->kind != Kind::kNative && probe_ &&
      probe_->where().where != OsState::Where::kSyscall) {
    frozen = Frozen::kNothing;
  }
  if (named == nullptr && frozen != Frozen::kNothing && sampler_ && config_.capture_stacks) {
    const bool all = first && frozen == Frozen::kEveryThread;
    without_gil =
        sampler_->read_without_gil(unlocked, all ? &others : nullptr) && !unlocked.frames.empty();
    if (without_gil) {
      unlocked_stacks_.fetch_add(1, std::memory_order_relaxed);
      named = &unlocked;
    }
  }
  char head[96];
  std::snprintf(head, sizeof head, "loopguard: event loop blocked for %.2f s and still blocked",
                static_cast<double>(now - stall_.start) / 1e9);
  std::string line = head;
  // A stack read without the GIL carries no request (the Context is not read that way).
  const std::uint64_t token =
      named != nullptr && !without_gil ? named->token : (latest ? latest->token : 0);
  const std::string label = token != 0 ? requests_.label(token) : std::string();
  // No stack through the GIL: whose Context the loop runs in is not known, so with requests in
  // flight it may be one of them; the line says so rather than "no active request".
  const bool unknown = (named == nullptr || without_gil) && latest != nullptr && latest->no_gil;
  const std::uint32_t inflight = label.empty() && unknown ? requests_.inflight() : 0;
  if (!label.empty()) {
    line += " during ";
    append_printable(line, label, 300);
  } else if (inflight == 1) {
    line += " (its request unknown without the GIL; the one in flight: ";
    append_printable(line, requests_.sole_label(), 300);
    line += ")";
  } else if (inflight > 1) {
    line += " (its request unknown without the GIL; " + std::to_string(inflight) + " in flight)";
  } else {
    line += " (no active request)";
  }
  line += "; kind=";
  line += kind_name(latest != nullptr ? latest->kind : Kind::kUnknown);
  if (named != nullptr) {
    const auto idx = static_cast<std::size_t>(named->culprit >= 0 ? named->culprit : 0);
    const FrameInfo& f = named->frames[idx];
    line += "; culprit=";
    append_printable(line, f.filename, 400);
    line += ":" + std::to_string(f.line) + " in ";
    append_printable(line, f.function, 200);
    if (without_gil) {
      line += " (read without the GIL); stack=";
      line += short_stack(named->frames, kHangLineFrames);
    }
  } else {
    line += "; culprit=<stack unavailable>";
  }
  line += "\n";
  // Who else runs Python: the thread holding the lock the loop waits on, or the one that is to
  // set its future. Only when there is someone besides the loop thread to show.
  others.erase(std::remove_if(others.begin(), others.end(),
                              [](const ThreadStack& t) { return t.frames.empty(); }),
               others.end());
  if (!others.empty()) {
    const long loop_tid = probe_ ? probe_->tid() : 0;
    std::vector<ThreadStack> threads;
    threads.reserve(others.size() + 1);
    ThreadStack loop;
    loop.thread = loop_tid;
    if (named != nullptr) loop.frames = named->frames;
    threads.push_back(std::move(loop));
    for (auto& t : others) threads.push_back(std::move(t));
    line += "loopguard: Python threads at the first report of this hang:\n";
    line += thread_dump(threads, loop_tid, kHangDumpFrames);
  }
  write_all(config_.hang_fd, line);
}

}  // namespace loopguard
