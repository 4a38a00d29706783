// Waits on the GIL or a lock that another thread holds, and who holds it.
#include <gtest/gtest.h>
#include <sys/syscall.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "engine_test.h"
#include "loopguard/engine.h"

namespace loopguard {
namespace {

#ifdef SYS_futex
constexpr std::uint64_t kGilAddress = 0x7f0012345678;

OsState FutexWait(std::uint64_t address) {
  OsState st = InSyscall(SYS_futex);
  st.arg0 = address;
  return st;
}

// The loop waits on the GIL's futex: the culprit is the thread holding the GIL. The engine looks
// for a running thread other than the loop, the watchdog and the sampler, and samples that one
// (a sync endpoint in the threadpool carries its own request's Context).
TEST_F(EngineTest, GilWaitSamplesTheThreadHoldingIt) {
  os_->state = FutexWait(kGilAddress);
  os_->loop_tid = 4242;
  os_->running = {4242, 4343, 5151, 6161};  // the loop and the sampler come first: excluded
  py_->sampler_tid = 4343;
  py_->gil_futexes = {kGilAddress};
  const std::uint64_t loop_request = engine_->begin_request("GET /async");
  const std::uint64_t sync_request = engine_->begin_request("GET /sync");
  py_->token = loop_request;
  py_->thread_succeed = true;
  py_->thread_token = sync_request;
  py_->thread_frames = HandlerStack("sync_handler", 9);
  py_->thread_culprit = 1;
  Stall(65 * kMs);
  EXPECT_EQ(py_->calls, 0);  // the loop thread itself is not sampled
  EXPECT_EQ(py_->thread_calls, 3);
  EXPECT_EQ(py_->last_thread, 5151);
  EXPECT_EQ(py_->last_timeout, 20 * kMs);
  EXPECT_EQ(os_->running_calls, 3);
  const auto& ex = os_->last_exclude;
  EXPECT_NE(std::find(ex.begin(), ex.end(), 4242L), ex.end());  // the loop thread
  EXPECT_NE(std::find(ex.begin(), ex.end(), 4343L), ex.end());  // the sampler's own thread
  EXPECT_EQ(engine_->stats().stack_timeouts, 0u);
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
  EXPECT_EQ(events[0].token, sync_request);
  EXPECT_EQ(events[0].stack, HandlerStack("sync_handler", 9));
  EXPECT_EQ(events[0].culprit, 1);
  EXPECT_FALSE(events[0].stack_missing);
  EXPECT_EQ(events[0].victims, 1u);
  EXPECT_EQ(engine_->request_counters(sync_request).count, 1u);
  EXPECT_EQ(engine_->request_counters(loop_request).count, 0u);

  // No other thread running: the loop thread's own sample, still a GIL wait.
  os_->running = {4242, 4343};
  Advance(1 * kMs);
  Stall(65 * kMs);
  EXPECT_EQ(py_->thread_calls, 3);
  EXPECT_EQ(py_->calls, 3);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
  EXPECT_EQ(events[0].token, loop_request);
  EXPECT_EQ(events[0].stack, HandlerStack("handler", 42));
}

// A futex the sampler never saw it wait on is an ordinary lock (threading.Lock, queue.get): the
// loop thread is sampled and no other thread is looked for.
TEST_F(EngineTest, UnknownFutexIsLock) {
  os_->state = FutexWait(0xbad0);
  os_->loop_tid = 4242;
  os_->running = {5151};
  py_->gil_futexes = {kGilAddress};
  py_->thread_succeed = true;
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  Stall(65 * kMs);
  EXPECT_EQ(py_->calls, 3);
  EXPECT_EQ(py_->thread_calls, 0);
  EXPECT_EQ(os_->running_calls, 0);
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kLock);
  EXPECT_EQ(events[0].token, token);
  EXPECT_EQ(events[0].stack, HandlerStack("handler", 42));
}

// The loop waits for the GIL another thread holds: the loop's own frames cannot move, but the
// holder's can, so only the loop's stack is read without the GIL.
TEST_F(EngineTest, HangReportWaitingForTheGilReadsOnlyTheLoopsStack) {
  HangPipe pipe;
  ASSERT_TRUE(pipe.ok());
  WatchdogConfig config;
  config.hang_threshold = 60 * kMs;
  config.hang_fd = pipe.write_fd();
  Make(config);
  os_->state = FutexWait(kGilAddress);
  py_->gil_futexes = {kGilAddress};
  py_->succeed = false;
  py_->unlocked_frames = HandlerStack("waits", 5);
  py_->unlocked_culprit = 1;
  ThreadStack worker;
  worker.thread = 5151;
  worker.frames = {{"app/jobs.py", "crunch", 30}};
  worker.culprit = 0;
  py_->others = {worker};
  Stall(61 * kMs);
  const std::string got = pipe.Read();
  EXPECT_NE(got.find("kind=gil; culprit=app/routes.py:5 in waits (read without the GIL)"),
            std::string::npos)
      << got;
  EXPECT_EQ(got.find("thread 5151"), std::string::npos) << got;
  EXPECT_EQ(py_->unlocked_calls, 1);
  EXPECT_FALSE(py_->unlocked_others_asked);
}

// A lock wait (a futex that is not the GIL's): the other threads are read in the same capture,
// and the event names the one running the user's code as the likely holder, not the idle pool
// worker beside it. Two threads running the user's code: nobody is named.
TEST_F(EngineTest, LockWaitNamesTheLikelyHolder) {
  os_->state = FutexWait(0xbad0);
  py_->gil_futexes = {kGilAddress};
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  ThreadStack idle;
  idle.thread = 6161;
  idle.frames = {{"/venv/site-packages/anyio/_backends/_asyncio.py", "run", 900}};
  idle.culprit = 0;
  idle.culprit_is_library = true;
  ThreadStack holder;
  holder.thread = 5151;
  holder.frames = {{"/usr/lib/python3/time.py", "sleep", 1}, {"app/jobs.py", "hold_lock", 30}};
  holder.culprit = 1;
  py_->others = {idle, holder};
  Stall(65 * kMs);
  EXPECT_EQ(py_->all_calls, 3);
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kLock);
  EXPECT_EQ(events[0].stack, HandlerStack("handler", 42));  // the loop's own line stays the culprit
  EXPECT_EQ(events[0].holder.thread, 5151);
  EXPECT_EQ(events[0].holder.frames, holder.frames);
  EXPECT_EQ(events[0].holder.culprit, 1);

