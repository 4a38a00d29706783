#include "loopguard/classify.h"

#include <array>

#ifdef __linux__
#include <sys/syscall.h>
#endif

namespace loopguard {

const char* kind_name(Kind kind) noexcept {
  switch (kind) {
    case Kind::kSleep:
      return "sleep";
    case Kind::kIo:
      return "io";
    case Kind::kCpu:
      return "cpu";
    case Kind::kLock:
      return "lock";
    case Kind::kGil:
      return "gil";
    case Kind::kNative:
      return "native";
    case Kind::kGc:
      return "gc";
    case Kind::kStarved:
      return "starved";
    case Kind::kIdle:
      return "idle";
    case Kind::kCumulative:
      return "cumulative";
    case Kind::kUnknown:
      break;
  }
  return "unknown";
}

namespace {

#ifdef __linux__
// Syscall numbers differ per architecture and some calls do not exist on newer ones (aarch64 has
// no plain poll/select/epoll_wait), hence the #ifdef per name.
bool is_sleep_call(long nr) {
  switch (nr) {
#ifdef SYS_clock_nanosleep
    case SYS_clock_nanosleep:
#endif
#ifdef SYS_nanosleep
    case SYS_nanosleep:
#endif
      return true;
    default:
      return false;
  }
}

bool is_loop_wait_call(long nr) {
  switch (nr) {
#ifdef SYS_epoll_wait
    case SYS_epoll_wait:
#endif
#ifdef SYS_epoll_pwait
    case SYS_epoll_pwait:
#endif
#ifdef SYS_epoll_pwait2
    case SYS_epoll_pwait2:
#endif
      return true;
    default:
      return false;
  }
}

bool is_lock_call(long nr) {
#ifdef SYS_futex
  if (nr == SYS_futex) return true;
#endif
#ifdef SYS_futex_waitv
  if (nr == SYS_futex_waitv) return true;
#endif
  (void)nr;
  return false;
}

bool is_io_call(long nr) {
  switch (nr) {
#ifdef SYS_read
    case SYS_read:
#endif
#ifdef SYS_write
    case SYS_write:
#endif
#ifdef SYS_readv
    case SYS_readv:
#endif
#ifdef SYS_writev
    case SYS_writev:
#endif
#ifdef SYS_pread64
    case SYS_pread64:
#endif
#ifdef SYS_pwrite64
    case SYS_pwrite64:
#endif
#ifdef SYS_recvfrom
    case SYS_recvfrom:
#endif
#ifdef SYS_sendto
    case SYS_sendto:
#endif
#ifdef SYS_recvmsg
    case SYS_recvmsg:
#endif
#ifdef SYS_sendmsg
    case SYS_sendmsg:
#endif
#ifdef SYS_connect
    case SYS_connect:
#endif
#ifdef SYS_accept
    case SYS_accept:
#endif
#ifdef SYS_accept4
    case SYS_accept4:
#endif
#ifdef SYS_poll
    case SYS_poll:
#endif
#ifdef SYS_ppoll
    case SYS_ppoll:
#endif
#ifdef SYS_select
    case SYS_select:
#endif
#ifdef SYS_pselect6
    case SYS_pselect6:
#endif
#ifdef SYS_open
    case SYS_open:
#endif
#ifdef SYS_openat
    case SYS_openat:
#endif
#ifdef SYS_fsync
    case SYS_fsync:
#endif
#ifdef SYS_fdatasync
    case SYS_fdatasync:
#endif
#ifdef SYS_wait4
    case SYS_wait4:
#endif
#ifdef SYS_waitid
    case SYS_waitid:
#endif
#ifdef SYS_sendfile
    case SYS_sendfile:
#endif
#ifdef SYS_copy_file_range
    case SYS_copy_file_range:
#endif
      return true;
    default:
      return false;
  }
}
#endif  // __linux__

}  // namespace

Kind classify(const OsState& state) noexcept {
  switch (state.where) {
    case OsState::Where::kRunning:
      return Kind::kCpu;
    case OsState::Where::kSyscall:
#ifdef __linux__
      if (is_loop_wait_call(state.syscall)) return Kind::kIdle;
      if (is_sleep_call(state.syscall)) return Kind::kSleep;
      if (is_lock_call(state.syscall)) return Kind::kLock;
      if (is_io_call(state.syscall)) return Kind::kIo;
#endif
      // Uninterruptible sleep is almost always disk or network file system I/O.
      if (state.sched_state == 'D') return Kind::kIo;
      return Kind::kUnknown;
    case OsState::Where::kKernel:
      // Blocked in the kernel outside any system call: a page fault waiting for the disk (a cold
      // import, a page of a mapped file or of swap). A stopped thread (a debugger, SIGSTOP)
      // reads the same and is nothing we can name.
      return state.sched_state == 'T' || state.sched_state == 't' ? Kind::kUnknown : Kind::kIo;
    case OsState::Where::kUnknown:
      break;
  }
  return Kind::kUnknown;
}

namespace {

// Who the loop waits for when it waits for the GIL: our own sampler is not the app's blocking,
// and a collection on another thread holds the GIL from start to end, so the collector is what
// the loop waits for (a threadpool thread's allocations start collections as the loop's do).
Kind gil_wait(const Evidence& ev) noexcept {
  if (ev.sampler_has_gil) return Kind::kStarved;
  return ev.gc_thread != 0 ? Kind::kGc : Kind::kGil;
}

// Less than a quarter of the time since the last reading on the CPU: native code or a busy
// Python loop would have used nearly all of it.
bool little_cpu(const Evidence& ev) noexcept {
  return ev.cpu >= 0 && ev.elapsed > 0 && ev.cpu * 4 < ev.elapsed;
}

}  // namespace

Kind refine(const OsState& state, const Evidence& ev) noexcept {
  const Kind kind = classify(state);
  if (kind == Kind::kIdle) return kind;
  if (ev.in_gc) return Kind::kGc;
  // Waiting for the GIL now: the holders are the cause, even if the thread also waited for a CPU
  // (in a GIL convoy every waiter wakes every switch interval to ask for it, crowding the CPUs
  // with this process's own threads). Waiting while our own sampler holds it is not the app's
  // blocking: as a starved sample its run counts as saturation, unless the loop itself ran a
  // threshold of CPU.
  if (kind == Kind::kLock && ev.gil_futex) return gil_wait(ev);
  // A futex wait while another thread collects, before the GIL's futex is known: the collector
  // holds the GIL throughout, so the wait is most likely for it (the sampler learns the address
  // only when it finds itself waiting, which a starved sampler on a loaded host may not). Once
  // known, a wait on another futex stays a lock: the loop waits for something else then.
  if (kind == Kind::kLock && !ev.gil_known && ev.gc_thread != 0) return gil_wait(ev);
  // Runnable but not running for most of the time since the last look: the thread was starved
  // of CPU (cgroup throttling, an overloaded host), whatever it was doing. Not a thread asleep
  // right now: what it sleeps in is the kind.
  const bool asleep = state.sched_state == 'S' || state.sched_state == 'D';
  if (!asleep && ev.run_delay >= 0 && ev.elapsed > 0 && ev.run_delay * 2 > ev.elapsed) {
    return Kind::kStarved;
  }
  if (kind == Kind::kLock) return Kind::kLock;
  // Seen "running", yet the CPU clock hardly moved, and the thread was in uninterruptible sleep
  // or took major page faults meanwhile: it spent the time in the kernel waiting for the disk,
  // which /proc shows as "running" whenever it catches the thread between two faults (a cold
  // first page load reading templates and modules). Without such evidence a thread short of
  // CPU may as well have waited for the GIL many times over: that stays what it looked like.
  if (kind == Kind::kCpu && little_cpu(ev) && (state.sched_state == 'D' || ev.major_faults > 0)) {
    return Kind::kIo;
  }
  return kind;
}

Kind without_stack(Kind refined, const Evidence& ev, const Evidence& during) noexcept {
  if (refined == Kind::kCpu) {
    if (during.elapsed > 0 && during.cpu >= 0) {
      if (during.cpu * 4 >= during.elapsed * 3) return Kind::kNative;
      if (during.run_delay >= 0 && during.run_delay * 2 > during.elapsed) return Kind::kStarved;
      return gil_wait(ev);
    }
    // Native code holding the GIL uses the CPU all along; a thread that hardly did, with
    // nothing to say why (refine() would have said I/O), is not known to be in native code.
    return little_cpu(ev) ? Kind::kUnknown : Kind::kNative;
  }
  if (refined == Kind::kLock && !(ev.gil_known && !ev.gil_futex)) return gil_wait(ev);
  return refined;
}

Kind majority_kind(const std::vector<Kind>& kinds) noexcept {
  constexpr std::size_t kKinds = static_cast<std::size_t>(Kind::kIdle) + 1;
  std::array<std::size_t, kKinds> counts{};
  std::array<std::size_t, kKinds> first_seen{};
  first_seen.fill(kinds.size());
  for (std::size_t i = 0; i < kinds.size(); ++i) {
    const auto k = static_cast<std::size_t>(kinds[i]);
    if (k >= kKinds) continue;
    if (counts[k]++ == 0) first_seen[k] = i;
  }
  Kind best = Kind::kUnknown;
  std::size_t best_count = 0;
  std::size_t best_first = kinds.size();
  for (std::size_t k = 0; k < kKinds; ++k) {
    const auto kind = static_cast<Kind>(k);
    if (kind == Kind::kUnknown || kind == Kind::kIdle) continue;
    if (counts[k] > best_count ||
        (counts[k] == best_count && counts[k] > 0 && first_seen[k] < best_first)) {
      best = kind;
      best_count = counts[k];
      best_first = first_seen[k];
    }
  }
  return best;
}

}  // namespace loopguard
