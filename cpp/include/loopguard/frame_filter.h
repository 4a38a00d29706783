// Which frame of a sampled stack is the culprit: the one rule, used by the sampler at capture and
// by the Python side for a suspended coroutine's stack (a cumulative event). No CPython in here.
//
// Every frame has a role, decided by the longest configured directory prefix its (normalised)
// file name starts with, so nested directories sort themselves out: site-packages inside the
// venv's stdlib directory is library code, the bundled demo inside this package is application
// code. A file under no prefix is the user's. Then:
//   - the culprit is the innermost application frame;
//   - failing that, the innermost library frame, marked as library code: the stack holds no line
//     of the user's, and the library call is the most specific thing there is to name;
//   - CPython's own code, the event loop's and this package's are never named, and neither is
//     the entry point: console scripts, the main script's module body, and every frame outside
//     the event loop. The outermost frame of a function that runs the loop (asyncio.run,
//     run_until_complete, uvloop.run) marks the boundary: whatever called it only waits for the
//     loop to return, so it is on every stack of the loop thread and never where the loop
//     blocked. Other loop code (asyncio.sleep, wait_for) may sit anywhere in a stack and is
//     merely never named.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "loopguard/event.h"

namespace loopguard {

enum class FrameRole : std::uint8_t {
  kApplication,  // the user's code
  kLibrary,      // third-party code: site-packages, dist-packages, the user site
  kRuntime,      // CPython's standard library, <frozen ...> and other generated code
  kLoop,         // the event loop's own code (asyncio, uvloop): runtime
  kLoopEntry,    // a function of the loop's code that runs the loop: the boundary above
  kOwn,          // this package
  kLauncher,     // how the process was started: console scripts, the main script's module body
};

struct FrameFilterConfig {
  // Directories, each ending in '/'. A file's role is that of the longest prefix it starts with.
  std::vector<std::string> application_prefixes;
  std::vector<std::string> library_prefixes;
  std::vector<std::string> runtime_prefixes;
  std::vector<std::string> loop_prefixes;
  std::vector<std::string> own_prefixes;
  std::vector<std::string> launcher_prefixes;  // script directories (venv/bin): console scripts
  // Qualified names of the functions in loop_prefixes that run the loop ("Runner.run",
  // "BaseEventLoop.run_until_complete", ...).
  std::vector<std::string> loop_entry_functions;
  // The file __main__ was run from. Its module body (function "<module>") is the launcher: it
  // started the server and waits for it. Its functions are the user's code as usual.
  std::string main_script;
};

struct Culprit {
  int index = -1;        // into the frames, innermost first; -1: nothing to name
  bool library = false;  // no application frame: the innermost library frame was taken
};

// The path as os.path.normpath would write it on POSIX: "." and empty parts dropped, ".."
// resolved against the part before it. Purely lexical (no file system access, so it is cheap
// enough for the sampler): a symbolic link followed by ".." may resolve elsewhere on disk.
// Generated names such as "<frozen os>" are returned as they are.
std::string normalize_path(std::string_view path);

class FrameFilter {
 public:
  explicit FrameFilter(FrameFilterConfig config);

  // The role of a file (already normalised) and function.
  FrameRole role(std::string_view filename, std::string_view function) const;

  // The culprit of a stack, innermost frame first, with normalised file names.
  Culprit culprit(const std::vector<FrameInfo>& frames) const;

  // What the sampler calls for every stack it takes: normalises each frame's file name in place
  // and returns the culprit. File names are looked up in a bounded cache, so a frame costs one
  // hash lookup once its file has been seen. Safe to call from several threads.
  Culprit apply(std::vector<FrameInfo>& frames);

  // normalize_path through the same cache.
  std::string normalized(const std::string& path);

  static constexpr std::size_t kCacheLimit = 4096;  // distinct file names; cleared when full

 private:
  struct FileEntry {
    std::string normalized;
    FrameRole role;  // by prefix alone; the main script's module body is decided per frame
  };
  const FileEntry& lookup(const std::string& raw);  // mutex_ held
  FrameRole file_role(std::string_view filename) const;
  FrameRole frame_role(FrameRole file_role, std::string_view filename,
                       std::string_view function) const;

  FrameFilterConfig config_;
  std::mutex mutex_;
  std::unordered_map<std::string, FileEntry> cache_;
};

}  // namespace loopguard