  // The holder let go before the last sample (it is back in its pool): its line while it held
  // the lock is still the one named.
  ThreadStack back_in_pool = idle;
  back_in_pool.thread = 5151;
  py_->during = [this, back_in_pool] {
    if (py_->all_calls == 3) py_->others = {back_in_pool};
  };
  py_->others = {idle, holder};
  Advance(1 * kMs);
  Stall(65 * kMs);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].holder.thread, 5151);
  EXPECT_EQ(events[0].holder.frames, holder.frames);
  py_->during = nullptr;

  ThreadStack second = holder;
  second.thread = 7171;
  py_->others = {idle, holder, second};
  Advance(1 * kMs);
  Stall(65 * kMs);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].holder.thread, 0);
}

// On a futex and nobody gets the GIL in time: the loop waits for the GIL while another thread
// holds it, whether or not the address was known.
TEST_F(EngineTest, FutexWithSamplerFailingIsGil) {
  os_->state = FutexWait(0xbad0);  // unknown address: would be a lock
  py_->succeed = false;
  engine_->begin_request();
  Stall(65 * kMs);
  EXPECT_EQ(py_->thread_calls, 0);
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
  EXPECT_TRUE(events[0].stack_missing);

  // The GIL's own futex, and the holder cannot be sampled either.
  os_->state = FutexWait(kGilAddress);
  os_->running = {5151};
  py_->gil_futexes = {kGilAddress};
  Advance(1 * kMs);
  Stall(65 * kMs);
  EXPECT_EQ(py_->thread_calls, 3);
  EXPECT_EQ(py_->calls, 6);  // fell back to the loop thread each time
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
  EXPECT_TRUE(events[0].stack_missing);
  EXPECT_EQ(engine_->stats().stack_timeouts, 6u);
}

