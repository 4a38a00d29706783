#include "loopguard/proc.h"

#include <dirent.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "loopguard/connections.h"

#ifdef __linux__
#include <sys/syscall.h>
#include <sys/uio.h>
#endif

namespace loopguard {

long current_tid() noexcept {
#ifdef __linux__
  return static_cast<long>(::syscall(SYS_gettid));
#else
  return -1;
#endif
}

OsState parse_syscall_line(const char* text) noexcept {
  OsState st;
  if (text == nullptr || *text == '\0') return st;
  if (std::strncmp(text, "running", 7) == 0) {
    st.where = OsState::Where::kRunning;
    return st;
  }
  char* end = nullptr;
  const long nr = std::strtol(text, &end, 10);
  if (end == text) return st;
  // "-1 sp pc": blocked in the kernel, but not inside a system call: a page fault.
  if (nr < 0) {
    st.where = OsState::Where::kKernel;
    return st;
  }
  st.where = OsState::Where::kSyscall;
  st.syscall = nr;
  char* next = nullptr;
  st.arg0 = std::strtoull(end, &next, 16);  // "0x..." after the number
  st.arg1 = std::strtoull(next, &end, 16);
  st.arg2 = std::strtoull(end, nullptr, 16);
  return st;
}

Nanos parse_schedstat_run_delay(const char* text) noexcept {
  // "<cpu time ns> <run delay ns> <timeslices>"
  if (text == nullptr) return -1;
  char* end = nullptr;
  (void)std::strtoll(text, &end, 10);
  if (end == text) return -1;
  const char* second = end;
  const long long delay = std::strtoll(second, &end, 10);
  if (end == second) return -1;
  return static_cast<Nanos>(delay);
}

char parse_stat_state(const char* text) noexcept {
  // "pid (comm) S ...": comm may contain spaces and parentheses, so look after the last ')'.
  if (text == nullptr) return 0;
  const char* close = std::strrchr(text, ')');
  if (close == nullptr || close[1] != ' ' || close[2] == '\0') return 0;
  return close[2];
}

long parse_stat_major_faults(const char* text) noexcept {
  // After the comm: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt ...
  if (text == nullptr) return -1;
  const char* p = std::strrchr(text, ')');
  if (p == nullptr) return -1;
  ++p;
  for (int field = 0; field < 9; ++field) {  // skip state .. cminflt
    while (*p == ' ') ++p;
    if (*p == '\0') return -1;
    while (*p != ' ' && *p != '\0') ++p;
  }
  char* end = nullptr;
  const long value = std::strtol(p, &end, 10);
  return end == p || value < 0 ? -1 : value;
}

namespace {
[[maybe_unused]] int open_task_file(long tid, const char* name) {
  char path[96];
  std::snprintf(path, sizeof path, "/proc/self/task/%ld/%s", tid, name);
  return ::open(path, O_RDONLY | O_CLOEXEC);
}

bool read_at_zero(int fd, char* buf, std::size_t size) {
  if (fd < 0) return false;
  const ssize_t n = ::pread(fd, buf, size - 1, 0);
  if (n <= 0) return false;
  buf[n] = '\0';
  return true;
}
}  // namespace

OsThreadProbe::OsThreadProbe(long tid, pthread_t handle) : tid_(tid) {
#ifdef __linux__
  if (tid > 0) {
    syscall_fd_ = open_task_file(tid, "syscall");
    stat_fd_ = open_task_file(tid, "stat");
    schedstat_fd_ = open_task_file(tid, "schedstat");
  }
#else
  (void)tid;
#endif
  have_cpu_clock_ = pthread_getcpuclockid(handle, &cpu_clock_) == 0;
}

OsThreadProbe::~OsThreadProbe() {
  if (syscall_fd_ >= 0) ::close(syscall_fd_);
  if (stat_fd_ >= 0) ::close(stat_fd_);
  if (schedstat_fd_ >= 0) ::close(schedstat_fd_);
}

OsState OsThreadProbe::state() noexcept {
  char buf[512];
  OsState st;
  if (read_at_zero(syscall_fd_, buf, sizeof buf)) st = parse_syscall_line(buf);
  if (read_at_zero(stat_fd_, buf, sizeof buf)) {
    st.sched_state = parse_stat_state(buf);
    st.major_faults = parse_stat_major_faults(buf);
  }
  if (read_at_zero(schedstat_fd_, buf, sizeof buf)) st.run_delay = parse_schedstat_run_delay(buf);
  return st;
}

OsState OsThreadProbe::where() noexcept {
  char buf[512];
  OsState st;
  if (read_at_zero(syscall_fd_, buf, sizeof buf)) st = parse_syscall_line(buf);
  return st;
}

OsState read_thread_syscall(long tid) noexcept {
  OsState st;
#ifdef __linux__
  const int fd = open_task_file(tid, "syscall");
  char buf[512];
  if (read_at_zero(fd, buf, sizeof buf)) st = parse_syscall_line(buf);
  if (fd >= 0) ::close(fd);
#else
  (void)tid;
#endif
  return st;
}

bool is_mutex_wait(const OsState& st) noexcept {
#if defined(__linux__) && defined(SYS_futex)
  // glibc's low-level lock, under every pthread_mutex_lock: futex(&lock, FUTEX_WAIT[|PRIVATE], 2),
  // 2 meaning "locked, with waiters". Condition variables, semaphores (CPython 3.11's locks) and
  // CPython 3.13's own mutex wait with other values or operations.
  constexpr std::uint64_t kWait = 0;
  constexpr std::uint64_t kCommandMask = 0x7f;  // without FUTEX_PRIVATE_FLAG, FUTEX_CLOCK_REALTIME
  return st.where == OsState::Where::kSyscall && st.syscall == SYS_futex && st.arg0 != 0 &&
         (st.arg1 & kCommandMask) == kWait && st.arg2 == 2;
#else
  (void)st;
  return false;
#endif
}

long mutex_owner(const OsState& st) noexcept {
#ifdef __linux__
  if (!is_mutex_wait(st)) return -1;
  // In a pthread_mutex_t, the owner's kernel thread id follows the lock word and its count. The
  // memory is read with process_vm_readv, which fails cleanly where a read would fault.
  int owner = 0;
  iovec local{&owner, sizeof owner};
  iovec remote{reinterpret_cast<void*>(st.arg0 + 2 * sizeof(int)), sizeof owner};
  if (::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0) != sizeof owner || owner <= 0) {
    return -1;
  }
  // Only a live thread of this process counts: anything else was not a pthread mutex after all.
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/task/%d", owner);
  return ::access(path, F_OK) == 0 ? owner : -1;
#else
  (void)st;
  return -1;
#endif
}

