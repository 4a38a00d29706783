#include "loopguard/proc.h"

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#ifdef __linux__
#include <sys/syscall.h>
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
  // "-1 sp pc": blocked, but not inside a system call (e.g. a page fault): unknown.
  if (nr < 0) return st;
  st.where = OsState::Where::kSyscall;
  st.syscall = nr;
  return st;
}

char parse_stat_state(const char* text) noexcept {
  // "pid (comm) S ...": comm may contain spaces and parentheses, so look after the last ')'.
  if (text == nullptr) return 0;
  const char* close = std::strrchr(text, ')');
  if (close == nullptr || close[1] != ' ' || close[2] == '\0') return 0;
  return close[2];
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

OsThreadProbe::OsThreadProbe(long tid, pthread_t handle) {
#ifdef __linux__
  if (tid > 0) {
    syscall_fd_ = open_task_file(tid, "syscall");
    stat_fd_ = open_task_file(tid, "stat");
  }
#else
  (void)tid;
#endif
  have_cpu_clock_ = pthread_getcpuclockid(handle, &cpu_clock_) == 0;
}

OsThreadProbe::~OsThreadProbe() {
  if (syscall_fd_ >= 0) ::close(syscall_fd_);
  if (stat_fd_ >= 0) ::close(stat_fd_);
}

OsState OsThreadProbe::state() noexcept {
  char buf[512];
  OsState st;
  if (read_at_zero(syscall_fd_, buf, sizeof buf)) st = parse_syscall_line(buf);
  if (read_at_zero(stat_fd_, buf, sizeof buf)) st.sched_state = parse_stat_state(buf);
  return st;
}

Nanos OsThreadProbe::cpu_time() noexcept {
  if (!have_cpu_clock_) return -1;
  timespec ts{};
  if (clock_gettime(cpu_clock_, &ts) != 0) return -1;
  return static_cast<Nanos>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

}  // namespace loopguard
