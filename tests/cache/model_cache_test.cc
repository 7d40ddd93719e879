// ModelCache in-process: single flight, waiters that leave, admission before allocation.
#include "server/cache/model_cache.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/core/process_memory.h"
#include "server/models/synth.h"
#include "tests/test_util.h"

namespace metaload::cache {
namespace {

using namespace std::chrono_literals;

class CountingObserver : public CacheObserver {
 public:
  void OnCacheRequest(const std::string& result) override {
    std::lock_guard<std::mutex> lock(mu);
    ++requests[result];
  }
  void OnLoadFinished(const std::string&, const std::string&, const std::string&,
                      const std::string& outcome, const LoadStats&, int64_t) override {
    std::lock_guard<std::mutex> lock(mu);
    ++loads[outcome];
    cv.notify_all();
  }
  void OnInfer(const std::string& model_id, double) override {
    std::lock_guard<std::mutex> lock(mu);
    ++infers[model_id];
  }
  bool WaitForLoads(const std::string& outcome, int n) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, 30s, [&] { return loads[outcome] >= n; });
  }
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::string, int> requests, loads, infers;
};

class ModelCacheTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    models::SynthOptions medium;
    medium.preset = "medium";  // ~200 MB: long enough to leave while it loads
    ASSERT_TRUE(models::Synthesize(medium, *dir_ / "medium").ok());
    ASSERT_TRUE(models::Synthesize(models::SynthOptions(), *dir_ / "tiny").ok());
  }
  static void TearDownTestSuite() { delete dir_; }

  LoadSpec Spec(const std::string& name, const std::string& id) {
    LoadSpec spec;
    spec.model_id = id;
    spec.path = *dir_ / name;
    spec.display_path = name;
    return spec;
  }

  // Another ~160 MiB checkpoint (a different seed: a different file) under dir_/name.
  static bool SynthesizeMedium(const std::string& name, uint64_t seed) {
    models::SynthOptions options;
    options.preset = "medium";
    options.seed = seed;
    return models::Synthesize(options, *dir_ / name).ok();
  }

  // A cpu budget that holds one medium model (160 MiB), not two.
  static constexpr int64_t kOneMediumBudget = 180 << 20;
  static ModelCache::Options OneMediumBudget() {
    ModelCache::Options options;
    options.budgets["cpu"] = kOneMediumBudget;
    return options;
  }

  static testing::TempDir* dir_;
};

testing::TempDir* ModelCacheTest::dir_ = nullptr;

TEST_F(ModelCacheTest, IdenticalConcurrentLoadsShareOne) {
  CountingObserver observer;
  ModelCache::Options options;
  options.observer = &observer;
  ModelCache cache(options);
  std::vector<std::promise<absl::StatusOr<LoadResult>>> results(8);
  std::vector<std::shared_ptr<LoadWaiter>> waiters;
  for (auto& r : results) {
    waiters.push_back(cache.Load(Spec("tiny", "t"), nullptr, [&r](absl::StatusOr<LoadResult> res) {
      r.set_value(std::move(res));
    }));
  }
  for (auto& r : results) {
    absl::StatusOr<LoadResult> res = r.get_future().get();
    ASSERT_TRUE(res.ok()) << res.status();
    EXPECT_EQ(res->model.state, "READY");
  }
  EXPECT_EQ(observer.requests["miss"], 1);
  EXPECT_EQ(observer.requests["coalesced"] + observer.requests["hit"], 7);
  EXPECT_EQ(observer.loads["ok"], 1);
}

TEST_F(ModelCacheTest, OneCallerLeavingDoesNotCancelTheOthers) {
  CountingObserver observer;
  ModelCache::Options options;
  options.observer = &observer;
  ModelCache cache(options);
  std::atomic<bool> a_called{false};
  std::promise<absl::StatusOr<LoadResult>> b;
  auto waiter_a = cache.Load(Spec("medium", "m"), nullptr,
                             [&](absl::StatusOr<LoadResult>) { a_called = true; });
  auto waiter_b = cache.Load(Spec("medium", "m"), nullptr,
                             [&](absl::StatusOr<LoadResult> r) { b.set_value(std::move(r)); });
  EXPECT_TRUE(waiter_a->Cancel());
  absl::StatusOr<LoadResult> result = b.get_future().get();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->model.state, "READY");
  EXPECT_FALSE(a_called.load());
  EXPECT_FALSE(waiter_b->Cancel());  // already done
  EXPECT_EQ(observer.loads["ok"], 1);
}

