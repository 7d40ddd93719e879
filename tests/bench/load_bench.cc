// Benchmark (a program, not a test): loading a GPT-2-medium-sized checkpoint (~1.4 GB fp32,
// 292 tensors) onto the CPU, against a floor and a naive LibTorch load measured in the same run.
// Each mode runs in its own child process (fresh address space, honest RSS), page cache warm,
// median of 5.
//
//   floor      2-thread pread of the same bytes into fresh memory
//   floor_thp  the same with transparent huge pages requested, as the loader does
//   naive      build with torch::nn modules (init on CPU), then copy the weights in
//   metaload   meta skeleton + streaming loader: keep dtype / fp32->bf16 / zero_copy
//
// With --model=sd1: a full-size synthetic Stable Diffusion 1.x checkpoint (4.3 GB fp32, the v1
// key set), loaded with the web UI's dtype policy (UNet and text encoder float16, VAE as
// stored) through the sd1 architecture, against the same floor and a naive load that does what
// a LibTorch program without the meta device does: allocate and initialise every tensor in
// float32, copy the checkpoint in, then convert the UNet and text encoder to float16. A last
// row loads the UNet's matmul and convolution weights as float8_e4m3fn (text encoder float16).
//
// With --model=sdxl: the same for a full-size synthetic SDXL base checkpoint stored in float16
// (6.9 GB, as SDXL files are shared), web UI dtypes (the VAE converted to float32); the naive
// load allocates float32 as LibTorch modules do and halves all but the VAE.
//
// Usage: load_bench [--model=gpt2|sd1|sdxl] [--dir=DIR] [--runs=N]
//        (writes DIR/gpt2-medium.safetensors, 1.4 GB, DIR/sd1-full/model.safetensors, 4.3 GB,
//        or DIR/sdxl-full/model.safetensors, 6.9 GB, once)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/core/checkpoint.h"
#include "server/core/init_context.h"
#include "server/core/loader.h"
#include "server/core/module.h"
#include "server/core/process_memory.h"
#include "server/core/safetensors_writer.h"
#include "server/core/torch_types.h"
#include "server/models/registry.h"
#include "server/models/synth.h"

