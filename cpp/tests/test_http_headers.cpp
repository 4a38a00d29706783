// The request id's rule, and header values that read exactly as Python's format() wrote them
// before they moved here: the same digits as the events' durations in the log and on the page.
#include <gtest/gtest.h>

#include <string>

#include "loopguard/http_headers.h"

namespace loopguard {
namespace {

TEST(RequestId, OnlyAShortIdOfSafeCharactersIsReused) {
  EXPECT_TRUE(valid_request_id("abc-123_X.y"));
  EXPECT_TRUE(valid_request_id(std::string(128, 'a')));
  EXPECT_FALSE(valid_request_id(std::string(129, 'a')));
  EXPECT_FALSE(valid_request_id(""));
  for (const char* hostile : {"a\r\nX-Evil: 1", "a b", "\x1b[31m", "caf\xc3\xa9", "a/b", "a;b"}) {
    EXPECT_FALSE(valid_request_id(hostile)) << hostile;
  }
  EXPECT_FALSE(valid_request_id(std::string_view("a\0b", 3)));
}

TEST(RequestId, NewIdsShareAPrefixAndNeverRepeat) {
  const std::string first = new_request_id(), second = new_request_id();
  ASSERT_EQ(first.size(), 22u);
  EXPECT_TRUE(valid_request_id(first));
  EXPECT_EQ(first.substr(0, 12), second.substr(0, 12));  // drawn once per process
  EXPECT_NE(first, second);
  EXPECT_EQ(std::stoull(second.substr(12), nullptr, 16),
            std::stoull(first.substr(12), nullptr, 16) + 1);
}

TEST(ResponseHeaders, FixedRoundsTheBinaryValueAsFormatDoes) {
  EXPECT_EQ(fixed_ms(0.0, 2), "0.00");
  EXPECT_EQ(fixed_ms(300.4, 2), "300.40");
  EXPECT_EQ(fixed_ms(1.005, 2), "1.00");  // 1.005 is 1.00499999... in binary, as format() says
  EXPECT_EQ(fixed_ms(2.675, 2), "2.67");
  EXPECT_EQ(fixed_ms(0.125, 2), "0.12");  // exactly half: to even, as format() does
  EXPECT_EQ(fixed_ms(123456789.0, 2), "123456789.00");
}

TEST(ResponseHeaders, ServerTimingDropsAWholeNumbersPointZero) {
  EXPECT_EQ(server_timing(0.0, 0.0), "loopguard-wait;dur=0, loopguard-block;dur=0");
  EXPECT_EQ(server_timing(12.0, 250.04), "loopguard-wait;dur=12, loopguard-block;dur=250");
  EXPECT_EQ(server_timing(0.25, 99.96), "loopguard-wait;dur=0.2, loopguard-block;dur=100");
  EXPECT_EQ(server_timing(10.05, 1.5), "loopguard-wait;dur=10.1, loopguard-block;dur=1.5");
}

}  // namespace
}  // namespace loopguard
