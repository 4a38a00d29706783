#include "loopguard/frame_filter.h"

#include <algorithm>
#include <utility>

namespace loopguard {

std::string normalize_path(std::string_view path) {
  if (path.empty()) return ".";
  if (path.front() == '<') return std::string(path);
  // POSIX keeps exactly two leading slashes (they may mean something to the system) and folds
  // three or more into one, as os.path.normpath does.
  std::size_t initial = 0;
  if (path.front() == '/') {
    initial = path.size() > 1 && path[1] == '/' && (path.size() == 2 || path[2] != '/') ? 2 : 1;
  }
  std::vector<std::string_view> parts;
  std::size_t pos = 0;
  while (pos <= path.size()) {
    std::size_t next = path.find('/', pos);
    if (next == std::string_view::npos) next = path.size();
    const std::string_view part = path.substr(pos, next - pos);
    pos = next + 1;
    if (part.empty() || part == ".") continue;
    if (part != ".." || (initial == 0 && parts.empty()) ||
        (!parts.empty() && parts.back() == "..")) {
      parts.push_back(part);
    } else if (!parts.empty()) {
      parts.pop_back();
    }
  }
  std::string out(initial, '/');
  for (std::size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) out += '/';
    out += parts[i];
  }
  return out.empty() ? "." : out;
}

namespace {

// A directory prefix, normalised like the file names it is compared with, ending in '/'.
void normalize_prefixes(std::vector<std::string>& prefixes) {
  for (auto& prefix : prefixes) {
    prefix = normalize_path(prefix);
    if (prefix.back() != '/') prefix += '/';
  }
}

bool starts_with(std::string_view text, std::string_view prefix) {
  return text.size() >= prefix.size() && text.compare(0, prefix.size(), prefix) == 0;
}

Culprit pick(const std::vector<FrameRole>& roles) {
  // Frames outside the outermost frame that runs the loop only wait for it to return.
  std::size_t end = roles.size();
  for (std::size_t i = roles.size(); i-- > 0;) {
    if (roles[i] == FrameRole::kLoopEntry) {
      end = i;
      break;
    }
  }
  Culprit out;
  for (std::size_t i = 0; i < end; ++i) {
    if (roles[i] == FrameRole::kApplication) {
      out.index = static_cast<int>(i);
      return out;
    }
    if (roles[i] == FrameRole::kLibrary && out.index < 0) out.index = static_cast<int>(i);
  }
  out.library = out.index >= 0;
  return out;
}

}  // namespace

FrameFilter::FrameFilter(FrameFilterConfig config) : config_(std::move(config)) {
  for (auto* prefixes :
       {&config_.application_prefixes, &config_.library_prefixes, &config_.runtime_prefixes,
        &config_.loop_prefixes, &config_.own_prefixes, &config_.launcher_prefixes}) {
    normalize_prefixes(*prefixes);
  }
  if (!config_.main_script.empty()) config_.main_script = normalize_path(config_.main_script);
}

FrameRole FrameFilter::file_role(std::string_view filename) const {
  if (filename.empty() || filename.front() == '<') return FrameRole::kRuntime;
  FrameRole role = FrameRole::kApplication;
  std::size_t longest = 0;
  const auto consider = [&](const std::vector<std::string>& prefixes, FrameRole r) {
    for (const auto& prefix : prefixes) {
      if (prefix.size() > longest && starts_with(filename, prefix)) {
        longest = prefix.size();
        role = r;
      }
    }
  };
  consider(config_.application_prefixes, FrameRole::kApplication);
  consider(config_.library_prefixes, FrameRole::kLibrary);
  consider(config_.runtime_prefixes, FrameRole::kRuntime);
  consider(config_.loop_prefixes, FrameRole::kLoop);
  consider(config_.own_prefixes, FrameRole::kOwn);
  consider(config_.launcher_prefixes, FrameRole::kLauncher);
  return role;
}

FrameRole FrameFilter::frame_role(FrameRole file_role, std::string_view filename,
                                  std::string_view function) const {
  if (function == "<module>" && !config_.main_script.empty() && filename == config_.main_script) {
    return FrameRole::kLauncher;
  }
  if (file_role == FrameRole::kLoop &&
      std::find(config_.loop_entry_functions.begin(), config_.loop_entry_functions.end(),
                function) != config_.loop_entry_functions.end()) {
    return FrameRole::kLoopEntry;
  }
  return file_role;
}

FrameRole FrameFilter::role(std::string_view filename, std::string_view function) const {
  return frame_role(file_role(filename), filename, function);
}

Culprit FrameFilter::culprit(const std::vector<FrameInfo>& frames) const {
  std::vector<FrameRole> roles;
  roles.reserve(frames.size());
  for (const auto& f : frames) roles.push_back(role(f.filename, f.function));
  return pick(roles);
}

const FrameFilter::FileEntry& FrameFilter::lookup(const std::string& raw) {
  auto it = cache_.find(raw);
  if (it != cache_.end()) return it->second;
  if (cache_.size() >= kCacheLimit) cache_.clear();  // bounded; refilled from what runs now
  std::string normalized = normalize_path(raw);
  const FrameRole role = file_role(normalized);
  return cache_.emplace(raw, FileEntry{std::move(normalized), role}).first->second;
}

Culprit FrameFilter::apply(std::vector<FrameInfo>& frames) {
  std::vector<FrameRole> roles;
  roles.reserve(frames.size());
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& f : frames) {
      const FileEntry& entry = lookup(f.filename);
      if (entry.normalized != f.filename) f.filename = entry.normalized;
      roles.push_back(frame_role(entry.role, f.filename, f.function));
    }
  }
  return pick(roles);
}

std::string FrameFilter::normalized(const std::string& path) {
  std::lock_guard<std::mutex> lock(mutex_);
  return lookup(path).normalized;
}

}  // namespace loopguard