namespace {

using Clock = std::chrono::steady_clock;
using metaload::core::DType;

struct Spec {
  std::string name;
  std::vector<int64_t> shape;
};

// GPT-2 medium: 24 layers, width 1024, vocabulary 50257, 1024 positions.
std::vector<Spec> Gpt2Medium() {
  const int64_t d = 1024, v = 50257, p = 1024;
  std::vector<Spec> out = {{"wte.weight", {v, d}}, {"wpe.weight", {p, d}}};
  for (int i = 0; i < 24; ++i) {
    const std::string h = absl::StrCat("h.", i, ".");
    for (const Spec& s : std::vector<Spec>{{"ln_1.weight", {d}},
                                           {"ln_1.bias", {d}},
                                           {"attn.c_attn.weight", {3 * d, d}},
                                           {"attn.c_attn.bias", {3 * d}},
                                           {"attn.c_proj.weight", {d, d}},
                                           {"attn.c_proj.bias", {d}},
                                           {"ln_2.weight", {d}},
                                           {"ln_2.bias", {d}},
                                           {"mlp.c_fc.weight", {4 * d, d}},
                                           {"mlp.c_fc.bias", {4 * d}},
                                           {"mlp.c_proj.weight", {d, 4 * d}},
                                           {"mlp.c_proj.bias", {d}}}) {
      out.push_back({h + s.name, s.shape});
    }
  }
  out.push_back({"ln_f.weight", {d}});
  out.push_back({"ln_f.bias", {d}});
  return out;
}

// The kit model: one parameter per spec, on meta.
class SpecModule : public metaload::core::Module {
 public:
  explicit SpecModule(const std::vector<Spec>& specs) {
    for (const Spec& s : specs) AddParameter(s.name, s.shape, nullptr);
  }
};

// The same model with torch::nn modules, initialised on CPU as a plain LibTorch program would.
struct NaiveGpt2 : torch::nn::Module {
  NaiveGpt2() {
    const int64_t d = 1024;
    register_module("wte", torch::nn::Embedding(50257, d));
    register_module("wpe", torch::nn::Embedding(1024, d));
    auto h = std::make_shared<torch::nn::Module>();
    for (int i = 0; i < 24; ++i) {
      auto block = std::make_shared<torch::nn::Module>();
      block->register_module("ln_1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
      auto attn = std::make_shared<torch::nn::Module>();
      attn->register_module("c_attn", torch::nn::Linear(d, 3 * d));
      attn->register_module("c_proj", torch::nn::Linear(d, d));
      block->register_module("attn", attn);
      block->register_module("ln_2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
      auto mlp = std::make_shared<torch::nn::Module>();
      mlp->register_module("c_fc", torch::nn::Linear(d, 4 * d));
      mlp->register_module("c_proj", torch::nn::Linear(4 * d, d));
      block->register_module("mlp", mlp);
      h->register_module(std::to_string(i), block);
    }
    register_module("h", h);
    register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
  }
};

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Runs one mode in this (child) process; prints "seconds peak_host_bytes".
int RunMode(const std::string& mode, const std::string& path) {
  const int64_t baseline = metaload::core::ReadProcessMemory()->rss_bytes;
  metaload::core::ResetPeakRss();
  const auto start = Clock::now();
  auto source = metaload::core::CheckpointSource::Open(path);
  if (!source.ok()) {
    std::fprintf(stderr, "%s\n", source.status().ToString().c_str());
    return 1;
  }
  const auto& index = (*source)->index();
  if (mode == "floor" || mode == "floor_thp") {
    const uint64_t total = index.files[0].size - index.tensors.front().offset;
    char* dst = static_cast<char*>(std::malloc(total));
    if (mode == "floor_thp") {
      const uintptr_t huge = 2 << 20;
      const uintptr_t b = (reinterpret_cast<uintptr_t>(dst) + huge - 1) & ~(huge - 1);
      const uintptr_t e = (reinterpret_cast<uintptr_t>(dst) + total) & ~(huge - 1);
      ::madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
    }
    int fd = ::open(path.c_str(), O_RDONLY);
    auto read_part = [&](uint64_t begin, uint64_t end) {
      for (uint64_t off = begin; off < end;) {
        ssize_t n = ::pread(fd, dst + off, std::min<uint64_t>(end - off, 16 << 20),
                            static_cast<off_t>(index.tensors.front().offset + off));
        if (n <= 0) break;
        off += static_cast<uint64_t>(n);
      }
    };
    std::thread t(read_part, 0, total / 2);
    read_part(total / 2, total);
    t.join();
    ::close(fd);
    std::printf(
        "%.6f %lld\n", Seconds(start),
        static_cast<long long>(metaload::core::ReadProcessMemory()->peak_rss_bytes - baseline));
    std::free(dst);
    return 0;
  }
  if (mode == "sd_naive") {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> model;
    std::vector<char> buffer;
    for (const auto& t : index.tensors) {
      const bool ints = t.dtype == DType::kInt64;
      torch::Tensor w = torch::empty(t.shape, ints ? torch::kLong : torch::kFloat);
      if (!ints) w.uniform_(-0.05, 0.05);  // the modules' own initialisation
      buffer.resize(t.nbytes);
      if (!(*source)->Read(t, 0, t.nbytes, buffer.data()).ok()) return 3;
      const auto stored = t.dtype == DType::kFloat16 ? torch::kHalf : w.scalar_type();
      w.copy_(torch::from_blob(buffer.data(), t.shape, stored));
      model.push_back(w);
    }
    for (size_t i = 0; i < model.size(); ++i) {  // model.half(), VAE and alphas_cumprod kept
      const std::string& name = index.tensors[i].name;
      if (model[i].is_floating_point() && name.rfind("first_stage_model.", 0) != 0 &&
          name.rfind("alphas_cumprod", 0) != 0) {
        model[i] = model[i].to(torch::kHalf);
      }
    }
  } else if (mode == "sd" || mode == "sd_fp8") {
    auto model = metaload::models::BuildModel("", index);
    if (!model.ok()) {
      std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
      return 4;
    }
    metaload::core::LoadOptions options;  // sd: no dtype named, the web UI's policy
    const std::map<std::string, std::string> fp8 = {{"model.diffusion_model.", "float8_e4m3fn"},
                                                    {"cond_stage_model.", "float16"}};
    options.policy = *metaload::models::EffectivePolicy(
        **model, "", mode == "sd_fp8" ? fp8 : std::map<std::string, std::string>());
    auto report = (*model)->Load(**source, options, {});
    if (!report.ok()) {
      std::fprintf(stderr, "%s\n", report.status().ToString().c_str());
      return 4;
    }
    std::printf(
        "%.6f %lld %llu\n", Seconds(start),
        static_cast<long long>(metaload::core::ReadProcessMemory()->peak_rss_bytes - baseline),
        static_cast<unsigned long long>((*model)->ResidentBytes()));
    return 0;
  } else if (mode == "naive") {
    torch::NoGradGuard no_grad;
    NaiveGpt2 model;
    std::vector<char> buffer;
    for (auto& item : model.named_parameters()) {
      const auto* t = index.Find(item.key());
      if (t == nullptr) return 2;
      buffer.resize(t->nbytes);
      if (!(*source)->Read(*t, 0, t->nbytes, buffer.data()).ok()) return 3;
      item.value().copy_(torch::from_blob(buffer.data(), t->shape, torch::kFloat));
    }
  } else {
    std::unique_ptr<SpecModule> model;
    {
      metaload::core::InitializeOnMeta meta;
      model = std::make_unique<SpecModule>(Gpt2Medium());
    }
    metaload::core::LoadOptions options;
    if (mode == "bf16" || mode == "cuda_bf16") {
      options.policy = *metaload::core::DtypePolicy::Create("bfloat16", {});
    }
    if (mode == "cuda_keep" || mode == "cuda_bf16") options.device = c10::Device("cuda:0");
    if (mode == "zero_copy") options.zero_copy = true;
    auto report = metaload::core::LoadModule(*model, **source, options);
    if (!report.ok()) {
      std::fprintf(stderr, "%s\n", report.status().ToString().c_str());
      return 4;
    }
  }
  std::printf(
      "%.6f %lld\n", Seconds(start),
      static_cast<long long>(metaload::core::ReadProcessMemory()->peak_rss_bytes - baseline));
  return 0;
}

struct Figures {
  double seconds;
  double peak_bytes;
};

Figures Median(const char* self, const std::string& mode, const std::string& path, int runs) {
  std::vector<double> secs, peaks;
  for (int i = 0; i < runs; ++i) {
    std::string cmd = absl::StrCat(self, " --mode=", mode, " --path=", path);
    FILE* p = ::popen(cmd.c_str(), "r");
    double s = 0;
    long long peak = 0;
    if (p == nullptr || std::fscanf(p, "%lf %lld", &s, &peak) != 2) {
      std::fprintf(stderr, "load_bench: mode %s failed\n", mode.c_str());
      std::exit(1);
    }
    ::pclose(p);
    secs.push_back(s);
    peaks.push_back(static_cast<double>(peak));
  }
  std::sort(secs.begin(), secs.end());
  std::sort(peaks.begin(), peaks.end());
  return {secs[secs.size() / 2], peaks[peaks.size() / 2]};
}

}  // namespace

using RowPrinter = std::function<void(const char*, const Figures&, const std::string&)>;

// Prints the table's header; the rows it returns give seconds as a ratio to `floor`'s.
RowPrinter Table(const Figures& floor) {
  std::printf("%-34s %9s %10s %12s %s\n", "row", "seconds", "x floor", "peak MiB", "target");
  return [floor](const char* name, const Figures& f, const std::string& target) {
    std::printf("%-34s %9.3f %10.2f %12.0f %s\n", name, f.seconds, f.seconds / floor.seconds,
                f.peak_bytes / (1 << 20), target.c_str());
  };
}

void WarmPageCache(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  std::vector<char> buf(16 << 20);
  while (::read(fd, buf.data(), buf.size()) > 0) {
  }
  ::close(fd);
}

// --model=sd1 or sdxl.
int SdBench(const char* self, const std::string& dir, int runs, const std::string& arch) {
  const bool xl = arch == "sdxl";
  const std::string path = dir + "/" + arch + "-full/model.safetensors";
  if (!std::filesystem::exists(path)) {
    std::fprintf(stderr, "load_bench: writing %s ...\n", path.c_str());
    metaload::models::SynthOptions options;
    options.architecture = arch;
    options.preset = "full";
    if (xl) options.dtype = "float16";
    auto written = metaload::models::Synthesize(options, dir + "/" + arch + "-full");
    if (!written.ok()) {
      std::fprintf(stderr, "%s\n", written.status().ToString().c_str());
      return 1;
    }
  }
  WarmPageCache(path);
  // The loaded model's bytes, from a run of its own.
  auto loaded_bytes = [&](const char* mode) {
    FILE* p = ::popen(absl::StrCat(self, " --mode=", mode, " --path=", path).c_str(), "r");
    double s = 0;
    long long peak = 0;
    unsigned long long bytes = 0;
    if (p == nullptr || std::fscanf(p, "%lf %lld %llu", &s, &peak, &bytes) != 3) {
      std::fprintf(stderr, "load_bench: mode %s failed\n", mode);
      std::exit(1);
    }
    ::pclose(p);
    return static_cast<double>(bytes);
  };
  const double model_bytes = loaded_bytes("sd");
  const double file_bytes = static_cast<double>(std::filesystem::file_size(path));
  const Figures floor = Median(self, "floor", path, runs);
  const Figures floor_thp = Median(self, "floor_thp", path, runs);
  const Figures naive = Median(self, "sd_naive", path, runs);
  const Figures ours = Median(self, "sd", path, runs);
  // SDXL's target is the issue's: 1.1 x the floor (a float16 file, little to convert).
  const double target = xl ? 1.1 : 1.4;
  std::printf(
      "load benchmark: Stable Diffusion %s, full shapes, %.2f GB %s file, web UI dtypes "
      "(%.2f GB loaded), median of %d, one process per run\n",
      xl ? "XL base" : "1.x", file_bytes / 1e9, xl ? "fp16" : "fp32", model_bytes / 1e9, runs);
  const RowPrinter row = Table(floor);
  row("floor: 2-thread pread", floor, "reference");
  row("floor with huge pages (madvise)", floor_thp, "what metaload's destinations get");
  row("naive LibTorch (init, copy, half)", naive, "");
  row(absl::StrCat("metaload ", arch, ", web UI dtypes").c_str(), ours,
      absl::StrFormat("<= %.1f x floor: %s; naive/metaload = %.1f", target,
                      ours.seconds <= target * floor.seconds ? "yes" : "NO",
                      naive.seconds / ours.seconds));
  std::printf(
      "peak host bytes: %.0f MiB for a %.0f MiB loaded model (<= model + 96 MiB: %s; naive: "
      "%.0f MiB)\n",
      ours.peak_bytes / (1 << 20), model_bytes / (1 << 20),
      ours.peak_bytes <= model_bytes + (96 << 20) ? "yes" : "NO", naive.peak_bytes / (1 << 20));
  if (xl) return 0;
  const double fp8_bytes = loaded_bytes("sd_fp8");
  const Figures fp8 = Median(self, "sd_fp8", path, runs);
  row("metaload sd1, UNet float8_e4m3fn", fp8,
      absl::StrFormat("<= 1.4 x floor: %s", fp8.seconds <= 1.4 * floor.seconds ? "yes" : "NO"));
  std::printf(
      "UNet in float8: %.0f MiB loaded (%.2f x the web UI dtypes), peak %.0f MiB (<= model + "
      "96 MiB: %s)\n",
      fp8_bytes / (1 << 20), fp8_bytes / model_bytes, fp8.peak_bytes / (1 << 20),
      fp8.peak_bytes <= fp8_bytes + (96 << 20) ? "yes" : "NO");
  return 0;
}

int main(int argc, char** argv) {
  std::string dir = "build/bench-data", mode, path, model = "gpt2";
  int runs = 5;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--dir=", 0) == 0) dir = a.substr(6);
    if (a.rfind("--runs=", 0) == 0) runs = std::stoi(a.substr(7));
    if (a.rfind("--mode=", 0) == 0) mode = a.substr(7);
    if (a.rfind("--path=", 0) == 0) path = a.substr(7);
    if (a.rfind("--model=", 0) == 0) model = a.substr(8);
  }
  if (!mode.empty()) return RunMode(mode, path);
  if (model == "sd1" || model == "sdxl") return SdBench(argv[0], dir, runs, model);
  if (model != "gpt2") {
    std::fprintf(stderr, "load_bench: --model must be gpt2, sd1 or sdxl\n");
    return 2;
  }

