// split_stall: how one stall's samples become its events, a culprit's run each, with their victims
// and stacks; same_culprit, the key of a run.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "loopguard/event.h"
#include "loopguard/segment.h"
#include "segment_test.h"

namespace loopguard {
namespace {

// ---- same_culprit ------------------------------------------------------------------------------

TEST(SameCulprit, TokenAndFunctionMakeTheKey) {
  EXPECT_TRUE(same_culprit(Make(At(0), 1, "f", 10), Make(At(1), 1, "f", 99)));  // line may move
  EXPECT_FALSE(same_culprit(Make(At(0), 1, "f"), Make(At(1), 2, "f")));
  EXPECT_FALSE(same_culprit(Make(At(0), 1, "f"), Make(At(1), 1, "g")));
  Sample other_file = Make(At(1), 1, "f");
  other_file.frames[1].filename = "other.py";
  EXPECT_FALSE(same_culprit(Make(At(0), 1, "f"), other_file));
}

// Without a stack on one side (GIL not obtained in time) only the request can be compared.
TEST(SameCulprit, MissingStackComparesTokenOnly) {
  Sample no_stack;
  no_stack.token = 1;
  EXPECT_TRUE(same_culprit(Make(At(0), 1, "f"), no_stack));
  no_stack.token = 2;
  EXPECT_FALSE(same_culprit(Make(At(0), 1, "f"), no_stack));
}

// ---- split_stall -------------------------------------------------------------------------------

// One culprit for the whole stall: the event covers it from the moment the loop became busy (long
// before detection) to the moment it came back, not just the sampled part.
TEST(SplitStall, SingleRunExtendedToStartAndEnd) {
  const std::vector<Sample> samples{Make(At(50), 7, "handler"), Make(At(52), 7, "handler"),
                                    Make(At(62), 7, "handler"), Make(At(72), 7, "handler")};
  const StallResult r = split_stall(samples, Input(kT0, At(100)));
  ASSERT_EQ(r.events.size(), 1u);
  const Event& ev = r.events[0];
  EXPECT_EQ(ev.token, 7u);
  EXPECT_EQ(ev.start, kT0);
  EXPECT_EQ(ev.duration, 100 * kMs);
  EXPECT_EQ(ev.samples, 4u);
  EXPECT_EQ(ev.kind, Kind::kSleep);
  EXPECT_FALSE(ev.stack_missing);
  ASSERT_EQ(ev.stack.size(), 3u);
  EXPECT_EQ(ev.culprit, 1);
  EXPECT_EQ(ev.stack[1].function, "handler");
  EXPECT_EQ(r.saturated, 0);
}

// A single sample, when the stall ended before a second one, still counts as confirmed.
TEST(SplitStall, SingleSampleStallIsConfirmed) {
  const StallResult r = split_stall({Make(At(50), 3, "handler")}, Input(kT0, At(60)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].start, kT0);
  EXPECT_EQ(r.events[0].duration, 60 * kMs);
  EXPECT_EQ(r.events[0].token, 3u);
}

// Request A's block, then request B's: cut at the midpoint between the last A and first B sample,
// so each gets an honest duration and together they cover the whole stall.
TEST(SplitStall, TwoCulpritsSplitAtMidpoint) {
  std::vector<Sample> samples{Make(At(50), 1, "a"), Make(At(52), 1, "a"), Make(At(62), 1, "a"),
                              Make(At(72), 1, "a")};
  for (Nanos ms = 82; ms <= 142; ms += 10) samples.push_back(Make(At(ms), 2, "b", 20, Kind::kCpu));
  const StallResult r = split_stall(samples, Input(kT0, At(150)));
  ASSERT_EQ(r.events.size(), 2u);
  EXPECT_EQ(r.events[0].token, 1u);
  EXPECT_EQ(r.events[0].start, kT0);
  EXPECT_EQ(r.events[0].duration, 77 * kMs);  // to (72 + 82) / 2
  EXPECT_EQ(r.events[0].samples, 4u);
  EXPECT_EQ(r.events[0].kind, Kind::kSleep);
  EXPECT_EQ(r.events[1].token, 2u);
  EXPECT_EQ(r.events[1].start, At(77));
  EXPECT_EQ(r.events[1].duration, 73 * kMs);  // to the end of the stall
  EXPECT_EQ(r.events[1].samples, 7u);
  EXPECT_EQ(r.events[1].kind, Kind::kCpu);
  EXPECT_EQ(r.events[1].stack[1].function, "b");
  EXPECT_EQ(r.saturated, 0);
}

// A short run between or after long ones is not an event; its time is saturation.
TEST(SplitStall, ShortTrailingRunIsSaturation) {
  const std::vector<Sample> samples{Make(At(50), 1, "a"), Make(At(52), 1, "a"),
                                    Make(At(62), 2, "b")};
  const StallResult r = split_stall(samples, Input(kT0, At(70)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].token, 1u);
  EXPECT_EQ(r.events[0].duration, 57 * kMs);  // to (52 + 62) / 2
  EXPECT_EQ(r.saturated, 13 * kMs);           // 57 .. 70
}

// A loop saturated by many short callbacks: each sample shows another request. Nothing may be
// blamed, in particular the pre-detection time must not go to whichever callback the first sample
// happened to hit, and the whole stall is saturation.
TEST(SplitStall, SaturationYieldsNoEvents) {
  std::vector<Sample> samples;
  std::uint64_t token = 100;
  for (Nanos ms = 50; ms <= 190; ms += 10) samples.push_back(Make(At(ms), token++, "tiny"));
  const StallResult r = split_stall(samples, Input(kT0, At(200)));
  EXPECT_TRUE(r.events.empty());
  EXPECT_EQ(r.saturated, 200 * kMs);
}

// An unconfirmed first sample followed by a real culprit: the real one is reported from its own
// samples on; neither it nor the first callback inherits the pre-detection time.
TEST(SplitStall, UnconfirmedFirstSampleDoesNotReachBack) {
  std::vector<Sample> samples{Make(At(50), 1, "tiny")};
  for (Nanos ms = 52; ms <= 152; ms += 10) samples.push_back(Make(At(ms), 2, "slow"));
  const StallResult r = split_stall(samples, Input(kT0, At(160)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].token, 2u);
  EXPECT_EQ(r.events[0].start, At(51));
  EXPECT_EQ(r.events[0].duration, 109 * kMs);
  // 0..49 before the unconfirmed run, and its own 49..51.
  EXPECT_EQ(r.saturated, 51 * kMs);
}

// One request calling two different blocking functions gives two events, both for that request.
TEST(SplitStall, SameTokenDifferentFunctionSplits) {
  std::vector<Sample> samples{Make(At(50), 5, "load"), Make(At(52), 5, "load"),
                              Make(At(62), 5, "load")};
  for (Nanos ms = 72; ms <= 132; ms += 10) samples.push_back(Make(At(ms), 5, "render"));
  const StallResult r = split_stall(samples, Input(kT0, At(140)));
  ASSERT_EQ(r.events.size(), 2u);
  EXPECT_EQ(r.events[0].token, 5u);
  EXPECT_EQ(r.events[0].stack[1].function, "load");
  EXPECT_EQ(r.events[0].duration, 67 * kMs);
  EXPECT_EQ(r.events[1].token, 5u);
  EXPECT_EQ(r.events[1].stack[1].function, "render");
  EXPECT_EQ(r.events[1].duration, 73 * kMs);
}

// Samples of the loop back in epoll are not part of any run: they must neither split a run (their
// token is 0) nor be counted in it.
TEST(SplitStall, IdleSamplesIgnored) {
  const std::vector<Sample> samples{Make(At(50), 1, "a"), Idle(At(52)), Make(At(62), 1, "a")};
  const StallResult r = split_stall(samples, Input(kT0, At(70)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].samples, 2u);
  EXPECT_EQ(r.events[0].duration, 70 * kMs);
  EXPECT_EQ(r.events[0].start, kT0);
}

// Only idle samples: the loop was in fact waiting, so neither an event nor saturation.
TEST(SplitStall, OnlyIdleSamplesIsNothing) {
  const StallResult r = split_stall({Idle(At(50)), Idle(At(52))}, Input(kT0, At(60)));
  EXPECT_TRUE(r.events.empty());
  EXPECT_EQ(r.saturated, 0);
}

// Samples outside [start, end] (taken after the loop moved on) are not pinned on the stall.
TEST(SplitStall, SamplesOutsideStallIgnored) {
  const std::vector<Sample> samples{Make(At(50), 1, "a"), Make(At(60), 1, "a"),
                                    Make(At(75), 9, "after")};
  const StallResult r = split_stall(samples, Input(kT0, At(70)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].token, 1u);
  EXPECT_EQ(r.events[0].duration, 70 * kMs);
  EXPECT_EQ(r.events[0].samples, 2u);
}

// The stall ended before the watchdog could take any sample: still a block, just without a name.
// Over before any sample: nobody can say whether one culprit or many short callbacks ran, so
// no nameless event; the time is saturation.
TEST(SplitStall, NoSamplesIsSaturationNotAnEvent) {
  const StallResult r = split_stall({}, Input(kT0, At(80)));
  EXPECT_TRUE(r.events.empty());
  EXPECT_EQ(r.saturated, At(80) - kT0);
}

TEST(SplitStall, NoSamplesShortStallGivesNothing) {
  const StallResult r = split_stall({}, Input(kT0, At(49)));
  EXPECT_TRUE(r.events.empty());
}

// Outside any request, library code without an application frame never forms a run: a saturated
// loop's samples land on the same uvicorn/stdlib functions again and again.
TEST(SplitStall, LibraryOnlySamplesOutsideRequestsDoNotJoin) {
  std::vector<Sample> samples{Make(At(50), 0, "parse"), Make(At(52), 0, "parse"),
                              Make(At(62), 0, "parse"), Make(At(72), 0, "parse")};
  for (auto& s : samples) s.culprit = -1;
  const StallResult r = split_stall(samples, Input(kT0, At(80)));
  EXPECT_TRUE(r.events.empty());
  EXPECT_EQ(r.saturated, At(80) - kT0);
  // Alone, such a sample is no event either: nobody could act on it.
  EXPECT_TRUE(split_stall({samples[0]}, Input(kT0, At(55))).events.empty());
  // The same samples with an application frame are one culprit.
  for (auto& s : samples) s.culprit = 0;
  EXPECT_EQ(split_stall(samples, Input(kT0, At(80))).events.size(), 1u);
}

// Outside any request, the loop thread waiting on a futex is held by another thread, not busy
// with many callbacks: the run is a stall even with only the loop's own frames on the stack
// (Datasette: a cursor freed on the loop waits for the SQLite connection a SQL thread holds).
TEST(SplitStall, LockWaitsOutsideRequestsAreStalls) {
  std::vector<Sample> samples;
  for (Nanos ms : {50, 52, 62, 72}) {
    Sample s = Make(At(ms), 0, "BaseEventLoop._run_once", 1907, Kind::kLock);
    s.culprit = -1;
    samples.push_back(s);
  }
  const StallResult r = split_stall(samples, Input(kT0, At(80)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].kind, Kind::kLock);
  EXPECT_EQ(r.events[0].culprit, -1);
  EXPECT_EQ(r.events[0].duration, At(80) - kT0);
}

// A GIL holder's stack is another thread's: library code there, outside any request (a pool
// thread of run_in_executor carries no Context), is the stall's culprit, marked as library code.
TEST(SplitStall, AGilHoldersLibraryFrameNamesTheStall) {
  std::vector<Sample> samples;
  for (Nanos ms : {50, 52, 62, 72}) {
    Sample s = Make(At(ms), 0, "execute_fn", 212, Kind::kGil);
    s.thread = 4242;
    s.culprit_is_library = true;
    samples.push_back(s);
  }
  const StallResult r = split_stall(samples, Input(kT0, At(80)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].kind, Kind::kGil);
  EXPECT_EQ(r.events[0].culprit, 1);
  EXPECT_TRUE(r.events[0].culprit_is_library);
}

// A library culprit is still no application frame: outside requests, the loop running library
// code is saturation, as before there were library culprits.
TEST(SplitStall, RunningLibraryCodeOutsideRequestsIsSaturation) {
  std::vector<Sample> samples;
  for (Nanos ms : {50, 52, 62, 72}) {
    Sample s = Make(At(ms), 0, "data_received", 10, Kind::kCpu);
    s.culprit_is_library = true;
    samples.push_back(s);
  }
  EXPECT_TRUE(split_stall(samples, Input(kT0, At(80))).events.empty());
  // In a request, the same samples are that request's stall, and the event says it is library code.
  for (auto& s : samples) s.token = 3;
  const StallResult r = split_stall(samples, Input(kT0, At(80)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_TRUE(r.events[0].culprit_is_library);
}

// Victims are the other requests in flight, the most seen in the run; the culprit's own request
// is not its own victim.
TEST(SplitStall, VictimsExcludeTheCulprit) {
  std::vector<Sample> samples{Make(At(50), 4, "a"), Make(At(52), 4, "a"), Make(At(62), 4, "a")};
  samples[0].inflight = 2;
  samples[1].inflight = 5;
  samples[2].inflight = 3;
  const StallResult r = split_stall(samples, Input(kT0, At(70)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].victims, 4u);
}

// Code running outside any request (token 0, e.g. a background task) blocks everyone in flight.
TEST(SplitStall, VictimsOfBackgroundCodeAreAllInflight) {
  std::vector<Sample> samples{Make(At(50), 0, "bg"), Make(At(60), 0, "bg")};
  samples[0].inflight = 3;
  samples[1].inflight = 3;
  const StallResult r = split_stall(samples, Input(kT0, At(70)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].victims, 3u);
}

// A culprit request no longer counted in flight must not underflow to 4 billion victims.
TEST(SplitStall, VictimsNoUnderflow) {
  std::vector<Sample> samples{Make(At(50), 4, "a"), Make(At(60), 4, "a")};
  const StallResult r = split_stall(samples, Input(kT0, At(70)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].victims, 0u);
}

// In a CPU loop the culprit line moves between samples; the reported stack is the one showing the
// most frequent line (where the time went), and of those the first sample.
TEST(SplitStall, StackIsMostFrequentCulpritLine) {
  std::vector<Sample> samples;
  int i = 0;
  for (int line : {10, 20, 30, 20, 10, 20}) {
    Sample s = Make(At(50 + 2 * i), 1, "loop", line, Kind::kCpu);
    s.frames[0].line = 100 + i;  // tells the samples apart
    samples.push_back(s);
    ++i;
  }
  const StallResult r = split_stall(samples, Input(kT0, At(70)));
  ASSERT_EQ(r.events.size(), 1u);
  ASSERT_EQ(r.events[0].stack.size(), 3u);
  EXPECT_EQ(r.events[0].stack[1].line, 20);
  EXPECT_EQ(r.events[0].stack[0].line, 101);  // the first sample on line 20
  EXPECT_EQ(r.events[0].culprit, 1);
}

// A run whose samples have no stack still gives an event, flagged as stack_missing.
TEST(SplitStall, RunWithoutStacksIsStackMissing) {
  std::vector<Sample> samples(2);
  samples[0].t = At(50);
  samples[1].t = At(60);
  for (auto& s : samples) {
    s.token = 9;
    s.kind = Kind::kLock;
  }
  const StallResult r = split_stall(samples, Input(kT0, At(70)));
  ASSERT_EQ(r.events.size(), 1u);
  EXPECT_EQ(r.events[0].token, 9u);
  EXPECT_TRUE(r.events[0].stack_missing);
  EXPECT_TRUE(r.events[0].stack.empty());
  EXPECT_EQ(r.events[0].culprit, -1);
  EXPECT_EQ(r.events[0].kind, Kind::kLock);
}

}  // namespace
}  // namespace loopguard
