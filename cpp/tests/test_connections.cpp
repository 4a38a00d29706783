#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "loopguard/connections.h"

namespace loopguard {
namespace {

// As /proc/net/tcp writes them: a server listening on 127.0.0.1:8000 (0x1F40) with 3 connections
// in its accept queue, two of its accepted connections (one with a request unread), a client
// connection of its own to a database on 5432 with a reply unread, another process's listener.
const char* kTable =
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout "
    "inode\n"
    "   0: 0100007F:1F40 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 "
    "1001 1 0000000000000000 100 0 0 10 0\n"
    "   1: 0100007F:1F40 0100007F:D2A4 01 00000000:0000004E 00:00000000 00000000     0        0 "
    "1002 1 0000000000000000 20 4 30 10 -1\n"
    "   2: 0100007F:1F40 0100007F:D2A6 01 00000000:00000000 00:00000000 00000000     0        0 "
    "1003 1 0000000000000000 20 4 30 10 -1\n"
    "   3: 0100007F:C350 0100007F:1538 01 00000000:00000100 00:00000000 00000000     0        0 "
    "1004 1 0000000000000000 20 4 30 10 -1\n"
    "   4: 00000000:2328 00000000:0000 0A 00000000:00000009 00:00000000 00000000     0        0 "
    "2001 1 0000000000000000 100 0 0 10 0\n"
    "garbage line\n";

TEST(Connections, ParsesTheKernelsTable) {
  const auto sockets = parse_proc_net_tcp(kTable);
  ASSERT_EQ(sockets.size(), 5u);
  EXPECT_EQ(sockets[0].inode, 1001u);
  EXPECT_EQ(sockets[0].state, 0x0Au);
  EXPECT_EQ(sockets[0].port, 8000u);
  EXPECT_EQ(sockets[0].unread, 3);
  EXPECT_EQ(sockets[1].unread, 0x4E);
  EXPECT_EQ(sockets[3].port, 50000u);
}

// The accept queue (3) and the one accepted connection with a request unread: 4. The process's
// own client connection and the other process's listener do not count.
TEST(Connections, CountsClientsWaitingForThisServerOnly) {
  const auto sockets = parse_proc_net_tcp(kTable);
  EXPECT_EQ(count_waiting(sockets, {1001, 1002, 1003, 1004}), 4);
  EXPECT_EQ(count_waiting(sockets, {1002, 1003, 1004}), 0);  // no listener of its own
  EXPECT_EQ(count_waiting(sockets, {}), 0);
}

// IPv6 addresses are 32 hex digits; the port is what follows the last colon.
TEST(Connections, ReadsIpv6Lines) {
  const std::string line =
      "   0: 00000000000000000000000001000000:1F40 00000000000000000000000000000000:0000 0A "
      "00000000:00000002 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n";
  const auto sockets = parse_proc_net_tcp(line);
  ASSERT_EQ(sockets.size(), 1u);
  EXPECT_EQ(sockets[0].port, 8000u);
  EXPECT_EQ(count_waiting(sockets, {77}), 2);
}

// This process, for real: a listener on loopback with two connections the kernel accepted and
// nobody took up yet. The two client ends are this process's too, but not its server's.
TEST(Connections, CountsThisProcesssAcceptQueue) {
  const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  ASSERT_EQ(::listen(listener, 16), 0);
  const int before = waiting_connections();
  EXPECT_EQ(before, 0);
  int clients[2];
  for (int& c : clients) {
    c = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(c, 0);
    ASSERT_EQ(::connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  }
  EXPECT_EQ(waiting_connections(), 2);
  for (const int c : clients) ::close(c);
  ::close(listener);
}

}  // namespace
}  // namespace loopguard