  std::filesystem::create_directories(dir);
  path = dir + "/gpt2-medium.safetensors";
  const std::vector<Spec> specs = Gpt2Medium();
  if (!std::filesystem::exists(path)) {
    std::fprintf(stderr, "load_bench: writing %s ...\n", path.c_str());
    metaload::core::SafetensorsWriter w;
    for (size_t i = 0; i < specs.size(); ++i) {
      (void)w.Add(specs[i].name, DType::kFloat32, specs[i].shape,
                  [i](char* d, int64_t off, int64_t n) {
                    for (int64_t b = 0; b < n; b += 4) {
                      float v = static_cast<float>(((off + b) / 4 + i) % 97) / 97.0f - 0.5f;
                      std::memcpy(d + b, &v, 4);
                    }
                  });
    }
    if (!w.Write(path).ok()) return 1;
  }
  WarmPageCache(path);
  const double model_bytes = static_cast<double>(std::filesystem::file_size(path));
  const Figures floor = Median(argv[0], "floor", path, runs);
  const Figures floor_thp = Median(argv[0], "floor_thp", path, runs);
  const Figures naive = Median(argv[0], "naive", path, runs);
  const Figures keep = Median(argv[0], "keep", path, runs);
  const Figures bf16 = Median(argv[0], "bf16", path, runs);
  const Figures zero = Median(argv[0], "zero_copy", path, runs);

