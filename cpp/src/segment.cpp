#include "loopguard/segment.h"

#include <algorithm>
#include <map>
#include <utility>

namespace loopguard {

namespace {

const FrameInfo* key_frame(const Sample& s) {
  if (!s.has_stack || s.frames.empty()) return nullptr;
  const int idx = s.culprit >= 0 ? s.culprit : 0;
  return &s.frames[static_cast<std::size_t>(idx)];
}

// CPU share of the loop thread between two readings, clamped to [0, 1]; -1 when unknown.
double cpu_ratio(Nanos t0, Nanos cpu0, Nanos t1, Nanos cpu1) {
  if (t0 < 0 || cpu0 < 0 || cpu1 < 0 || t1 <= t0) return -1.0;
  const double r = static_cast<double>(cpu1 - cpu0) / static_cast<double>(t1 - t0);
  return std::clamp(r, 0.0, 1.0);
}

Event make_event(const std::vector<const Sample*>& s, std::size_t first, std::size_t last,
                 Nanos start, Nanos end, const StallInput& in) {
  Event ev;
  ev.token = s[first]->token;
  ev.start = start;
  ev.duration = end - start;
  ev.samples = static_cast<std::uint32_t>(last - first + 1);

  std::vector<Kind> kinds;
  // The representative stack is the first sample showing the most frequent culprit line: for a
  // CPU loop the line moves between samples, and the most frequent one is where the time went.
  std::map<std::pair<std::string, int>, std::size_t> line_counts;
  for (std::size_t i = first; i <= last; ++i) {
    kinds.push_back(s[i]->kind);
    const std::uint32_t own = s[i]->token != 0 && s[i]->inflight > 0 ? 1 : 0;
    ev.victims = std::max(ev.victims, s[i]->inflight - own);
    if (const FrameInfo* f = key_frame(*s[i])) ++line_counts[{f->filename, f->line}];
  }
  ev.kind = majority_kind(kinds);

  const Sample* rep = nullptr;
  std::size_t best = 0;
  for (std::size_t i = first; i <= last; ++i) {
    const FrameInfo* f = key_frame(*s[i]);
    if (f == nullptr) continue;
    const std::size_t n = line_counts[{f->filename, f->line}];
    if (n > best) {
      best = n;
      rep = s[i];
    }
  }
  if (rep == nullptr) {
    for (std::size_t i = first; i <= last && rep == nullptr; ++i) {
      if (s[i]->has_stack) rep = s[i];
    }
  }
  if (rep != nullptr) {
    ev.stack = rep->frames;
    ev.culprit = rep->culprit;
  } else {
    ev.stack_missing = true;
  }

  double r = -1.0;
  if (last > first) r = cpu_ratio(s[first]->t, s[first]->cpu, s[last]->t, s[last]->cpu);
  if (r < 0 && first > 0)
    r = cpu_ratio(s[first - 1]->t, s[first - 1]->cpu, s[first]->t, s[first]->cpu);
  if (r < 0 && first == 0) r = cpu_ratio(in.pre_t, in.pre_cpu, s[first]->t, s[first]->cpu);
  if (r < 0) r = ev.kind == Kind::kCpu ? 1.0 : 0.0;
  ev.cpu = static_cast<Nanos>(r * static_cast<double>(ev.duration));
  return ev;
}

}  // namespace

bool same_culprit(const Sample& a, const Sample& b) noexcept {
  if (a.token != b.token) return false;
  const FrameInfo* fa = key_frame(a);
  const FrameInfo* fb = key_frame(b);
  // Without a stack on one side the request is all we can compare.
  if (fa == nullptr || fb == nullptr) return true;
  return fa->function == fb->function && fa->filename == fb->filename;
}

StallResult split_stall(const std::vector<Sample>& samples, const StallInput& in) {
  StallResult out;
  std::vector<const Sample*> s;
  for (const auto& sample : samples) {
    if (sample.kind != Kind::kIdle && sample.t >= in.start && sample.t <= in.end)
      s.push_back(&sample);
  }
  const Nanos length = std::max<Nanos>(0, in.end - in.start);
  if (samples.empty() && length >= in.threshold) {
    // The stall ended before any sample could be taken: it is still a block, just without a name.
    Event ev;
    ev.start = in.start;
    ev.duration = length;
    ev.stack_missing = true;
    out.events.push_back(std::move(ev));
    return out;
  }
  if (s.empty() || length == 0) {
    // Only samples of the loop waiting for I/O: it was not blocked, nor saturated, after all.
    return out;
  }

  std::vector<std::pair<std::size_t, std::size_t>> runs;
  std::size_t run_first = 0;
  for (std::size_t i = 1; i <= s.size(); ++i) {
    if (i == s.size() || !same_culprit(*s[i - 1], *s[i])) {
      runs.emplace_back(run_first, i - 1);
      run_first = i;
    }
  }

  const bool confirmed = runs.size() == 1 || runs[0].second > runs[0].first;
  Nanos start = in.start;
  if (!confirmed) {
    start = std::max(in.start, s[0]->t - (s[1]->t - s[0]->t) / 2);
    out.saturated += start - in.start;
  }
  for (std::size_t r = 0; r < runs.size(); ++r) {
    const auto [first, last] = runs[r];
    const Nanos end = r + 1 < runs.size() ? (s[last]->t + s[runs[r + 1].first]->t) / 2 : in.end;
    if (end - start >= in.threshold) {
      out.events.push_back(make_event(s, first, last, start, end, in));
    } else {
      out.saturated += end - start;
    }
    start = end;
  }
  return out;
}

}  // namespace loopguard