// While loading, the model's dtype is what the request asked for: "default" for an empty one
// (the architecture's, known once built), the described policy for overrides.
TEST_F(ModelCacheTest, LoadingModelsShowTheRequestedDtypes) {
  ModelCache cache(ModelCache::Options{});
  auto info_while_loading = [&](LoadSpec spec) {
    std::promise<void> started, done;
    bool first = true;
    auto waiter = cache.Load(
        spec,
        [&](const LoadProgressEvent&) {
          if (std::exchange(first, false)) started.set_value();
        },
        [&](absl::StatusOr<LoadResult>) { done.set_value(); });
    started.get_future().wait();
    absl::StatusOr<ModelInfo> info = cache.Get(spec.model_id);
    done.get_future().wait();
    return info;
  };
  absl::StatusOr<ModelInfo> plain = info_while_loading(Spec("medium", "m"));
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->state, "LOADING");
  EXPECT_EQ(plain->dtype, "default");
  EXPECT_EQ(cache.Get("m")->dtype, "keep");  // an mlp's default: the file's
  LoadSpec spec = Spec("medium", "m16");
  spec.dtype_overrides = {{"layers.0.", "bfloat16"}};
  absl::StatusOr<ModelInfo> overridden = info_while_loading(spec);
  ASSERT_TRUE(overridden.ok()) << overridden.status();
  EXPECT_EQ(overridden->state, "LOADING");
  EXPECT_EQ(overridden->dtype, "default=keep;layers.0.=bfloat16");
}

TEST_F(ModelCacheTest, LastCallerLeavingAbortsAndFrees) {
  CountingObserver observer;
  ModelCache::Options options;
  options.observer = &observer;
  ModelCache cache(options);
  const int64_t before = core::ReadProcessMemory()->rss_bytes;
  std::atomic<bool> called{false};
  auto waiter =
      cache.Load(Spec("medium", "m"), nullptr, [&](absl::StatusOr<LoadResult>) { called = true; });
  EXPECT_TRUE(waiter->Cancel());
  ASSERT_TRUE(observer.WaitForLoads("cancelled", 1));
  EXPECT_FALSE(called.load());
  EXPECT_TRUE(cache.ResidentBytes().empty());
  EXPECT_TRUE(absl::IsNotFound(cache.Get("m").status()));
  EXPECT_LT(core::ReadProcessMemory()->rss_bytes - before, 64 << 20) << "memory not returned";
}

TEST_F(ModelCacheTest, ResourceExhaustedBeforeAllocating) {
  ModelCache::Options options;
  options.budgets["cpu"] = 50 << 20;  // the medium model needs ~200 MB
  ModelCache cache(options);
  const int64_t before = core::ReadProcessMemory()->rss_bytes;
  std::promise<absl::StatusOr<LoadResult>> done;
  cache.Load(Spec("medium", "m"), nullptr,
             [&](absl::StatusOr<LoadResult> r) { done.set_value(std::move(r)); });
  absl::StatusOr<LoadResult> r = done.get_future().get();
  EXPECT_TRUE(absl::IsResourceExhausted(r.status())) << r.status();
  EXPECT_NE(r.status().message().find("medium"), std::string::npos);
  EXPECT_LT(core::ReadProcessMemory()->rss_bytes - before, 16 << 20);
  EXPECT_TRUE(absl::IsNotFound(cache.Get("m").status()));
}

// The file changes under a running load (the first progress event does it, on the loading
// thread, so the timing is fixed): DATA_LOSS naming the file, nothing left in the cache, and the
// cache keeps working.
TEST_F(ModelCacheTest, FileTruncatedOrRewrittenWhileLoadingIsDataLoss) {
  for (const bool truncate : {true, false}) {
    SCOPED_TRACE(truncate ? "truncated" : "rewritten in place");
    const std::filesystem::path victim = *dir_ / "victim";
    std::filesystem::remove_all(victim);
    models::SynthOptions medium;
    medium.preset = "medium";
    ASSERT_TRUE(models::Synthesize(medium, victim).ok());
    const std::string file = victim / "model.safetensors";
    const off_t size = static_cast<off_t>(std::filesystem::file_size(file));
    ModelCache cache({});
    std::atomic<bool> changed{false};
    auto progress = [&](const LoadProgressEvent& e) {
      if (e.phase != "read" || e.bytes_done == 0 || changed.exchange(true)) return;
      if (truncate) {
        ASSERT_EQ(::truncate(file.c_str(), size / 2), 0);
      } else {
        int fd = ::open(file.c_str(), O_WRONLY);
        ASSERT_GE(fd, 0);
        ASSERT_EQ(::pwrite(fd, "\x7f\x7f\x7f\x7f", 4, size - 4), 4);
        ::close(fd);
      }
    };
    std::promise<absl::StatusOr<LoadResult>> done;
    cache.Load(Spec("victim", "v"), progress,
               [&](absl::StatusOr<LoadResult> r) { done.set_value(std::move(r)); });
    absl::StatusOr<LoadResult> r = done.get_future().get();
    ASSERT_TRUE(changed.load()) << "no read progress before the end of the load";
    EXPECT_TRUE(absl::IsDataLoss(r.status())) << r.status();
    EXPECT_NE(r.status().message().find("model.safetensors"), std::string::npos) << r.status();
    EXPECT_TRUE(absl::IsNotFound(cache.Get("v").status()));
    EXPECT_TRUE(cache.List().empty());
    EXPECT_TRUE(cache.ResidentBytes().empty());

    std::promise<absl::StatusOr<LoadResult>> next;
    cache.Load(Spec("tiny", "t"), nullptr,
               [&](absl::StatusOr<LoadResult> r) { next.set_value(std::move(r)); });
    EXPECT_TRUE(next.get_future().get().ok());
  }
}

