// ModelCache's races, set up step by step with a fake model whose load waits on a gate
// (fake_model.h): no timing against real loads, so they are fast and deterministic under TSan.
#include <gtest/gtest.h>

#include <future>
#include <string>

#include "server/cache/model_cache.h"
#include "server/core/safetensors_writer.h"
#include "tests/cache/fake_model.h"
#include "tests/test_util.h"

namespace metaload::cache {
namespace {

using namespace std::chrono_literals;
using testing::FakeModels;

class ModelCacheRaceTest : public ::testing::Test {
 protected:
  // A one-tensor safetensors file: the cache opens and indexes it; the fake model ignores it.
  std::string Checkpoint(const std::string& name) {
    core::SafetensorsWriter writer;
    EXPECT_TRUE(writer
                    .Add("w", core::DType::kFloat32, {4},
                         [](char* dst, int64_t, int64_t n) { std::fill(dst, dst + n, 0); })
                    .ok());
    const std::string path = dir_ / (name + ".safetensors");
    EXPECT_TRUE(writer.Write(path).ok());
    return path;
  }

  LoadSpec Spec(const std::string& path, const std::string& id) {
    LoadSpec spec;
    spec.model_id = id;
    spec.path = path;
    spec.display_path = path;
    return spec;
  }

  std::unique_ptr<ModelCache> Cache(std::optional<int64_t> budget = std::nullopt) {
    ModelCache::Options options;
    options.build_model = fakes_.Builder();
    if (budget) options.budgets["cpu"] = *budget;
    return std::make_unique<ModelCache>(options);
  }

  // Starts a load; the future has its result.
  std::pair<std::shared_ptr<LoadWaiter>, std::future<absl::StatusOr<LoadResult>>> Start(
      ModelCache& cache, const LoadSpec& spec) {
    auto done = std::make_shared<std::promise<absl::StatusOr<LoadResult>>>();
    std::future<absl::StatusOr<LoadResult>> result = done->get_future();
    auto waiter = cache.Load(
        spec, nullptr, [done](absl::StatusOr<LoadResult> r) { done->set_value(std::move(r)); });
    return {waiter, std::move(result)};
  }

  absl::StatusOr<LoadResult> LoadNow(ModelCache& cache, const LoadSpec& spec) {
    return Start(cache, spec).second.get();
  }

  // Runs "forward" on [1, 2] and returns y[1], which is 2 x the model's factor.
  float Infer(ModelCache& cache, const std::string& id) {
    WireTensor x;
    x.name = "x";
    x.datatype = "FP32";
    x.shape = {2};
    x.fp32_contents = {1, 2};
    std::promise<absl::StatusOr<std::vector<WireTensor>>> done;
    cache.Infer(id, "", {x}, /*typed_outputs=*/true,
                [&](absl::StatusOr<std::vector<WireTensor>> r) { done.set_value(std::move(r)); });
    absl::StatusOr<std::vector<WireTensor>> out = done.get_future().get();
    if (!out.ok()) return -1;
    return out->front().fp32_contents.at(1);
  }

