#include "loopguard/request_table.h"

#include <algorithm>
#include <utility>

namespace loopguard {

namespace {

// Appends `text`, at most `limit` bytes of it, with control characters shown as '?' and "..." when
// cut. UTF-8 is kept whole: the cut never splits a character, and a C1 control (U+0080..U+009F,
// two bytes) is one '?'.
void append_part(std::string& out, std::string_view text, std::size_t limit) {
  std::size_t i = 0;
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    std::size_t len = 1;
    if (c >= 0xf0) {
      len = 4;
    } else if (c >= 0xe0) {
      len = 3;
    } else if (c >= 0xc0) {
      len = 2;
    }
    if (i + len > limit) break;
    if (c < 0x20 || c == 0x7f) {
      out.push_back('?');
    } else if (c == 0xc2 && i + 1 < text.size() && static_cast<unsigned char>(text[i + 1]) < 0xa0) {
      out.push_back('?');  // a C1 control: 8-bit CSI and friends
    } else {
      out.append(text.substr(i, len));
    }
    i += len;
  }
  if (i < text.size()) out += "...";
}

}  // namespace

std::string request_label(std::string_view method, std::string_view path,
                          std::string_view request_id) {
  std::string out;
  out.reserve(method.size() + std::min(path.size(), kLabelPathBytes) +
              std::min(request_id.size(), kLabelIdBytes) + 24);
  if (method.empty()) {
    append_part(out, request_id, kLabelPathBytes);
  } else {
    append_part(out, method, 16);
    out.push_back(' ');
    append_part(out, path, kLabelPathBytes);
  }
  out += " request_id=";
  append_part(out, request_id, kLabelIdBytes);
  return out;
}

std::uint64_t RequestTable::begin(std::string label, Nanos now) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::uint64_t token = next_++;
  inflight_.emplace(token, Entry{RequestCounters{}, std::move(label), now});
  return token;
}

bool RequestTable::step(std::uint64_t token, Nanos start, Nanos end) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (inflight_.count(token) == 0) return false;
  steps_[steps_next_] = {token, start, end};
  steps_next_ = (steps_next_ + 1) % kStepLog;
  return true;
}

std::vector<StepSpan> RequestTable::steps_since(Nanos since) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<StepSpan> out;
  for (std::size_t i = 0; i < kStepLog; ++i) {
    const StepSpan& step = steps_[(steps_next_ + i) % kStepLog];
    if (step.token != 0 && step.end >= since) out.push_back(step);
  }
  return out;
}

std::string RequestTable::label(std::uint64_t token) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = inflight_.find(token);
  return it == inflight_.end() ? std::string() : it->second.label;
}

std::string RequestTable::sole_label() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return inflight_.size() == 1 ? inflight_.begin()->second.label : std::string();
}

std::optional<Nanos> RequestTable::open_since(std::uint64_t token, Nanos since) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (auto it = inflight_.find(token); it != inflight_.end()) return it->second.begin;
  for (const Ended& e : ended_) {
    if (e.token == token) return e.end >= since ? std::optional<Nanos>(e.begin) : std::nullopt;
  }
  return std::nullopt;
}

bool RequestTable::end(std::uint64_t token, RequestCounters* last, Nanos now) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (last != nullptr) *last = get_locked(token);
  if (auto it = inflight_.find(token); it != inflight_.end()) {
    ended_[ended_next_] = {token, it->second.begin, now};
    ended_next_ = (ended_next_ + 1) % kEndLog;
    inflight_.erase(it);
  }
  return settles_locked(token);
}

bool RequestTable::settles(std::uint64_t token) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return settles_locked(token);
}

bool RequestTable::settles_locked(std::uint64_t token) const {
  return std::find(live_settled_.begin(), live_settled_.end(), token) != live_settled_.end();
}

std::uint32_t RequestTable::inflight() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<std::uint32_t>(inflight_.size());
}

void RequestTable::add(RequestCounters& out, std::uint64_t token, Nanos begin, const Spans& spans) {
  for (const Span& span : spans) {
    if (span.token == token) {
      ++out.count;
      out.total += span.duration;
    } else {
      // Requests in flight are frozen until the event's end: none of their code can run then.
      out.wait += std::max<Nanos>(0, span.start + span.duration - std::max(span.start, begin));
    }
  }
}

RequestCounters RequestTable::get_locked(std::uint64_t token) const {
  RequestCounters out;
  auto it = inflight_.find(token);
  if (it == inflight_.end()) return out;
  out = it->second.counters;
  add(out, token, it->second.begin, live_);
  return out;
}

RequestCounters RequestTable::get(std::uint64_t token) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return get_locked(token);
}

void RequestTable::set_live(Spans spans, std::vector<std::uint64_t> settled) {
  std::lock_guard<std::mutex> lock(mutex_);
  live_ = std::move(spans);
  live_settled_ = std::move(settled);
}

void RequestTable::commit(const Spans& spans) {
  std::lock_guard<std::mutex> lock(mutex_);
  // Once per stall, on the watchdog thread: every request in flight against every event.
  for (auto& [token, entry] : inflight_) add(entry.counters, token, entry.begin, spans);
  live_.clear();
  live_settled_.clear();
}

void RequestTable::credit(std::uint64_t token, Nanos duration) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (auto it = inflight_.find(token); it != inflight_.end()) {
    ++it->second.counters.count;
    it->second.counters.total += duration;
  }
}

}  // namespace loopguard
