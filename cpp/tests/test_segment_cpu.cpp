// split_stall and the CPU a stall's events were given: readings per run, the one before a single
// sample, the wall clock for a sleep, the CPU a starved run had, and the steps that bound a run.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "loopguard/event.h"
#include "loopguard/segment.h"
#include "segment_test.h"

namespace loopguard {
namespace {

// ---- CPU time ----------------------------------------------------------------------------------

// CPU share between the first and last sample of the run, applied to the whole event.
TEST(SplitStall, CpuFromRunReadings) {
  std::vector<Sample> samples{Make(At(50), 1, "a"), Make(At(60), 1, "a"), Make(At(70), 1, "a")};
  samples[0].cpu = 500 * kMs;
  samples[1].cpu = 505 * kMs;
  samples[2].cpu = 510 * kMs;  // 10 ms of CPU in 20 ms: half
  const StallResult r = split_stall(samples, Input(kT0, At(100)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].cpu, 50 * kMs);
}

// A single-sample run uses the pre-detection CPU reading of the stall.
TEST(SplitStall, CpuFromPreReadingForSingleSample) {
  std::vector<Sample> samples{Make(At(50), 1, "spin", 10, Kind::kCpu)};
  samples[0].cpu = 240 * kMs;
  StallInput in = Input(kT0, At(80));
  in.pre_t = At(10);
  in.pre_cpu = 220 * kMs;  // 20 ms of CPU in 40 ms
  const StallResult r = split_stall(samples, in);
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].cpu, 40 * kMs);
}

// Outside requests the task plays the request's part: two tasks running the same function back to
// back are two events, each naming its task.
TEST(SplitStall, TwoTasksAreTwoEventsOutsideRequests) {
  std::vector<Sample> samples;
  for (int i = 0; i < 8; ++i) {
    Sample s = Make(At(50 + 10 * i), 0, "handle_job");
    s.task = i < 4 ? "queue-worker-1 (worker)" : "queue-worker-2 (worker)";
    samples.push_back(s);
  }
  const StallResult r = split_stall(samples, Input(kT0, At(150)));
  ASSERT_EQ(r.events.size(), 2u);
  EXPECT_EQ(r.events[0].task, "queue-worker-1 (worker)");
  EXPECT_EQ(r.events[1].task, "queue-worker-2 (worker)");
}

// A short request descheduled under CPU contention: 60 ms on the loop, 1 ms of it on a CPU. Not a
// 60 ms CPU hog: no event, and the time is saturation.
TEST(SplitStall, MostlyWaitingForACpuIsNoEvent) {
  std::vector<Sample> samples{Make(At(50), 1, "handler", 10, Kind::kCpu),
                              Make(At(52), 1, "handler", 10, Kind::kCpu)};
  samples[0].cpu = 100 * kMs;
  samples[1].cpu = 100 * kMs;
  StallInput in = Input(kT0, At(60));
  in.pre_t = At(5);
  in.pre_cpu = 99 * kMs;
  const StallResult r = split_stall(samples, in);
  EXPECT_TRUE(r.events.empty());
  EXPECT_EQ(r.saturated, 60 * kMs);
}

// A real CPU burn on a busy host: its samples say starved (the run queue grew), but the thread
// still spent more than a threshold on the CPU. That is the code's CPU work: kind cpu.
TEST(SplitStall, StarvedRunWithAThresholdOfCpuIsCpu) {
  std::vector<Sample> samples{Make(At(50), 1, "burn", 10, Kind::kStarved),
                              Make(At(100), 1, "burn", 10, Kind::kStarved)};
  samples[0].cpu = 130 * kMs;
  samples[1].cpu = 160 * kMs;  // 30 of 50 ms on a CPU
  StallInput in = Input(kT0, At(150));
  in.pre_t = kT0;
  in.pre_cpu = 100 * kMs;
  const StallResult r = split_stall(samples, in);
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].kind, Kind::kCpu);
  EXPECT_GE(r.events[0].cpu, 50 * kMs);
}

// The same on a busy host while native code held the GIL (the sampler could not get it): native.
TEST(SplitStall, StarvedRunWithoutTheGilIsNative) {
  std::vector<Sample> samples{Make(At(50), 1, "match", 10, Kind::kStarved),
                              Make(At(100), 1, "match", 10, Kind::kStarved)};
  for (auto& s : samples) s.no_gil = true;
  samples[0].cpu = 130 * kMs;
  samples[1].cpu = 160 * kMs;
  StallInput in = Input(kT0, At(150));
  in.pre_t = kT0;
  in.pre_cpu = 100 * kMs;
  const StallResult r = split_stall(samples, in);
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].kind, Kind::kNative);
}

// The same wait on a sleep is the request's event: a sleep uses no CPU by nature.
TEST(SplitStall, ASleepIsJudgedByWallTime) {
  std::vector<Sample> samples{Make(At(50), 1, "handler", 10, Kind::kSleep),
                              Make(At(52), 1, "handler", 10, Kind::kSleep)};
  samples[0].cpu = 100 * kMs;
  samples[1].cpu = 100 * kMs;
  const StallResult r = split_stall(samples, Input(kT0, At(60)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].kind, Kind::kSleep);
}

// A later single-sample run uses the reading of the sample before it.
TEST(SplitStall, CpuFromPreviousSampleForLaterSingleSampleRun) {
  std::vector<Sample> samples{Make(At(50), 1, "a"), Make(At(60), 1, "a"),
                              Make(At(70), 2, "spin", 10, Kind::kCpu)};
  samples[0].cpu = 0;
  samples[1].cpu = 0;
  samples[2].cpu = 10 * kMs;  // all of 60..70 on CPU
  const StallResult r = split_stall(samples, Input(kT0, At(140)));
  ASSERT_EQ(r.events.size(), 2u);
  EXPECT_EQ(r.events[0].cpu, 0);  // sleeping
  EXPECT_EQ(r.events[1].duration, 75 * kMs);
  EXPECT_EQ(r.events[1].cpu, 75 * kMs);
}

