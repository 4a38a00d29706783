// The unit tests' stand-ins for the OS and for Python: a ThreadProbe and a StackSampler that report
// what the test set up, and helpers to set it up. Each test changes them while the engine runs.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "loopguard/engine.h"

namespace loopguard {

// What the fake OS reports about the loop thread; the test changes it while the engine runs.
struct FakeOs {
  OsState state;             // what the loop thread does while it is busy
  bool loop_waiting = true;  // true: it sits in epoll_wait, whatever `state` says
  Nanos cpu = -1;
  int state_reads = 0;
  long loop_tid = -1;         // what tid() says
  std::vector<long> running;  // threads running_threads() finds, before the exclusions
  long lock_owner = -1;       // what lock_owner() says of the loop's futex wait
  std::vector<long> last_exclude;
  int running_calls = 0;
  int queued = -1;  // what waiting_connections() says
  int queued_reads = 0;
};

inline OsState EpollWait() {
  OsState st;
#if defined(SYS_epoll_pwait)
  st.where = OsState::Where::kSyscall;
  st.syscall = SYS_epoll_pwait;
  st.sched_state = 'S';
#endif
  return st;
}

class FakeProbe final : public ThreadProbe {
 public:
  explicit FakeProbe(std::shared_ptr<FakeOs> os) : os_(std::move(os)) {}
  OsState state() noexcept override {
    ++os_->state_reads;
    return os_->loop_waiting ? EpollWait() : os_->state;
  }
  Nanos cpu_time() noexcept override { return os_->cpu; }
  std::vector<long> running_threads(const std::vector<long>& exclude) override {
    ++os_->running_calls;
    os_->last_exclude = exclude;
    std::vector<long> out;
    for (long tid : os_->running) {
      if (std::find(exclude.begin(), exclude.end(), tid) == exclude.end()) out.push_back(tid);
    }
    return out;
  }
  long lock_owner(const OsState& state) noexcept override {
    return state.syscall == os_->state.syscall && state.arg0 == os_->state.arg0 ? os_->lock_owner
                                                                                : -1;
  }
  long tid() const noexcept override { return os_->loop_tid; }
  int waiting_connections() noexcept override {
    ++os_->queued_reads;
    return os_->queued;
  }