TEST_F(ModelCacheTest, ReplaceKeepsServingTheOldModelUntilTheNewIsReady) {
  ModelCache cache({});
  std::promise<absl::StatusOr<LoadResult>> first;
  cache.Load(Spec("tiny", "x"), nullptr,
             [&](absl::StatusOr<LoadResult> r) { first.set_value(std::move(r)); });
  ASSERT_TRUE(first.get_future().get().ok());
  LoadSpec replacement = Spec("medium", "x");
  replacement.replace = true;
  std::promise<absl::StatusOr<LoadResult>> second;
  cache.Load(replacement, nullptr,
             [&](absl::StatusOr<LoadResult> r) { second.set_value(std::move(r)); });
  absl::StatusOr<ModelInfo> during = cache.Get("x");
  ASSERT_TRUE(during.ok());
  EXPECT_EQ(during->path, "tiny");  // still the old one while the new loads
  ASSERT_TRUE(second.get_future().get().ok());
  EXPECT_EQ(cache.Get("x")->path, "medium");
}

}  // namespace
}  // namespace metaload::cache

namespace metaload::cache {
namespace {

TEST_F(ModelCacheTest, ReplaceUnderATightBudgetSwapsInsteadOfFailing) {
  ModelCache cache(OneMediumBudget());
  ASSERT_TRUE(SynthesizeMedium("medium2", 7));
  std::promise<absl::StatusOr<LoadResult>> first;
  cache.Load(Spec("medium", "sd"), nullptr,
             [&](absl::StatusOr<LoadResult> r) { first.set_value(std::move(r)); });
  ASSERT_TRUE(first.get_future().get().ok());
  LoadSpec next = Spec("medium2", "sd");
  next.replace = true;
  std::promise<absl::StatusOr<LoadResult>> second;
  cache.Load(next, nullptr, [&](absl::StatusOr<LoadResult> r) { second.set_value(std::move(r)); });
  absl::StatusOr<LoadResult> r = second.get_future().get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(cache.Get("sd")->path, "medium2");
  EXPECT_LE(cache.ResidentBytes()["cpu"], kOneMediumBudget);
}

// The web UI's switch, as tight as it gets: the next checkpoint is asked for from the previous
// load's done callback, before that load's thread has returned. Nothing of the finished load
// may still count against the budget then (a CI run once saw RESOURCE_EXHAUSTED here).
TEST_F(ModelCacheTest, SwitchFromTheDoneCallbackFitsABudgetOfOne) {
  ModelCache cache(OneMediumBudget());
  ASSERT_TRUE(SynthesizeMedium("medium3", 9));
  std::promise<absl::StatusOr<LoadResult>> switched;
  cache.Load(Spec("medium", "a"), nullptr, [&](absl::StatusOr<LoadResult> first) {
    if (!first.ok()) return switched.set_value(first.status());
    std::promise<absl::StatusOr<LoadResult>> next;
    cache.Load(Spec("medium3", "b"), nullptr,
               [&](absl::StatusOr<LoadResult> r) { next.set_value(std::move(r)); });
    switched.set_value(next.get_future().get());  // waits here, on the first load's thread
  });
  absl::StatusOr<LoadResult> r = switched.get_future().get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(absl::IsNotFound(cache.Get("a").status()));  // evicted for b
  EXPECT_EQ(cache.Get("b")->state, "READY");
}

}  // namespace
}  // namespace metaload::cache

