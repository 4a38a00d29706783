#include "loopguard/http_headers.h"

#include <atomic>
#include <charconv>
#include <cstdint>
#include <random>
#include <system_error>

namespace loopguard {

bool valid_request_id(std::string_view id) {
  if (id.empty() || id.size() > 128) return false;
  for (const char c : id) {
    const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

namespace {

// `digits` lowercase hex digits of `value`, most significant first.
void append_hex(std::string& out, std::uint64_t value, int digits) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (int shift = 4 * (digits - 1); shift >= 0; shift -= 4)
    out.push_back(kHex[(value >> shift) & 0xf]);
}

std::string tenths(double ms) {
  std::string text = fixed_ms(ms, 1);
  if (text.size() > 2 && text.compare(text.size() - 2, 2, ".0") == 0) text.resize(text.size() - 2);
  return text;
}

}  // namespace

std::string new_request_id() {
  static const std::uint64_t prefix = [] {
    std::random_device random;
    return (static_cast<std::uint64_t>(random()) << 32) | random();
  }();
  static std::atomic<std::uint64_t> counter{0};
  std::string id;
  id.reserve(22);
  append_hex(id, prefix, 12);
  const std::uint64_t n = counter.fetch_add(1, std::memory_order_relaxed) + 1;
  int digits = 10;  // at least, as "%010x" writes it
  while (digits < 16 && (n >> (4 * digits)) != 0) ++digits;
  append_hex(id, n, digits);
  return id;
}

// std::to_chars rather than printf: the same correctly rounded digits (the standard defines them
// as printf's), without glibc's multi-precision printf path, which cost several thousand
// instructions per number.
std::string fixed_ms(double ms, int decimals) {
  char text[400];  // DBL_MAX in fixed notation, with its decimals
  const auto [end, error] =
      std::to_chars(text, text + sizeof text, ms, std::chars_format::fixed, decimals);
  if (error != std::errc()) return "0";
  return std::string(text, end);
}

std::string server_timing(double wait_ms, double block_ms) {
  return "loopguard-wait;dur=" + tenths(wait_ms) + ", loopguard-block;dur=" + tenths(block_ms);
}

}  // namespace loopguard