// The loop waits on the GIL while a sampler of ours holds it (another guard's, on a busy host):
// that is our own capture, starved of CPU, and no event of the app's. Both ways of telling a GIL
// wait: its known futex, and, before the GIL's address is learned, any futex with no GIL to be
// had in time.
TEST_F(EngineTest, GilHeldByOurOwnSamplerIsNoEvent) {
  os_->loop_tid = 4242;
  os_->running = {5151};
  py_->succeed = false;
  py_->sampler_has_gil = true;
  os_->cpu = 5 * kMs;  // the loop thread's CPU clock stands still: it waits
  engine_->begin_request();
  for (const bool known : {true, false}) {
    py_->gil_futexes.clear();
    if (known) py_->gil_futexes = {kGilAddress};
    os_->state = FutexWait(known ? kGilAddress : 0xbad0);
    Advance(1 * kMs);
    Stall(65 * kMs);
    EXPECT_TRUE(engine_->drain().empty());
  }
  EXPECT_EQ(py_->thread_calls, 0);  // no other thread is blamed either
  EXPECT_EQ(engine_->stats().saturated, 130 * kMs);
}

// A loop waiting for the GIL on a busy host: each of its wake-ups to ask for the GIL queues for
// a CPU, so its run delay grows faster than half the time, yet it sleeps on the GIL's futex at
// every sample. The thread holding the GIL is the culprit, not the host.
TEST_F(EngineTest, GilWaitOnABusyHostIsStillGil) {
  os_->state = FutexWait(kGilAddress);
  py_->gil_futexes = {kGilAddress};
  py_->succeed = false;
  engine_->begin_request();
  Nanos delay = 0;
  os_->state.run_delay = delay;
  LoopBusy();
  Step();
  for (int i = 0; i < 30; ++i) {  // 300 ms, 8 of every 10 ms queued for a CPU
    Advance(10 * kMs);
    delay += 8 * kMs;
    os_->state.run_delay = delay;
    Step();
  }
  LoopWaits();
  Step();
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
  EXPECT_EQ(engine_->stats().saturated, 0);
}

// Outside any request, the loop waits for a pthread mutex with only its own frames on the stack;
// the probe reads the mutex's owner, which is sampled as the GIL's holder would be and names the
// stall (Datasette: a SQL thread's query holds the connection a cursor freed on the loop needs).
TEST_F(EngineTest, ALockWaitWithNothingToNameSamplesTheMutexOwner) {
  os_->state = FutexWait(0xbad0);
  os_->lock_owner = 6161;
  py_->gil_futexes = {kGilAddress};
  py_->frames = {{"/usr/lib/python3/asyncio/base_events.py", "BaseEventLoop._run_once", 1907}};
  py_->culprit = -1;
  py_->task = "(callback)";
  py_->thread_succeed = true;
  py_->thread_frames = HandlerStack("execute_fn", 212);
  py_->thread_culprit = 1;
  engine_->begin_request();  // in flight, but the loop runs no request's code
  Stall(65 * kMs);
  EXPECT_EQ(py_->last_thread, 6161);
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kLock);
  EXPECT_EQ(events[0].token, 0u);  // the owner's Context: a plain pool thread carries none
  EXPECT_EQ(events[0].stack, HandlerStack("execute_fn", 212));
  EXPECT_EQ(events[0].task, "");  // the owner's code, not the loop's callback
  // The holder fields say whose stack that is.
  EXPECT_EQ(events[0].holder.thread, 6161);
  EXPECT_EQ(events[0].holder.frames, HandlerStack("execute_fn", 212));
  EXPECT_EQ(events[0].holder.culprit, 1);

  // The loop's own code waits on the lock: that line is the culprit, the owner is not looked at.
  const std::uint64_t token = engine_->begin_request();
  py_->token = token;
  py_->frames = HandlerStack("handler", 42);
  py_->culprit = 1;
  py_->thread_calls = 0;
  Advance(1 * kMs);
  Stall(65 * kMs);
  EXPECT_EQ(py_->thread_calls, 0);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, token);
  EXPECT_EQ(events[0].stack, HandlerStack("handler", 42));
  EXPECT_EQ(events[0].task, "");  // inside a request the request names the work, not its task
}