namespace metaload::cache {
namespace {

std::vector<WireTensor> MlpInput(int64_t batch, int64_t width) {
  WireTensor t;
  t.name = "input";
  t.datatype = "FP32";
  t.shape = {batch, width};
  t.raw_data.assign(static_cast<size_t>(batch * width * 4), '\0');
  return {t};
}

TEST_F(ModelCacheTest, UnloadDuringALongInferLetsItFinish) {
  CountingObserver observer;
  ModelCache::Options options;
  options.observer = &observer;
  ModelCache cache(options);
  std::promise<absl::StatusOr<LoadResult>> loaded;
  cache.Load(Spec("medium", "m"), nullptr,
             [&](absl::StatusOr<LoadResult> r) { loaded.set_value(std::move(r)); });
  ASSERT_TRUE(loaded.get_future().get().ok());
  std::promise<absl::StatusOr<std::vector<WireTensor>>> inferred;
  cache.Infer("m", "", MlpInput(128, 1024), false,
              [&](absl::StatusOr<std::vector<WireTensor>> r) { inferred.set_value(std::move(r)); });
  std::this_thread::sleep_for(50ms);  // the forward pass (~11 GFLOP, seconds here) is running now
  absl::StatusOr<ModelInfo> unloaded = cache.Unload("m");
  ASSERT_TRUE(unloaded.ok());
  EXPECT_EQ(unloaded->state, "UNLOADING");
  EXPECT_TRUE(absl::IsNotFound(cache.Get("m").status()));
  EXPECT_GT(cache.ResidentBytes()["cpu"], 0);  // still held by the running Infer
  absl::StatusOr<std::vector<WireTensor>> out = inferred.get_future().get();
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->front().shape, (std::vector<int64_t>{128, 1024}));
  for (int i = 0; i < 100 && !cache.ResidentBytes().empty() && cache.ResidentBytes()["cpu"] > 0;
       ++i) {
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(cache.ResidentBytes()["cpu"], 0);  // freed with the last handle
  // The metrics heard of the unload and not of the Infer that outlived it.
  std::lock_guard<std::mutex> lock(observer.mu);
  EXPECT_EQ(observer.infers["m"], 0);
}

// Load, unload, infer and replace racing on the same ids; afterwards every id the cache lists
// is gettable and READY, and every callback ran exactly once.
TEST_F(ModelCacheTest, RacesOnTheSameIdsStayConsistent) {
  models::SynthOptions small;
  small.preset = "small";
  ASSERT_TRUE(models::Synthesize(small, *dir_ / "small").ok());
  ModelCache::Options options;
  options.load_threads = 2;
  options.infer_threads = 2;
  ModelCache cache(options);
  std::atomic<int64_t> issued{0}, finished{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      while (!stop.load()) {
        const std::string id = "id" + std::to_string(rng() % 3);
        switch (rng() % 4) {
          case 0:
          case 1: {
            LoadSpec spec = Spec(rng() % 2 ? "tiny" : "small", id);
            spec.replace = rng() % 2;
            ++issued;
            auto w = cache.Load(spec, nullptr, [&](absl::StatusOr<LoadResult>) { ++finished; });
            if (rng() % 5 == 0 && w->Cancel()) ++finished;  // a caller that leaves
            break;
          }
          case 2:
            (void)cache.Unload(id);
            break;
          default: {
            ++issued;
            absl::StatusOr<ModelInfo> info = cache.Get(id);
            const int64_t width = info.ok() && info->parameter_count > 10000 ? 256 : 16;
            cache.Infer(id, "", MlpInput(2, width), rng() % 2, [&](auto) { ++finished; });
          }
        }
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
      }
    });
  }
  std::this_thread::sleep_for(3s);
  stop.store(true);
  for (auto& t : threads) t.join();
  for (int i = 0; i < 1000 && finished.load() < issued.load(); ++i)
    std::this_thread::sleep_for(10ms);
  EXPECT_EQ(finished.load(), issued.load());
  EXPECT_GT(issued.load(), 100);
  for (const ModelInfo& info : cache.List()) {
    absl::StatusOr<ModelInfo> again = cache.Get(info.model_id);
    ASSERT_TRUE(again.ok()) << info.model_id;
    EXPECT_EQ(again->state, "READY");
  }
}

absl::StatusOr<LoadResult> LoadNow(ModelCache& cache, const LoadSpec& spec) {
  std::promise<absl::StatusOr<LoadResult>> done;
  auto waiter = cache.Load(spec, nullptr,
                           [&done](absl::StatusOr<LoadResult> r) { done.set_value(std::move(r)); });
  std::future<absl::StatusOr<LoadResult>> f = done.get_future();
  if (f.wait_for(60s) != std::future_status::ready) return absl::DeadlineExceededError("hung");
  return f.get();
}

absl::StatusOr<std::vector<WireTensor>> InferNow(ModelCache& cache, const std::string& id,
                                                 std::vector<WireTensor> inputs) {
  std::promise<absl::StatusOr<std::vector<WireTensor>>> done;
  cache.Infer(id, "", std::move(inputs), false,
              [&done](absl::StatusOr<std::vector<WireTensor>> r) { done.set_value(std::move(r)); });
  std::future<absl::StatusOr<std::vector<WireTensor>>> f = done.get_future();
  if (f.wait_for(60s) != std::future_status::ready) return absl::DeadlineExceededError("hung");
  return f.get();
}

// Sanitizers reserve terabytes of address space and refuse huge allocations themselves.
using testing::UnderSanitizer;

