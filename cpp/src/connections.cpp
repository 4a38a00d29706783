#include "loopguard/connections.h"

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

namespace loopguard {

namespace {
constexpr unsigned kListen = 0x0A;
constexpr unsigned kEstablished = 0x01;
constexpr std::size_t kMaxDescriptors = 65536;
constexpr std::size_t kMaxTableBytes = 16u << 20;  // /proc/net/tcp of a very busy host

// The next whitespace-separated field of `text` from `pos`, or an empty view at the end.
std::string_view next_field(std::string_view text, std::size_t& pos) {
  while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\t')) ++pos;
  const std::size_t start = pos;
  while (pos < text.size() && text[pos] != ' ' && text[pos] != '\t') ++pos;
  return text.substr(start, pos - start);
}

bool parse_hex(std::string_view s, unsigned long& out) {
  if (s.empty() || s.size() > 16) return false;
  out = 0;
  for (const char c : s) {
    unsigned v = 0;
    if (c >= '0' && c <= '9') {
      v = static_cast<unsigned>(c - '0');
    } else if (c >= 'A' && c <= 'F') {
      v = static_cast<unsigned>(c - 'A' + 10);
    } else if (c >= 'a' && c <= 'f') {
      v = static_cast<unsigned>(c - 'a' + 10);
    } else {
      return false;
    }
    out = out * 16 + v;
  }
  return true;
}

bool parse_decimal(std::string_view s, unsigned long& out) {
  if (s.empty() || s.size() > 20) return false;
  out = 0;
  for (const char c : s) {
    if (c < '0' || c > '9') return false;
    out = out * 10 + static_cast<unsigned long>(c - '0');
  }
  return true;
}

bool read_file(const char* path, std::string& out) {
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
    if (out.size() > kMaxTableBytes) break;
  }
  ::close(fd);
  return true;
}
}  // namespace

std::vector<TcpSocket> parse_proc_net_tcp(std::string_view text) {
  std::vector<TcpSocket> out;
  std::size_t line_start = 0;
  while (line_start < text.size()) {
    std::size_t line_end = text.find('\n', line_start);
    if (line_end == std::string_view::npos) line_end = text.size();
    const std::string_view line = text.substr(line_start, line_end - line_start);
    line_start = line_end + 1;
    // "sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...": the header has no colon
    // ending its first field.
    std::size_t pos = 0;
    const std::string_view slot = next_field(line, pos);
    if (slot.empty() || slot.back() != ':') continue;
    const std::string_view local = next_field(line, pos);
    (void)next_field(line, pos);  // remote address
    const std::string_view state = next_field(line, pos);
    const std::string_view queues = next_field(line, pos);
    for (int skip = 0; skip < 4; ++skip) (void)next_field(line, pos);  // tr, retrnsmt, uid, timeout
    const std::string_view inode = next_field(line, pos);
    const std::size_t port_at = local.rfind(':');
    const std::size_t rx_at = queues.find(':');
    TcpSocket s;
    unsigned long port = 0, st = 0, rx = 0;
    if (port_at == std::string_view::npos || rx_at == std::string_view::npos ||
        !parse_hex(local.substr(port_at + 1), port) || !parse_hex(state, st) ||
        !parse_hex(queues.substr(rx_at + 1), rx) || !parse_decimal(inode, s.inode)) {
      continue;
    }
    s.port = static_cast<unsigned>(port);
    s.state = static_cast<unsigned>(st);
    s.unread = static_cast<long>(rx);
    out.push_back(s);
  }
  return out;
}

int count_waiting(const std::vector<TcpSocket>& sockets,
                  const std::unordered_set<unsigned long>& own) {
  std::unordered_set<unsigned> listening;
  long waiting = 0;
  for (const auto& s : sockets) {
    if (s.state != kListen || own.count(s.inode) == 0) continue;
    listening.insert(s.port);
    waiting += s.unread;  // a listening socket's receive queue is its accept queue
  }
  for (const auto& s : sockets) {
    if (s.state == kEstablished && s.unread > 0 && listening.count(s.port) != 0 &&
        own.count(s.inode) != 0) {
      ++waiting;
    }
  }
  return static_cast<int>(std::min<long>(waiting, 1'000'000));
}

int waiting_connections() noexcept {
  try {
    DIR* dir = ::opendir("/proc/self/fd");
    if (dir == nullptr) return -1;
    std::unordered_set<unsigned long> own;
    const int dir_fd = ::dirfd(dir);
    std::size_t seen = 0;
    while (const dirent* entry = ::readdir(dir)) {
      if (entry->d_name[0] == '.' || ++seen > kMaxDescriptors) continue;
      char target[64];
      const ssize_t n = ::readlinkat(dir_fd, entry->d_name, target, sizeof target - 1);
      if (n <= 0) continue;
      target[n] = '\0';
      // "socket:[12345]"
      if (std::strncmp(target, "socket:[", 8) != 0) continue;
      unsigned long inode = 0;
      const char* end = std::strchr(target + 8, ']');
      if (end != nullptr &&
          parse_decimal(std::string_view(target + 8, static_cast<std::size_t>(end - target - 8)),
                        inode)) {
        own.insert(inode);
      }
    }
    ::closedir(dir);
    if (own.empty()) return 0;
    std::string text;
    const bool v4 = read_file("/proc/self/net/tcp", text);
    const bool v6 = read_file("/proc/self/net/tcp6", text);
    if (!v4 && !v6) return -1;
    return count_waiting(parse_proc_net_tcp(text), own);
  } catch (...) {  // out of memory: unknown, never a crash of the watchdog
    return -1;
  }
}

}  // namespace loopguard
