#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "loopguard/frame_filter.h"

namespace loopguard {
namespace {

// ---- normalize_path: what os.path.normpath gives on POSIX ------------------------------------

TEST(NormalizePath, LikeOsPathNormpath) {
  EXPECT_EQ(normalize_path("/srv/gr/../venv/bin/loopguard"), "/srv/venv/bin/loopguard");
  EXPECT_EQ(normalize_path("/srv/./app//main.py"), "/srv/app/main.py");
  EXPECT_EQ(normalize_path("/srv/app/"), "/srv/app");
  EXPECT_EQ(normalize_path("/../a"), "/a");  // nothing above the root
  EXPECT_EQ(normalize_path("a/../../b"), "../b");
  EXPECT_EQ(normalize_path("../../x"), "../../x");
  EXPECT_EQ(normalize_path("a/.."), ".");
  EXPECT_EQ(normalize_path(""), ".");
  EXPECT_EQ(normalize_path("//net/share"), "//net/share");  // POSIX keeps two leading slashes
  EXPECT_EQ(normalize_path("///srv"), "/srv");
  EXPECT_EQ(normalize_path("/"), "/");
}

TEST(NormalizePath, GeneratedNamesStayAsTheyAre) {
  EXPECT_EQ(normalize_path("<frozen importlib._bootstrap>"), "<frozen importlib._bootstrap>");
  EXPECT_EQ(normalize_path("<string>"), "<string>");
}

// ---- roles ---------------------------------------------------------------------------------

// The layout of a venv on Debian with pyenv's Python, as guard.py describes it.
FrameFilterConfig VenvLayout() {
  FrameFilterConfig c;
  c.runtime_prefixes = {"/py/lib/python3.11/", "/venv/lib/python3.11/"};  // stdlib, platstdlib
  c.loop_prefixes = {"/py/lib/python3.11/asyncio/", "/venv/lib/python3.11/site-packages/uvloop/"};
  c.library_prefixes = {"/venv/lib/python3.11/site-packages/"};
  c.own_prefixes = {"/venv/lib/python3.11/site-packages/fastapi_loopguard/"};
  c.application_prefixes = {"/venv/lib/python3.11/site-packages/fastapi_loopguard/demo/"};
  c.launcher_prefixes = {"/venv/bin/"};
  c.loop_entry_functions = {"run", "Runner.run", "BaseEventLoop.run_forever",
                            "BaseEventLoop.run_until_complete"};
  c.main_script = "/venv/bin/loopguard";
  return c;
}

constexpr const char* kSite = "/venv/lib/python3.11/site-packages/";

TEST(FrameFilter, TheLongestPrefixDecides) {
  const FrameFilter f(VenvLayout());
  const std::string site = kSite;
  // site-packages sits inside the venv's platstdlib directory, and is library code all the same.
  EXPECT_EQ(f.role(site + "starlette/routing.py", "f"), FrameRole::kLibrary);
  EXPECT_EQ(f.role("/venv/lib/python3.11/os.py", "f"), FrameRole::kRuntime);
  EXPECT_EQ(f.role("/py/lib/python3.11/json/decoder.py", "f"), FrameRole::kRuntime);
  EXPECT_EQ(f.role("/py/lib/python3.11/asyncio/base_events.py", "f"), FrameRole::kLoop);
  EXPECT_EQ(f.role("/py/lib/python3.11/asyncio/tasks.py", "sleep"), FrameRole::kLoop);
  EXPECT_EQ(f.role(site + "uvloop/__init__.py", "run"), FrameRole::kLoopEntry);
  EXPECT_EQ(f.role("/py/lib/python3.11/asyncio/runners.py", "Runner.run"), FrameRole::kLoopEntry);
  // A function of that name elsewhere is nothing special.
  EXPECT_EQ(f.role("/srv/app/jobs.py", "Runner.run"), FrameRole::kApplication);
  EXPECT_EQ(f.role(site + "fastapi_loopguard/guard.py", "f"), FrameRole::kOwn);
  // The bundled demo is inside this package and is application code.
  EXPECT_EQ(f.role(site + "fastapi_loopguard/demo/app.py", "f"), FrameRole::kApplication);
  EXPECT_EQ(f.role("/srv/app/main.py", "f"), FrameRole::kApplication);  // under no prefix
  EXPECT_EQ(f.role("<frozen importlib._bootstrap>", "_call"), FrameRole::kRuntime);
  EXPECT_EQ(f.role("", "f"), FrameRole::kRuntime);
}

TEST(FrameFilter, PrefixesMatchWholeDirectories) {
  const FrameFilter f(VenvLayout());
  // "/venv/bin/" is not a prefix of "/venv/binaries/...": prefixes end at a directory.
  EXPECT_EQ(f.role("/venv/binaries/tool.py", "f"), FrameRole::kApplication);
  FrameFilterConfig unslashed;
  unslashed.library_prefixes = {"/opt/lib"};  // given without its trailing slash
  const FrameFilter g(unslashed);
  EXPECT_EQ(g.role("/opt/lib/x.py", "f"), FrameRole::kLibrary);
  EXPECT_EQ(g.role("/opt/library/x.py", "f"), FrameRole::kApplication);
}

// A console script and the main script's module body are the launcher; the main script's own
// functions are the user's code (`python app.py` with the handlers in app.py).
TEST(FrameFilter, TheEntryPointIsTheLauncher) {
  const FrameFilter f(VenvLayout());
  EXPECT_EQ(f.role("/venv/bin/loopguard", "<module>"), FrameRole::kLauncher);
  EXPECT_EQ(f.role("/venv/bin/datasette", "<module>"), FrameRole::kLauncher);
  FrameFilterConfig script = VenvLayout();
  script.main_script = "/srv/app/serve.py";
  const FrameFilter g(script);
  EXPECT_EQ(g.role("/srv/app/serve.py", "<module>"), FrameRole::kLauncher);
  EXPECT_EQ(g.role("/srv/app/serve.py", "handler"), FrameRole::kApplication);
  EXPECT_EQ(g.role("/srv/app/other.py", "<module>"), FrameRole::kApplication);  // an import
}

TEST(FrameFilter, TheMainScriptIsComparedNormalised) {
  FrameFilterConfig c = VenvLayout();
  c.launcher_prefixes.clear();
  c.main_script = "/srv/gr/../app/serve.py";
  const FrameFilter f(c);
  EXPECT_EQ(f.role("/srv/app/serve.py", "<module>"), FrameRole::kLauncher);
}

// ---- the culprit -------------------------------------------------------------------------------

FrameInfo F(const std::string& filename, const std::string& function, int line = 1) {
  return FrameInfo{filename, function, line};
}

// The loop thread of `loopguard run` (a console script) on asyncio, innermost frame first: the
// frames of the request's own code, the loop's machinery, and what started the loop.
std::vector<FrameInfo> LoopStack(std::vector<FrameInfo> inner) {
  const std::string site = kSite;
  std::vector<FrameInfo> frames = std::move(inner);
  for (const auto& outer : std::vector<FrameInfo>{
           F(site + "starlette/routing.py", "Route.handle"),
           F(site + "fastapi_loopguard/middleware.py", "LoopGuardMiddleware._tracked"),
           F(site + "uvicorn/protocols/http/httptools_impl.py", "RequestResponseCycle.run_asgi"),
           F("/py/lib/python3.11/asyncio/events.py", "Handle._run"),
           F("/py/lib/python3.11/asyncio/base_events.py", "BaseEventLoop._run_once"),
           F("/py/lib/python3.11/asyncio/base_events.py", "BaseEventLoop.run_until_complete"),
           F("/py/lib/python3.11/asyncio/runners.py", "Runner.run"),
           F(site + "uvicorn/server.py", "Server.run"),
           F(site + "uvicorn/main.py", "run"),
           F(site + "fastapi_loopguard/run.py", "run"),
           F(site + "fastapi_loopguard/cli.py", "main"),
           F("/venv/bin/loopguard", "<module>", 8),
       }) {
    frames.push_back(outer);
  }
  return frames;
}

TEST(FrameFilter, TheInnermostApplicationFrameIsTheCulprit) {
  const FrameFilter f(VenvLayout());
  const auto frames =
      LoopStack({F("/py/lib/python3.11/json/encoder.py", "iterencode"),
                 F("/srv/app/views.py", "render", 12), F("/srv/app/views.py", "endpoint", 30)});
  const Culprit c = f.culprit(frames);
  EXPECT_EQ(c.index, 1);
  EXPECT_FALSE(c.library);
}

// The Datasette case: no frame of the user's on the stack. The culprit is the innermost
// library frame, marked as such; never the console script's `sys.exit(main())` line.
TEST(FrameFilter, WithoutApplicationCodeTheInnermostLibraryFrameIsNamed) {
  const FrameFilter f(VenvLayout());
  const std::string site = kSite;
  const auto frames = LoopStack({F("/py/lib/python3.11/sqlite3/dbapi2.py", "convert"),
                                 F(site + "datasette/database.py", "execute_fn", 212),
                                 F(site + "datasette/views/table.py", "TableView.data")});
  const Culprit c = f.culprit(frames);
  EXPECT_EQ(c.index, 1);
  EXPECT_TRUE(c.library);
}

// Only the loop's and the launcher's frames: nothing to name. uvicorn's and our own frames
// outside the loop (they started it) are never the culprit either.
TEST(FrameFilter, OnlyLoopAndEntryPointFramesNameNothing) {
  const FrameFilter f(VenvLayout());
  std::vector<FrameInfo> frames = LoopStack({});
  frames.erase(frames.begin(), frames.begin() + 3);  // not even a request: the loop's own code
  const Culprit c = f.culprit(frames);
  EXPECT_EQ(c.index, -1);
  EXPECT_FALSE(c.library);
}

// Our own frames inside the loop (the middleware) are never named, library frames are.
TEST(FrameFilter, OwnCodeIsNeverNamed) {
  const FrameFilter f(VenvLayout());
  std::vector<FrameInfo> frames = LoopStack({});
  const Culprit c = f.culprit(frames);
  EXPECT_EQ(c.index, 0);  // starlette's Route.handle, not our middleware below it
  EXPECT_TRUE(c.library);
  std::vector<FrameInfo> own = {F(std::string(kSite) + "fastapi_loopguard/guard.py", "_step")};
  EXPECT_EQ(f.culprit(own).index, -1);
}

// A thread of the pool (a GIL holder) has no loop frames; its whole stack is considered.
TEST(FrameFilter, AStackWithoutTheLoopIsConsideredWhole) {
  const FrameFilter f(VenvLayout());
  const std::vector<FrameInfo> frames = {
      F("/srv/app/reports.py", "crunch", 7),
      F("/py/lib/python3.11/concurrent/futures/thread.py", "_WorkItem.run"),
      F("/py/lib/python3.11/threading.py", "Thread._bootstrap_inner"),
  };
  EXPECT_EQ(f.culprit(frames).index, 0);
}

// A suspended coroutine's stack (a cumulative event) ends in loop code that is no entry: the
// request's own frames outside it are still the culprit.
TEST(FrameFilter, LoopCodeInsideTheRequestIsNoBoundary) {
  const FrameFilter f(VenvLayout());
  const std::string site = kSite;
  const std::vector<FrameInfo> frames = {
      F("/py/lib/python3.11/asyncio/tasks.py", "sleep"),
      F("/srv/app/views.py", "cuts", 40),
      F(site + "starlette/routing.py", "Route.handle"),
  };
  EXPECT_EQ(f.culprit(frames).index, 1);
}

// uvloop's loop is native and leaves no frame; asyncio's runner (asyncio.run) still marks the
// boundary, and where it is missing too, the launcher's frames are still never named.
TEST(FrameFilter, WithoutLoopFramesTheLauncherIsStillNeverNamed) {
  const FrameFilter f(VenvLayout());
  const std::vector<FrameInfo> frames = {
      F("/py/lib/python3.11/time.py", "sleep_wrapper"),
      F("/venv/bin/loopguard", "<module>", 8),
  };
  EXPECT_EQ(f.culprit(frames).index, -1);
}

TEST(FrameFilter, ApplyNormalisesFileNamesAndPicksTheCulprit) {
  FrameFilter f(VenvLayout());
  std::vector<FrameInfo> frames = {
      F("/venv/lib/python3.11/site-packages/../site-packages/rich/console.py", "print"),
      F("/venv/bin/../bin/loopguard", "<module>", 8),
  };
  const Culprit c = f.apply(frames);
  EXPECT_EQ(frames[0].filename, "/venv/lib/python3.11/site-packages/rich/console.py");
  EXPECT_EQ(frames[1].filename, "/venv/bin/loopguard");
  EXPECT_EQ(c.index, 0);
  EXPECT_TRUE(c.library);
  // Seen again (from the cache): the same answer.
  std::vector<FrameInfo> again = {F("/venv/bin/../bin/loopguard", "<module>", 8)};
  EXPECT_EQ(f.apply(again).index, -1);
  EXPECT_EQ(again[0].filename, "/venv/bin/loopguard");
  EXPECT_EQ(f.normalized("/srv/a/../b.py"), "/srv/b.py");
}

// The cache stays bounded however many files are seen, and answers stay right past its limit.
TEST(FrameFilter, CacheIsBounded) {
  FrameFilter f(VenvLayout());
  for (std::size_t i = 0; i < FrameFilter::kCacheLimit * 2 + 3; ++i) {
    std::vector<FrameInfo> frames = {F("/srv/app/m" + std::to_string(i) + ".py", "f")};
    ASSERT_EQ(f.apply(frames).index, 0);
  }
  std::vector<FrameInfo> frames = {F("/venv/bin/./loopguard", "<module>")};
  EXPECT_EQ(f.apply(frames).index, -1);
}

}  // namespace
}  // namespace loopguard