// Hostile: config.json values of the wrong type. Before the fix nlohmann::json threw
// type_error on a load thread (std::terminate); now each is FAILED_PRECONDITION naming the key,
// and the cache still loads afterwards.
TEST_F(ModelCacheTest, ConfigValuesOfTheWrongTypeAreFailedPrecondition) {
  struct Case {
    const char* arch;
    const char* key;
    nlohmann::json value;
  };
  const std::vector<Case> cases = {
      {"mlp", "model_type", 1},
      {"mlp", "activation", 5},
      {"gpt2", "activation_function", 5},
      {"llama", "tie_word_embeddings", "yes"},
      {"mlp", "layer_sizes", nlohmann::json::array({int64_t{1} << 40, int64_t{1} << 40})},
  };
  ModelCache cache(ModelCache::Options{});
  int n = 0;
  for (const Case& c : cases) {
    const std::string name = absl::StrCat("config_", n++, "_", c.arch);
    models::SynthOptions synth;
    synth.architecture = c.arch;
    ASSERT_TRUE(models::Synthesize(synth, *dir_ / name).ok());
    nlohmann::json config =
        nlohmann::json::parse(testing::ReadFileOrEmpty(*dir_ / (name + "/config.json")));
    config[c.key] = c.value;
    std::ofstream(*dir_ / (name + "/config.json"), std::ios::trunc) << config.dump();
    absl::StatusOr<LoadResult> r = LoadNow(cache, Spec(name, name));
    if (std::string(c.key) == "model_type") {
      // Ignored when it is no string: the architecture comes from the keys.
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->model.architecture, "mlp");
      continue;
    }
    EXPECT_TRUE(absl::IsFailedPrecondition(r.status())) << c.key << ": " << r.status();
    EXPECT_NE(r.status().message().find(c.key), std::string::npos) << r.status();
  }
  EXPECT_TRUE(LoadNow(cache, Spec("tiny", "still_works")).ok());
}

// Hostile: a checkpoint whose tensor cannot be allocated (a sparse 1 TiB file, no budget to stop
// it first). Before the fix at::empty threw on the load thread (std::terminate).
TEST_F(ModelCacheTest, ADestinationThatCannotBeAllocatedIsResourceExhausted) {
  if (UnderSanitizer()) GTEST_SKIP() << "sanitizers refuse a 1 TiB allocation by aborting";
  if (testing::ReadFileOrEmpty("/proc/sys/vm/overcommit_memory").rfind("1", 0) == 0) {
    GTEST_SKIP() << "vm.overcommit_memory=1 would grant 1 TiB";
  }
  const int64_t n = int64_t{1} << 19;  // [n, n] float32: 1 TiB
  const int64_t weight = n * n * 4, bias = n * 4;
  std::string header = absl::StrCat("{\"layers.0.weight\":{\"dtype\":\"F32\",\"shape\":[", n, ",",
                                    n, "],\"data_offsets\":[0,", weight,
                                    "]},\"layers.0.bias\":{\"dtype\":\"F32\",\"shape\":[", n,
                                    "],\"data_offsets\":[", weight, ",", weight + bias, "]}}");
  header.append((8 - header.size() % 8) % 8, ' ');
  const std::string path = *dir_ / "huge.safetensors";
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    const uint64_t len = header.size();
    f.write(reinterpret_cast<const char*>(&len), 8);
    f << header;
  }
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(8 + header.size() + weight + bias)), 0);
  ModelCache cache(ModelCache::Options{});
  absl::StatusOr<LoadResult> r = LoadNow(cache, Spec("huge.safetensors", "huge"));
  EXPECT_TRUE(absl::IsResourceExhausted(r.status())) << r.status();
  EXPECT_NE(r.status().message().find("layers.0.weight"), std::string::npos) << r.status();
  EXPECT_TRUE(LoadNow(cache, Spec("tiny", "still_works")).ok());
  ::unlink(path.c_str());
}

// Restores the address-space limit on scope exit.
class AddressSpaceLimit {
 public:
  explicit AddressSpaceLimit(int64_t headroom) {
    ::getrlimit(RLIMIT_AS, &old_);
    int64_t vm_kib = 0;
    std::istringstream in(testing::ReadFileOrEmpty("/proc/self/status"));
    for (std::string line; std::getline(in, line);) {
      if (line.rfind("VmSize:", 0) == 0) vm_kib = std::stoll(line.substr(7));
    }
    rlimit tight = old_;
    tight.rlim_cur = static_cast<rlim_t>(vm_kib * 1024 + headroom);
    ok_ = vm_kib > 0 && ::setrlimit(RLIMIT_AS, &tight) == 0;
  }
  ~AddressSpaceLimit() { ::setrlimit(RLIMIT_AS, &old_); }
  bool ok() const { return ok_; }

 private:
  rlimit old_{};
  bool ok_ = false;
};