// A worker task created during lifespan startup (Gradio's queue workers) carries the startup's
// token in its Context long after startup ended. Its blocks are outside any request: the event
// names no request, and names the task instead. While the request is in flight the same sample
// is the request's.
TEST_F(EngineTest, ATokenWhoseRequestEndedNamesTheTaskInstead) {
  const std::uint64_t startup = engine_->begin_request("lifespan.startup");
  py_->token = startup;
  py_->frames = HandlerStack("worker", 7);
  py_->culprit = 1;
  py_->task = "queue-worker (worker)";
  Stall(65 * kMs);
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, startup);
  EXPECT_EQ(events[0].task, "");
  EXPECT_EQ(events[0].origin, 0u);  // a request's own block has no origin: it is the request

  engine_->end_request(startup);
  Advance(1 * kMs);
  Stall(65 * kMs);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, 0u);
  EXPECT_EQ(events[0].task, "queue-worker (worker)");
  EXPECT_EQ(events[0].stack, HandlerStack("worker", 7));
  EXPECT_EQ(events[0].origin, startup);  // who created the task: the Context it inherited

  // A request that ends during the stall (its block, then its response) is still its culprit,
  // even for samples taken after its end.
  const std::uint64_t request = engine_->begin_request("GET /block");
  py_->token = request;
  Advance(1 * kMs);
  LoopBusy();
  Step();
  Advance(55 * kMs);
  Step();
  engine_->end_request(request);
  Advance(10 * kMs);
  Step();
  LoopWaits();
  Step();
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].token, request);
  EXPECT_EQ(events[0].task, "");
}

// The loop waits for the GIL while another thread is inside a collection (a threadpool thread's
// allocations, or a TestClient's test thread, started it): the collector holds the GIL from start
// to end, so that is a gc wait naming the collecting thread, not a GIL holder to sample. The same
// wait once the collection is over is a GIL wait again.
TEST_F(EngineTest, AGilWaitDuringAnotherThreadsCollectionIsGc) {
  os_->state = FutexWait(kGilAddress);
  os_->loop_tid = 4242;
  os_->running = {4242, 5151};
  py_->gil_futexes = {kGilAddress};
  py_->token = engine_->begin_request("GET /victim");
  engine_->gc_elsewhere_begin(5151);
  Stall(65 * kMs);
  EXPECT_EQ(py_->thread_calls, 0);  // no GIL holder's Python to sample: it is collecting
  std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGc);
  EXPECT_EQ(events[0].holder.thread, 5151);
  EXPECT_TRUE(events[0].holder.frames.empty());

  // The sampler cannot get the GIL either: still the collection's.
  py_->succeed = false;
  Advance(1 * kMs);
  Stall(65 * kMs);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGc);
  EXPECT_TRUE(events[0].stack_missing);

  // A wait on a futex not known to be the GIL's, the collection starting while the sampler
  // waits for the GIL it holds: a gc wait too.
  engine_->gc_elsewhere_end();
  os_->state = FutexWait(0xbad0);
  py_->gil_futexes = {};
  py_->during = [this] { engine_->gc_elsewhere_begin(5151); };
  Advance(1 * kMs);
  Stall(65 * kMs);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGc);
  EXPECT_EQ(events[0].holder.thread, 5151);

  // Collection over: the holder of the GIL is sampled as before.
  py_->during = nullptr;
  engine_->gc_elsewhere_end();
  os_->state = FutexWait(kGilAddress);
  py_->gil_futexes = {kGilAddress};
  py_->succeed = true;
  py_->thread_succeed = true;
  py_->thread_frames = HandlerStack("sync_handler", 9);
  py_->thread_culprit = 1;
  Advance(1 * kMs);
  Stall(65 * kMs);
  events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kGil);
  EXPECT_EQ(events[0].holder.thread, 0);
}

// The GIL's address is known and the loop waits on another futex, while other threads keep the
// GIL so busy that the sampler is late: still a lock. Datasette: a cursor freed on the loop
// thread waits in sqlite3_reset for the connection's mutex, which a SQL thread holds while it
// runs the next query (and takes the GIL back for every row and progress callback).
TEST_F(EngineTest, KnownGilAndAnotherFutexIsALockEvenWhenTheSamplerIsLate) {
  os_->state = FutexWait(0xbad0);
  os_->running = {5151};
  py_->gil_futexes = {kGilAddress};
  py_->succeed = false;
  engine_->begin_request();
  Stall(65 * kMs);
  EXPECT_EQ(py_->thread_calls, 0);  // no GIL holder to look at: the loop does not wait for it
  const std::vector<Event> events = engine_->drain();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, Kind::kLock);
  EXPECT_TRUE(events[0].stack_missing);
}
#endif  // SYS_futex

}  // namespace
}  // namespace loopguard
