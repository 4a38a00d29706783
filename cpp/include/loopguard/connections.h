// Connections the kernel holds for this process that its server has not taken up yet: requests a
// blocked loop keeps waiting without ever having seen them, so no request table can count them.
// Linux only (/proc); elsewhere the count is unknown.
#pragma once

#include <string_view>
#include <unordered_set>
#include <vector>

namespace loopguard {

struct TcpSocket {
  unsigned long inode = 0;
  unsigned state = 0;  // the kernel's TCP state: 0x0A listening, 0x01 established
  unsigned port = 0;   // local port
  long unread = 0;     // listening: connections in the accept queue; else bytes not yet read
};

// The sockets of /proc/net/tcp or /proc/net/tcp6 text; malformed lines are skipped.
std::vector<TcpSocket> parse_proc_net_tcp(std::string_view text);

// Of the system's sockets, those of this process (`own` inodes) that hold a client waiting: a
// connection in one of its listening sockets' accept queues (the kernel accepted it, the server
// has not), and each of its server-side connections (local port of one of its listeners) with
// bytes received and not read (a new request on a kept-alive connection). Client connections
// the process opened itself (to a database, another service) are not counted.
int count_waiting(const std::vector<TcpSocket>& sockets,
                  const std::unordered_set<unsigned long>& own);

// The same, read from /proc/self/fd and /proc/self/net/tcp{,6}; -1 when they cannot be read. A
// few file reads and one readlink per open descriptor (at most kMaxDescriptors): called during a
// stall only, never on the loop thread.
int waiting_connections() noexcept;

}  // namespace loopguard