// Hostile: an Infer whose activations do not fit in memory. Before the fix it was
// INVALID_ARGUMENT "failed on these inputs"; it is RESOURCE_EXHAUSTED, and the model still
// serves and can still be unloaded (its in-use count went back to zero).
TEST_F(ModelCacheTest, OutOfMemoryInAForwardIsResourceExhausted) {
  if (UnderSanitizer()) GTEST_SKIP() << "sanitizers reserve address space";
  ASSERT_TRUE(models::Synthesize(
                  [] {
                    models::SynthOptions o;
                    o.preset = "small";  // 256 -> 1024 -> 1024 -> 256
                    return o;
                  }(),
                  *dir_ / "oom_small")
                  .ok());
  ModelCache::Options options;
  options.budgets["cpu"] = 10 << 20;  // one small mlp (6.3 MB), not two
  ModelCache cache(options);
  ASSERT_TRUE(LoadNow(cache, Spec("oom_small", "s")).ok());
  std::vector<WireTensor> input = MlpInput(65536, 256);  // 64 MiB in, 256 MiB per activation
  absl::StatusOr<std::vector<WireTensor>> out;
  {
    AddressSpaceLimit limit(160 << 20);
    ASSERT_TRUE(limit.ok());
    out = InferNow(cache, "s", std::move(input));
  }
  EXPECT_TRUE(absl::IsResourceExhausted(out.status())) << out.status();
  absl::StatusOr<std::vector<WireTensor>> small = InferNow(cache, "s", MlpInput(2, 256));
  ASSERT_TRUE(small.ok()) << small.status();
  // Not held by the failed Infer: another model evicts it under the budget.
  ASSERT_TRUE(models::Synthesize(
                  [] {
                    models::SynthOptions o;
                    o.preset = "small";
                    o.seed = 7;
                    return o;
                  }(),
                  *dir_ / "oom_other")
                  .ok());
  absl::StatusOr<LoadResult> other = LoadNow(cache, Spec("oom_other", "o"));
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_TRUE(absl::IsNotFound(cache.Get("s").status()));
}

// Issue 17 item 6a: a caller that joins an identical load whose earlier callers have all
// cancelled gets a load of its own, not their CANCELLED. Before the fix it joined the dying
// flight (the web UI's "cancel, then load again" 15 ms later: CANCELLED 6 of 6 runs).
TEST_F(ModelCacheTest, JoiningALoadEveryoneLeftStartsAFreshOne) {
  CountingObserver observer;
  ModelCache::Options options;
  options.observer = &observer;
  ModelCache cache(options);
  for (int run = 0; run < 3; ++run) {
    SCOPED_TRACE(run);
    const std::string id = absl::StrCat("m", run);
    std::promise<void> reading;
    std::atomic<bool> told{false};
    auto first = cache.Load(
        Spec("medium", id),
        [&](const LoadProgressEvent& e) {
          if (e.phase == "read" && !told.exchange(true)) reading.set_value();
        },
        [](absl::StatusOr<LoadResult>) {});
    reading.get_future().wait();
    ASSERT_TRUE(first->Cancel());
    absl::StatusOr<LoadResult> second = LoadNow(cache, Spec("medium", id));
    ASSERT_TRUE(second.ok()) << second.status();
    EXPECT_EQ(second->model.state, "READY");
    ASSERT_TRUE(cache.Unload(id).ok());
  }
}