 private:
  std::shared_ptr<FakeOs> os_;
};

// What the fake Python side shows: the current request token and stack.
struct FakePython {
  std::uint64_t token = 0;
  std::vector<FrameInfo> frames;
  int culprit = -1;
  std::string task;              // what ran outside requests, as the loop thread's sample names it
  bool succeed = true;           // false: "the GIL could not be had in time"
  std::function<void()> during;  // runs inside sample(), as if the loop thread moved meanwhile
  int calls = 0;
  Nanos last_timeout = -1;
  bool last_wanted_frames = false;
  // Another thread, sampled by kernel id (the GIL holder). Fails by default, like the base class.
  bool thread_succeed = false;
  std::uint64_t thread_token = 0;
  std::vector<FrameInfo> thread_frames;
  int thread_culprit = -1;
  int thread_calls = 0;
  long last_thread = -1;
  // A loop-thread sample that completed late; take_late() hands it out once.
  std::optional<Sample> late;
  int late_taken = 0;
  // The other threads' stacks, handed out by sample_all() and read_without_gil().
  std::vector<ThreadStack> others;
  int all_calls = 0;
  // What a read without the GIL finds on the loop thread; empty: nothing (the read fails).
  std::vector<FrameInfo> unlocked_frames;
  int unlocked_culprit = -1;
  int unlocked_calls = 0;
  bool unlocked_others_asked = false;
  std::vector<std::uint64_t> gil_futexes;  // addresses is_gil_futex() knows
  long sampler_tid = -1;
  bool sampler_has_gil = false;  // what sampler_holds_gil() says
};

class FakeSampler final : public StackSampler {
 public:
  explicit FakeSampler(std::shared_ptr<FakePython> py) : py_(std::move(py)) {}
  bool sample(Sample& out, Nanos timeout, bool frames) override {
    ++py_->calls;
    py_->last_timeout = timeout;
    py_->last_wanted_frames = frames;
    if (py_->during) py_->during();
    if (!py_->succeed) return false;
    out.token = py_->token;
    if (frames) {
      out.frames = py_->frames;
      out.culprit = py_->culprit;
      out.task = py_->task;
      out.has_stack = true;
    }
    return true;
  }
  bool sample_all(Sample& out, Nanos timeout) override {
    ++py_->all_calls;
    if (!sample(out, timeout, true)) return false;
    out.others = py_->others;
    return true;
  }
  bool read_without_gil(Sample& out, std::vector<ThreadStack>* others) override {
    ++py_->unlocked_calls;
    py_->unlocked_others_asked = others != nullptr;
    if (py_->unlocked_frames.empty()) return false;
    out.frames = py_->unlocked_frames;
    out.culprit = py_->unlocked_culprit;
    out.has_stack = true;
    if (others != nullptr) *others = py_->others;
    return true;
  }
  bool sample_thread(Sample& out, Nanos timeout, bool frames, long tid) override {
    ++py_->thread_calls;
    py_->last_thread = tid;
    py_->last_timeout = timeout;
    if (!py_->thread_succeed) return false;
    out.token = py_->thread_token;
    if (frames) {
      out.frames = py_->thread_frames;
      out.culprit = py_->thread_culprit;
      out.has_stack = true;
    }
    return true;
  }
  bool take_late(Sample& out) override {
    if (!py_->late) return false;
    out = *py_->late;
    py_->late.reset();
    ++py_->late_taken;
    return true;
  }
  bool is_gil_futex(std::uint64_t address) const override {
    return std::find(py_->gil_futexes.begin(), py_->gil_futexes.end(), address) !=
           py_->gil_futexes.end();
  }
  bool knows_gil_futex() const override { return !py_->gil_futexes.empty(); }
  long thread_id() const override { return py_->sampler_tid; }
  bool sampler_holds_gil() const override { return py_->sampler_has_gil; }

 private:
  std::shared_ptr<FakePython> py_;
};

inline OsState Running() {
  OsState st;
  st.where = OsState::Where::kRunning;
  st.sched_state = 'R';
  return st;
}

inline OsState InSyscall(long nr, char sched = 'S') {
  OsState st;
  st.where = OsState::Where::kSyscall;
  st.syscall = nr;
  st.sched_state = sched;
  return st;
}

inline std::vector<FrameInfo> HandlerStack(const char* function, int line) {
  return {{"/usr/lib/python3/time.py", "sleep_wrapper", 7},
          {"app/routes.py", function, line},
          {"/usr/lib/python3/asyncio/events.py", "_run", 88}};
}

inline bool NotifyReadable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1 && (p.revents & POLLIN) != 0;
}

// A pipe standing in for stderr in the hang tests: the engine writes, the test reads.
class HangPipe {
 public:
  HangPipe() {
    int fds[2];
    if (::pipe(fds) == 0) {
      read_ = fds[0];
      write_ = fds[1];
      ::fcntl(read_, F_SETFL, ::fcntl(read_, F_GETFL) | O_NONBLOCK);
    }
  }
  ~HangPipe() {
    if (read_ >= 0) ::close(read_);
    if (write_ >= 0) ::close(write_);
  }
  HangPipe(const HangPipe&) = delete;
  HangPipe& operator=(const HangPipe&) = delete;
  bool ok() const { return read_ >= 0; }
  int write_fd() const { return write_; }
  // Everything written since the last call.
  std::string Read() {
    std::string out;
    char buf[512];
    ssize_t n;
    while ((n = ::read(read_, buf, sizeof buf)) > 0) out.append(buf, static_cast<std::size_t>(n));
    return out;
  }

 private:
  int read_ = -1;
  int write_ = -1;
};

}  // namespace loopguard
