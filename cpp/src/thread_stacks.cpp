#include "loopguard/thread_stacks.h"

#include <utility>

namespace loopguard {

namespace {
bool runs_application(const ThreadStack& t) { return t.culprit >= 0 && !t.culprit_is_library; }

void append_frame(std::string& out, const FrameInfo& f) {
  append_printable(out, f.filename, 400);
  out += ":" + std::to_string(f.line) + " in ";
  append_printable(out, f.function, 200);
}
}  // namespace

ThreadStack choose_holder(std::vector<ThreadStack> others) {
  ThreadStack* only_application = nullptr;
  ThreadStack* only_python = nullptr;
  std::size_t application = 0;
  std::size_t python = 0;
  for (auto& t : others) {
    if (t.thread == 0 || t.frames.empty()) continue;
    ++python;
    only_python = &t;
    if (runs_application(t)) {
      ++application;
      only_application = &t;
    }
  }
  if (application == 1) return std::move(*only_application);
  if (application == 0 && python == 1) return std::move(*only_python);
  return {};
}

void append_printable(std::string& out, const std::string& text, std::size_t limit) {
  for (std::size_t i = 0; i < text.size() && i < limit; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    out.push_back(c < 0x20 || c == 0x7f ? '?' : static_cast<char>(c));
  }
  if (text.size() > limit) out += "...";
}

std::string short_stack(const std::vector<FrameInfo>& frames, std::size_t max_frames) {
  std::string out;
  for (std::size_t i = 0; i < frames.size() && i < max_frames; ++i) {
    if (i > 0) out += " <- ";
    append_frame(out, frames[i]);
  }
  if (frames.size() > max_frames) out += " <- ...";
  return out;
}

std::string thread_dump(const std::vector<ThreadStack>& threads, long loop_thread,
                        std::size_t max_frames) {
  std::string out;
  for (const auto& t : threads) {
    out += "  thread " + std::to_string(t.thread);
    if (t.thread == loop_thread) out += " (the event loop)";
    out += ", innermost frame first:\n";
    if (t.frames.empty()) out += "    <no Python frame>\n";
    for (std::size_t i = 0; i < t.frames.size() && i < max_frames; ++i) {
      out += "    ";
      append_frame(out, t.frames[i]);
      out += "\n";
    }
    if (t.frames.size() > max_frames) out += "    ...\n";
  }
  return out;
}

}  // namespace loopguard