// Issue 17 item 6b: a Hugging Face directory is keyed by every file in it, not by the
// directory's own stat: a shard rewritten in place (same size, the directory untouched) is a new
// model, never a cache hit on the old weights. Before the fix: cache_hit true, stale weights.
TEST_F(ModelCacheTest, AShardRewrittenInPlaceIsNotACacheHit) {
  const std::filesystem::path dir = *dir_ / "rewritten";
  std::filesystem::remove_all(dir);
  models::SynthOptions a;
  a.shards = 2;
  a.preset = "small";
  ASSERT_TRUE(models::Synthesize(a, dir).ok());
  models::SynthOptions b = a;
  b.seed = 7;
  ASSERT_TRUE(models::Synthesize(b, *dir_ / "rewritten_b").ok());
  struct stat dir_before;
  ASSERT_EQ(::stat(dir.c_str(), &dir_before), 0);

  ModelCache cache({});
  absl::StatusOr<LoadResult> old_load = LoadNow(cache, Spec("rewritten", "old"));
  ASSERT_TRUE(old_load.ok()) << old_load.status();
  EXPECT_FALSE(old_load->cache_hit);

  // Overwrite one shard's bytes in place with the other seed's (same layout, same size).
  std::string shard;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename();
    if (name.find("-of-") != std::string::npos) shard = name;
  }
  ASSERT_FALSE(shard.empty());
  std::ifstream in(std::filesystem::path(*dir_ / "rewritten_b") / shard, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_EQ(bytes.size(), std::filesystem::file_size(dir / shard));
  const int fd = ::open((dir / shard).c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
  ::close(fd);
  struct stat dir_after;
  ASSERT_EQ(::stat(dir.c_str(), &dir_after), 0);
  ASSERT_EQ(dir_after.st_mtim.tv_nsec, dir_before.st_mtim.tv_nsec) << "the directory changed";

  absl::StatusOr<LoadResult> new_load = LoadNow(cache, Spec("rewritten", "new"));
  ASSERT_TRUE(new_load.ok()) << new_load.status();
  EXPECT_FALSE(new_load->cache_hit) << "a stale cache hit on the old weights";
  // The same id asking again is a different model now: replace it, or ALREADY_EXISTS.
  absl::StatusOr<LoadResult> same_id = LoadNow(cache, Spec("rewritten", "old"));
  EXPECT_TRUE(absl::IsAlreadyExists(same_id.status())) << same_id.status();
}

// Issue 17 item 3: what one caller's model puts in every ListModels reply is bounded. 1024
// overrides of 60-byte prefixes (inside the request limits) describe themselves in ~64 KiB;
// ModelInfo.dtype carries at most 1 KiB of it, while loading and once READY. Before: 64,519
// bytes in each, for every caller of ListModels.
TEST_F(ModelCacheTest, AModelInfoCarriesAtMostAKibibyteOfDtypes) {
  ModelCache cache({});
  LoadSpec spec = Spec("tiny", "many");
  for (int i = 0; i < 1024; ++i) {
    spec.dtype_overrides[absl::StrCat(std::string(56, 'p'), i)] = "bfloat16";
  }
  absl::StatusOr<LoadResult> r = LoadNow(cache, spec);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_LE(r->model.dtype.size(), 1024u);
  EXPECT_NE(r->model.dtype.find("more overrides"), std::string::npos) << r->model.dtype;
  std::vector<ModelInfo> all = cache.List();
  ASSERT_EQ(all.size(), 1u);
  EXPECT_LE(all[0].dtype.size(), 1024u);
  EXPECT_EQ(all[0].dtype.rfind("default=keep;", 0), 0u) << all[0].dtype;
}

// Issue 17 item 3: an Infer the reply limit cannot carry is refused before it is queued, in
// milliseconds, where the same request without the limit computes for seconds and replies 4
// MiB (the negative control below). Batch and input-bytes limits likewise.
TEST_F(ModelCacheTest, AnInferItCannotAffordIsRefusedBeforeComputing) {
  ModelCache::Options options;
  options.infer_limits.max_reply_bytes = 2 << 20;
  ModelCache limited(options);
  ASSERT_TRUE(LoadNow(limited, Spec("medium", "m")).ok());
  std::vector<WireTensor> input = MlpInput(1024, 1024);  // built before the clock starts
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<WireTensor>> refused = InferNow(limited, "m", std::move(input));
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
  EXPECT_NE(refused.status().message().find("the reply would take 4.0 MiB"), std::string::npos)
      << refused.status();
  // A sanitizer slows everything tenfold or more; infer_count below is the proof either way.
  EXPECT_LT(ms, UnderSanitizer() ? 1000.0 : 100.0);
  EXPECT_EQ(limited.Get("m")->infer_count, 0) << "it ran";
  // Inside the limit it runs: the rule does not refuse what fits.
  absl::StatusOr<std::vector<WireTensor>> small = InferNow(limited, "m", MlpInput(64, 1024));
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_EQ(small->front().raw_data.size(), 64u * 1024 * 4);

  ModelCache::Options per_input;
  per_input.infer_limits.max_batch = 32;
  per_input.infer_limits.max_input_bytes = 1 << 20;
  ModelCache strict(per_input);
  ASSERT_TRUE(LoadNow(strict, Spec("medium", "m")).ok());
  absl::StatusOr<std::vector<WireTensor>> batch = InferNow(strict, "m", MlpInput(33, 16));
  EXPECT_TRUE(absl::IsResourceExhausted(batch.status())) << batch.status();
  EXPECT_NE(batch.status().message().find("a batch of 33; at most 32"), std::string::npos)
      << batch.status();
  absl::StatusOr<std::vector<WireTensor>> bytes = InferNow(strict, "m", MlpInput(32, 16384));
  EXPECT_TRUE(absl::IsResourceExhausted(bytes.status())) << bytes.status();
  EXPECT_NE(bytes.status().message().find("inputs of 2.0 MiB; at most 1.0 MiB"), std::string::npos)
      << bytes.status();

  // Negative control: without limits the 4 MiB request runs to the end.
  ModelCache unlimited({});
  ASSERT_TRUE(LoadNow(unlimited, Spec("medium", "m")).ok());
  absl::StatusOr<std::vector<WireTensor>> ran = InferNow(unlimited, "m", MlpInput(1024, 1024));
  ASSERT_TRUE(ran.ok()) << ran.status();
  EXPECT_EQ(ran->front().raw_data.size(), 4u << 20);
}

// Issue 17 item 6c: freeing a model (hundreds of MiB and a malloc_trim) happens on the cache's
// release thread, never on the caller's (a gRPC thread for Unload), nor on the load thread that
// evicts it under the cache's lock. Before the fix both frees ran right there: the Unload
// caller's thread, and the evicting load's thread inside the lock.
class FreeObserver : public CacheObserver {
 public:
  void OnModelFreed(const std::string& device, int64_t bytes, double) override {
    std::lock_guard<std::mutex> lock(mu);
    frees.push_back({std::this_thread::get_id(), bytes});
    cv.notify_all();
  }
  bool WaitForFrees(size_t n) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, 30s, [&] { return frees.size() >= n; });
  }
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<std::thread::id, int64_t>> frees;
};