long OsThreadProbe::lock_owner(const OsState& st) noexcept {
  const long owner = mutex_owner(st);
  return owner == tid_ ? -1 : owner;
}

std::vector<long> OsThreadProbe::running_threads(const std::vector<long>& exclude) {
  std::vector<long> out;
#ifdef __linux__
  DIR* dir = ::opendir("/proc/self/task");
  if (dir == nullptr) return out;
  // Bounded: a process with thousands of threads is scanned only partly.
  int seen = 0;
  while (dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] < '0' || entry->d_name[0] > '9') continue;
    if (++seen > 256) break;
    const long tid = std::strtol(entry->d_name, nullptr, 10);
    if (std::find(exclude.begin(), exclude.end(), tid) != exclude.end()) continue;
    if (read_thread_syscall(tid).where == OsState::Where::kRunning) out.push_back(tid);
  }
  ::closedir(dir);
#else
  (void)exclude;
#endif
  return out;
}

Nanos OsThreadProbe::cpu_time() noexcept {
  if (!have_cpu_clock_) return -1;
  timespec ts{};
  if (clock_gettime(cpu_clock_, &ts) != 0) return -1;
  return static_cast<Nanos>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

int OsThreadProbe::waiting_connections() noexcept { return loopguard::waiting_connections(); }

}  // namespace loopguard