// Without any CPU readings the kind decides: a CPU run is all CPU, anything else none.
TEST(SplitStall, CpuFallsBackToKind) {
  const StallResult cpu =
      split_stall({Make(At(50), 1, "spin", 10, Kind::kCpu)}, Input(kT0, At(60)));
  ASSERT_EQ(cpu.events.size(), 1u);
  EXPECT_EQ(cpu.events[0].cpu, 60 * kMs);
  const StallResult sleep = split_stall({Make(At(50), 1, "nap")}, Input(kT0, At(60)));
  ASSERT_EQ(sleep.events.size(), 1u);
  EXPECT_EQ(sleep.events[0].cpu, 0);
}

// Readings are clamped to [0, 1] of wall time: a CPU clock can't exceed one core for one thread.
TEST(SplitStall, CpuRatioClamped) {
  std::vector<Sample> samples{Make(At(50), 1, "a"), Make(At(60), 1, "a")};
  samples[0].cpu = 0;
  samples[1].cpu = 30 * kMs;  // "30 ms of CPU in 10 ms"
  const StallResult r = split_stall(samples, Input(kT0, At(70)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].cpu, 70 * kMs);
}

// A saturated loop: detection at +50 ms and its confirmation at +52 ms both caught request 7,
// which began at +48 ms (descheduled in between); then request 8. Request 7 cannot have held the
// loop before it began, so its run starts at +48: 8 ms, no event. The 48 ms before were other,
// unsampled work: saturation.
TEST(SplitStall, ARunStartsNoEarlierThanItsRequestBegan) {
  std::vector<Sample> samples = {Make(At(50), 7, "short"), Make(At(52), 7, "short"),
                                 Make(At(60), 8, "other"), Make(At(70), 8, "other")};
  samples[0].began = samples[1].began = At(48);
  samples[2].began = samples[3].began = At(-100);  // began long before the stall: no bound
  const StallResult r = split_stall(samples, Input(At(0), At(120)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].token, 8u);
  EXPECT_EQ(r.events[0].start, At(56));
  EXPECT_EQ(r.saturated, 56 * kMs);  // +0 to +48 before request 7, and its own 8 ms

  // The same request, blocking from the moment it began: the event starts there.
  std::vector<Sample> one = {Make(At(50), 7, "slow"), Make(At(52), 7, "slow")};
  one[0].began = one[1].began = At(3);
  const StallResult o = split_stall(one, Input(At(0), At(150)));
  ASSERT_EQ(o.events.size(), 1u);
  EXPECT_EQ(o.events[0].start, At(3));
  EXPECT_EQ(o.events[0].duration, 147 * kMs);
  EXPECT_EQ(o.saturated, 3 * kMs);
}

// A loop saturated by short requests, 52 ms busy: the one sample (at detection, +50 ms) caught
// request 7's coroutine in a step that began at +49.5 ms and ended at +51 ms. Request 7 held the
// loop for 1.5 ms of it, no more: the rest was other, unsampled work, and nothing is an event.
TEST(SplitStall, ARunIsBoundedByTheStepItsSamplesWereReadIn) {
  const std::vector<Sample> samples = {Make(At(50), 7, "short", 10, Kind::kCpu)};
  StallInput in = Input(At(0), At(52));
  in.stack_timeout = 20 * kMs;
  in.steps = {{7, At(49) + kMs / 2, At(51)}, {8, At(10), At(11)}};
  const StallResult r = split_stall(samples, in);
  EXPECT_TRUE(r.events.empty());
  EXPECT_EQ(r.saturated, 52 * kMs);

  // The same sample in a step that held the loop from +1 ms on: an event from there to the
  // step's end; the loop's own work before and after it is saturation.
  in.steps = {{7, At(1), At(51)}};
  const StallResult held = split_stall(samples, in);
  ASSERT_EQ(held.events.size(), 1u);
  EXPECT_EQ(held.events[0].start, At(1));
  EXPECT_EQ(held.events[0].duration, 50 * kMs);
  EXPECT_EQ(held.saturated, 2 * kMs);

  // The stack is read once the sampler has the GIL, up to stack_timeout after the sample's
  // time: a step that began just after it still holds the sample.
  in.steps = {{7, At(50) + kMs, At(51)}};
  EXPECT_TRUE(split_stall(samples, in).events.empty());
}

// A sample of request 7 in none of its steps: a task the request started (it shares the
// request's token) blocked, and the request's own steps say nothing about it. The run keeps its
// usual reach. So does a GIL holder's sample: that stack is another thread's.
TEST(SplitStall, ASampleOutsideItsRequestsStepsIsNotBounded) {
  const std::vector<Sample> samples = {Make(At(50), 7, "child"), Make(At(52), 7, "child")};
  StallInput in = Input(At(0), At(120));
  in.stack_timeout = 20 * kMs;
  in.steps = {{7, At(1), At(3)}};
  const StallResult r = split_stall(samples, in);
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].start, At(0));
  EXPECT_EQ(r.events[0].duration, 120 * kMs);

  std::vector<Sample> held = samples;
  for (Sample& s : held) s.thread = 4242;
  in.steps = {{7, At(49), At(53)}};
  const StallResult t = split_stall(held, in);
  ASSERT_EQ(t.events.size(), 1u);
  EXPECT_EQ(t.events[0].duration, 120 * kMs);
}

}  // namespace
}  // namespace loopguard