// The load pool as a liveness probe sees it (issue 17, item 4): which loads hold the threads,
// for how long, and how many wait. The first load is held in its "build" progress event (on its
// load thread), so the timing is fixed.
TEST_F(ModelCacheTest, ActivityShowsWhatHoldsTheLoadThreads) {
  ModelCache::Options options;
  options.load_threads = 1;
  ModelCache cache(options);
  EXPECT_EQ(cache.Activity().threads, 1);
  EXPECT_TRUE(cache.Activity().running.empty());
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> holding{false};
  std::promise<absl::StatusOr<LoadResult>> first, second;
  auto held = cache.Load(
      Spec("tiny", "held"),
      [&](const LoadProgressEvent& e) {
        if (e.phase != "build") return;
        holding = true;
        released.wait();
      },
      [&](absl::StatusOr<LoadResult> r) { first.set_value(std::move(r)); });
  for (int i = 0; i < 1000 && !holding; ++i) std::this_thread::sleep_for(5ms);
  ASSERT_TRUE(holding);
  auto waiting = cache.Load(Spec("medium", "waiting"), nullptr,
                            [&](absl::StatusOr<LoadResult> r) { second.set_value(std::move(r)); });
  std::this_thread::sleep_for(200ms);
  ModelCache::LoadActivity a = cache.Activity();
  EXPECT_EQ(a.threads, 1);
  ASSERT_EQ(a.running.size(), 1u);
  EXPECT_EQ(a.running[0].model_id, "held");
  EXPECT_EQ(a.running[0].display_path, "tiny");
  EXPECT_GE(a.running[0].seconds, 0.2);
  EXPECT_LT(a.running[0].seconds, 30.0);
  EXPECT_EQ(a.queued, 1);
  release.set_value();
  EXPECT_TRUE(first.get_future().get().ok());
  EXPECT_TRUE(second.get_future().get().ok());
  // The flight leaves the books before its callers hear it is done.
  a = cache.Activity();
  EXPECT_TRUE(a.running.empty());
  EXPECT_EQ(a.queued, 0);
  EXPECT_EQ(a.infers_running, 0);
}

TEST_F(ModelCacheTest, ModelsAreFreedOffTheCallersThreadAndOutsideTheLock) {
  ASSERT_TRUE(SynthesizeMedium("free_b", 11));
  FreeObserver observer;
  ModelCache::Options options = OneMediumBudget();
  options.observer = &observer;
  ModelCache cache(options);

  // Unload: returns at once, the model goes on another thread.
  ASSERT_TRUE(LoadNow(cache, Spec("medium", "a")).ok());
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(cache.Unload("a").ok());
  const double unload_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(observer.WaitForFrees(1));
  EXPECT_NE(observer.frees[0].first, std::this_thread::get_id()) << "freed on the Unload caller";
  EXPECT_GT(observer.frees[0].second, 100 << 20);
  EXPECT_LT(unload_ms, 20.0);

  // Eviction: b needs a's room; a is freed, but not by b's load thread under the lock.
  ASSERT_TRUE(LoadNow(cache, Spec("medium", "a")).ok());
  std::thread::id load_thread;
  std::promise<absl::StatusOr<LoadResult>> done;
  cache.Load(
      Spec("free_b", "b"),
      [&](const LoadProgressEvent&) { load_thread = std::this_thread::get_id(); },
      [&](absl::StatusOr<LoadResult> r) { done.set_value(std::move(r)); });
  absl::StatusOr<LoadResult> b = done.get_future().get();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_TRUE(observer.WaitForFrees(2));
  EXPECT_NE(observer.frees[1].first, load_thread) << "freed by the evicting load, under the lock";
  EXPECT_NE(observer.frees[1].first, std::this_thread::get_id());
  EXPECT_EQ(observer.frees[1].first, observer.frees[0].first) << "one release thread";
}

}  // namespace
}  // namespace metaload::cache