  std::printf(
      "load benchmark: GPT-2 medium shapes, %zu tensors, %.2f GB fp32, median of %d, "
      "one process per run\n",
      specs.size(), model_bytes / 1e9, runs);
  const RowPrinter row = Table(floor);
  row("floor: 2-thread pread", floor, "reference");
  row("floor with huge pages (madvise)", floor_thp, "what metaload's destinations get");
  row("naive LibTorch (init + copy)", naive, "");
  row("metaload cpu, keep dtype", keep,
      absl::StrFormat("<= 1.1 x floor: %s; naive/metaload = %.1f (>= 4: %s)",
                      keep.seconds <= 1.1 * floor.seconds ? "yes" : "NO",
                      naive.seconds / keep.seconds,
                      naive.seconds >= 4 * keep.seconds ? "yes" : "NO"));
  row("metaload cpu, fp32 -> bf16", bf16,
      absl::StrFormat("<= 1.4 x floor: %s", bf16.seconds <= 1.4 * floor.seconds ? "yes" : "NO"));
  row("metaload cpu, zero_copy", zero,
      absl::StrFormat("<= 20 ms: %s", zero.seconds <= 0.020 ? "yes" : "NO"));
  if (metaload::core::CudaAvailable()) {
    // The GPU rows: host peak is the staging ring, not the model.
    row("metaload cuda:0, keep dtype", Median(argv[0], "cuda_keep", path, runs),
        "host peak: the staging ring");
    row("metaload cuda:0, fp32 -> bf16", Median(argv[0], "cuda_bf16", path, runs),
        "conversion on the GPU");
  } else {
    std::printf("(no CUDA device: the cuda:0 rows are skipped)\n");
  }
  std::printf(
      "peak host bytes, copy mode: %.0f MiB for a %.0f MiB model (<= model + 96 MiB: %s; "
      "naive: %.0f MiB)\n",
      keep.peak_bytes / (1 << 20), model_bytes / (1 << 20),
      keep.peak_bytes <= model_bytes + (96 << 20) ? "yes" : "NO", naive.peak_bytes / (1 << 20));
  return 0;
}