  ::metaload::testing::TempDir dir_;
  FakeModels fakes_;
};

TEST_F(ModelCacheRaceTest, AJoinWhileLoadingSharesTheOneLoad) {
  auto cache = Cache();
  const std::string a = Checkpoint("a");
  auto fake = fakes_.For(a);
  fake->release.Close();
  auto [w1, r1] = Start(*cache, Spec(a, "one"));
  ASSERT_TRUE(fake->entered.WaitFor(30s));
  auto [w2, r2] = Start(*cache, Spec(a, "two"));  // joins: the first is still loading
  EXPECT_EQ(cache->Get("two")->state, "LOADING");
  fake->release.Open();
  ASSERT_TRUE(r1.get().ok());
  absl::StatusOr<LoadResult> second = r2.get();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(fake->loads.load(), 1);
  EXPECT_EQ(cache->ResidentBytes()["cpu"], fake->bytes);  // one model, two ids
}

TEST_F(ModelCacheRaceTest, AnUnloadWhileLoadingCancelsAndLeavesNothing) {
  auto cache = Cache();
  const std::string a = Checkpoint("a");
  auto fake = fakes_.For(a);
  fake->release.Close();
  auto [waiter, result] = Start(*cache, Spec(a, "m"));
  ASSERT_TRUE(fake->entered.WaitFor(30s));
  ASSERT_TRUE(cache->Unload("m").ok());
  absl::StatusOr<LoadResult> r = result.get();
  EXPECT_TRUE(absl::IsCancelled(r.status())) << r.status();
  // The load itself sees the cancel (the gate never opens) and ends; nothing is left.
  for (int i = 0; i < 3000 && !cache->Activity().running.empty(); ++i) {
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_TRUE(cache->Activity().running.empty());
  EXPECT_EQ(cache->ResidentBytes()["cpu"], 0);
  EXPECT_TRUE(absl::IsNotFound(cache->Get("m").status()));
}

TEST_F(ModelCacheRaceTest, TheLastCallerLeavingAbortsAndANewcomerStartsAfresh) {
  auto cache = Cache();
  const std::string a = Checkpoint("a");
  auto fake = fakes_.For(a);
  fake->release.Close();
  std::atomic<bool> called{false};
  auto waiter =
      cache->Load(Spec(a, "m"), nullptr, [&](absl::StatusOr<LoadResult>) { called = true; });
  ASSERT_TRUE(fake->entered.WaitFor(30s));
  EXPECT_TRUE(waiter->Cancel());
  for (int i = 0; i < 3000 && !cache->Activity().running.empty(); ++i) {
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_TRUE(cache->Activity().running.empty());
  EXPECT_FALSE(called);
  fake->release.Open();
  ASSERT_TRUE(LoadNow(*cache, Spec(a, "m")).ok());
  EXPECT_EQ(fake->loads.load(), 2);
}

TEST_F(ModelCacheRaceTest, AReplaceServesTheOldModelUntilTheNewOneIsReady) {
  auto cache = Cache();
  const std::string a = Checkpoint("a"), b = Checkpoint("b");
  fakes_.For(a)->factor = 1;
  auto next = fakes_.For(b);
  next->factor = 10;
  ASSERT_TRUE(LoadNow(*cache, Spec(a, "m")).ok());
  EXPECT_EQ(Infer(*cache, "m"), 2);
  next->release.Close();
  LoadSpec replace = Spec(b, "m");
  replace.replace = true;
  auto [waiter, result] = Start(*cache, replace);
  ASSERT_TRUE(next->entered.WaitFor(30s));
  EXPECT_EQ(Infer(*cache, "m"), 2);  // still the old one
  EXPECT_EQ(cache->Get("m")->path, a);
  next->release.Open();
  ASSERT_TRUE(result.get().ok());
  EXPECT_EQ(Infer(*cache, "m"), 20);
  EXPECT_EQ(cache->Get("m")->path, b);
}

TEST_F(ModelCacheRaceTest, AFailedReplaceLeavesTheOldModelServing) {
  auto cache = Cache(/*budget=*/3 << 20);
  const std::string a = Checkpoint("a"), big = Checkpoint("big");
  fakes_.For(big)->bytes = int64_t{4} << 20;  // over the budget even alone
  ASSERT_TRUE(LoadNow(*cache, Spec(a, "m")).ok());
  LoadSpec replace = Spec(big, "m");
  replace.replace = true;
  absl::StatusOr<LoadResult> r = LoadNow(*cache, replace);
  EXPECT_TRUE(absl::IsResourceExhausted(r.status())) << r.status();
  EXPECT_EQ(Infer(*cache, "m"), 2);
  EXPECT_EQ(fakes_.For(big)->loads.load(), 0);  // refused before loading
}

// The web UI switching checkpoints while a generation runs, under a budget of one model: the
// replace waits for the running Infer (which finishes on the old weights), refuses new Infers
// on the id meanwhile so that they cannot hold it off, then evicts the old model and loads.
TEST_F(ModelCacheRaceTest, AReplaceUnderABudgetOfOneWaitsForTheOldModelsInfers) {
  auto cache = Cache(/*budget=*/(3 << 20) / 2);  // one model
  const std::string a = Checkpoint("a"), b = Checkpoint("b");
  auto old = fakes_.For(a);
  fakes_.For(b)->factor = 10;
  ASSERT_TRUE(LoadNow(*cache, Spec(a, "m")).ok());
  old->run.Close();
  std::future<float> infer = std::async(std::launch::async, [&] { return Infer(*cache, "m"); });
  ASSERT_TRUE(old->running.WaitFor(30s));
  LoadSpec replace = Spec(b, "m");
  replace.replace = true;
  auto [waiter, result] = Start(*cache, replace);
  EXPECT_FALSE(fakes_.For(b)->entered.WaitFor(200ms));  // not loading yet: it waits
  EXPECT_EQ(Infer(*cache, "m"), -1);                    // refused while the switch waits
  old->run.Open();
  EXPECT_EQ(infer.get(), 2);  // the running Infer finished on the old weights
  absl::StatusOr<LoadResult> r = result.get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(Infer(*cache, "m"), 20);
  EXPECT_EQ(cache->ResidentBytes()["cpu"], 1 << 20);
}

// A caller that leaves while its replace waits for the old model's Infers cancels the switch:
// the old model was never evicted and serves again.
TEST_F(ModelCacheRaceTest, AReplaceCancelledWhileWaitingLeavesTheOldModelServing) {
  auto cache = Cache(/*budget=*/(3 << 20) / 2);
  const std::string a = Checkpoint("a"), b = Checkpoint("b");
  auto old = fakes_.For(a);
  ASSERT_TRUE(LoadNow(*cache, Spec(a, "m")).ok());
  old->run.Close();
  std::future<float> infer = std::async(std::launch::async, [&] { return Infer(*cache, "m"); });
  ASSERT_TRUE(old->running.WaitFor(30s));
  LoadSpec replace = Spec(b, "m");
  replace.replace = true;
  auto started = Start(*cache, replace);
  std::this_thread::sleep_for(50ms);
  EXPECT_TRUE(started.first->Cancel());
  old->run.Open();
  EXPECT_EQ(infer.get(), 2);
  for (int i = 0; i < 500 && cache->Get("m")->state != "READY"; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  std::this_thread::sleep_for(50ms);  // the flight has seen its cancellation and left
  EXPECT_EQ(Infer(*cache, "m"), 2);
  EXPECT_EQ(cache->Get("m")->path, a);
  EXPECT_EQ(fakes_.For(b)->loads.load(), 0);
}

// Under a budget of one, a replace evicts its predecessor before it loads. If the load then
// fails, or its caller leaves, the id gets the old model back (loaded again); an Unload of the
// id during the replace means the id should go, so nothing comes back.
TEST_F(ModelCacheRaceTest, AReplaceThatFailsAfterEvictingBringsTheOldModelBack) {
  const std::string a = Checkpoint("a"), b = Checkpoint("b");
  auto old = fakes_.For(a);
  auto next = fakes_.For(b);
  auto serves_a_again = [&](ModelCache& cache) {
    for (int i = 0; i < 500; ++i) {
      absl::StatusOr<ModelInfo> info = cache.Get("m");
      if (info.ok() && info->state == "READY") break;
      std::this_thread::sleep_for(10ms);
    }
    absl::StatusOr<ModelInfo> info = cache.Get("m");
    return info.ok() && info->path == a && Infer(cache, "m") == 2;
  };
  LoadSpec replace = Spec(b, "m");
  replace.replace = true;
  {
    auto cache = Cache(/*budget=*/(3 << 20) / 2);
    ASSERT_TRUE(LoadNow(*cache, Spec(a, "m")).ok());
    next->fail = absl::DataLossError("fake: truncated");
    absl::StatusOr<LoadResult> r = LoadNow(*cache, replace);
    EXPECT_TRUE(absl::IsDataLoss(r.status())) << r.status();
    EXPECT_TRUE(serves_a_again(*cache));
    EXPECT_EQ(old->loads.load(), 2);
    next->fail = absl::OkStatus();
  }
  {
    auto cache = Cache(/*budget=*/(3 << 20) / 2);
    ASSERT_TRUE(LoadNow(*cache, Spec(a, "m")).ok());
    next->release.Close();
    next->entered.Close();
    auto started = Start(*cache, replace);
    ASSERT_TRUE(next->entered.WaitFor(30s));  // a was evicted: b is loading
    EXPECT_TRUE(absl::IsNotFound(cache->Get("m").status()) || cache->Get("m")->path == b);
    EXPECT_TRUE(started.first->Cancel());
    EXPECT_TRUE(serves_a_again(*cache));
    EXPECT_EQ(old->loads.load(), 4);
  }
  {
    auto cache = Cache(/*budget=*/(3 << 20) / 2);
    ASSERT_TRUE(LoadNow(*cache, Spec(a, "m")).ok());
    next->entered.Close();
    auto started = Start(*cache, replace);
    ASSERT_TRUE(next->entered.WaitFor(30s));
    ASSERT_TRUE(cache->Unload("m").ok());
    EXPECT_TRUE(absl::IsCancelled(started.second.get().status()));
    std::this_thread::sleep_for(100ms);
    EXPECT_TRUE(absl::IsNotFound(cache->Get("m").status()));
    EXPECT_EQ(old->loads.load(), 5);  // the first load of this block, no restore
  }
  next->release.Open();
}

TEST_F(ModelCacheRaceTest, EvictionTakesTheLeastRecentlyUsedIdleModel) {
  auto cache = Cache(/*budget=*/(5 << 20) / 2);  // two 1 MiB models, not three
  const std::string a = Checkpoint("a"), b = Checkpoint("b"), c = Checkpoint("c");
  ASSERT_TRUE(LoadNow(*cache, Spec(a, "a")).ok());
  ASSERT_TRUE(LoadNow(*cache, Spec(b, "b")).ok());
  EXPECT_EQ(Infer(*cache, "a"), 2);  // a is now the more recent
  ASSERT_TRUE(LoadNow(*cache, Spec(c, "c")).ok());
  EXPECT_TRUE(cache->Get("a").ok());
  EXPECT_TRUE(absl::IsNotFound(cache->Get("b").status()));
  EXPECT_TRUE(cache->Get("c").ok());
  EXPECT_EQ(cache->ResidentBytes()["cpu"], 2 << 20);
}

TEST_F(ModelCacheRaceTest, AModelAnInferHoldsIsNotEvictedAndStillCountsOnceUnloaded) {
  auto cache = Cache(/*budget=*/(3 << 20) / 2);  // one model
  const std::string a = Checkpoint("a"), b = Checkpoint("b");
  auto held = fakes_.For(a);
  ASSERT_TRUE(LoadNow(*cache, Spec(a, "a")).ok());
  held->run.Close();
  std::future<float> infer = std::async(std::launch::async, [&] { return Infer(*cache, "a"); });
  ASSERT_TRUE(held->running.WaitFor(30s));
  absl::StatusOr<LoadResult> refused = LoadNow(*cache, Spec(b, "b"));  // "a" is in use
  EXPECT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
  ASSERT_TRUE(cache->Unload("a").ok());
  EXPECT_EQ(cache->ResidentBytes()["cpu"], 1 << 20);  // unloaded, but the Infer holds it
  refused = LoadNow(*cache, Spec(b, "b"));
  EXPECT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
  held->run.Open();
  EXPECT_EQ(infer.get(), 2);
  ASSERT_TRUE(LoadNow(*cache, Spec(b, "b")).ok());  // the Infer's hold was the last
  EXPECT_EQ(cache->ResidentBytes()["cpu"], 1 << 20);
}

}  // namespace
}  // namespace metaload::cache
