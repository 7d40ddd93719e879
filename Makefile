# metaload — the two commands a newcomer needs are `make run` and `make test`.
# Everything else is for contributors. See README.md.

BUILD_DIR   ?= build
BUILD_TYPE  ?= RelWithDebInfo
CMAKE_FLAGS ?=
JOBS        ?= $(shell nproc)
MODEL_ROOT  ?= var/models
LISTEN      ?= 127.0.0.1:50051
METRICS     ?= 127.0.0.1:9464
FUZZ_SECONDS ?= 600
CI_FUZZ_SECONDS ?= 60
SOAK_CYCLES ?= 500
# Sanitizer builds: fast to compile (-O1, line tables only), separate from build/.
SANITIZER_CMAKE = -G Ninja -DCMAKE_BUILD_TYPE=Sanitize "-DCMAKE_CXX_FLAGS=-O1 -g1"
ASAN_DIR ?= build-asan
TSAN_DIR ?= build-tsan
# What the sanitizer runs cover (README "Reliability" says why these). CI: the core, cache and
# architecture tests under ASan+UBSan, the cache's concurrency tests under TSan. `make asan ASAN_SERVICE=ON`
# adds the gRPC service and its end-to-end tests (an ASan daemon; about 4 more minutes).
ASAN_SERVICE ?= OFF
ASAN_CORE_TESTS = CheckpointTest|Float8Test|ModelRootsTest|ThreadPoolTest|ShardedFailureTest|CheckpointSourceTest|PickleReaderTest|PickleMemoryTest|ChecksumStoreTest|HalfTest|InitContextTest|LayerKitTest|LoaderTest|WeightCastTest|SafetensorsHeaderTest|SafetensorsWriterTest|ModelCacheTest|CacheBudgetTest|Families/ArchitectureTest|Sd1Test|Checkpoints/Sd1ReferenceTest
ifeq ($(ASAN_SERVICE),ON)
ASAN_TARGETS = metaload_core_tests metaload_cache_tests metaload_models_tests metaload_e2e_tests
ASAN_TESTS ?= ^($(ASAN_CORE_TESTS)|ServiceTest|ServiceBudgetTest|ServiceAuthTest|DaemonTest)\.
else
ASAN_TARGETS = metaload_core_tests metaload_cache_tests metaload_models_tests
ASAN_TESTS ?= ^($(ASAN_CORE_TESTS))\.
endif
TSAN_TESTS ?= ^ModelCacheTest\.

.PHONY: all deps configure build run test bench fuzz soak sanitize asan tsan format clean

all: build

deps:
	@./deploy/install-deps.sh

$(BUILD_DIR)/build.ninja:
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) $(CMAKE_FLAGS)

configure: deps $(BUILD_DIR)/build.ninja

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

# Generates the demo model root (if missing) with metaload's own synthesizer, then serves it in
# the foreground. Ctrl-C stops the daemon cleanly.
run: build
	@bash deploy/demo-models.sh $(BUILD_DIR)/client/metaload $(MODEL_ROOT)
	@echo ""
	@echo "metaloadd: gRPC on $(LISTEN), metrics on http://$(METRICS)/metrics, models in $(MODEL_ROOT)/"
	@echo "  try:  $(BUILD_DIR)/client/metaload health --address=$(LISTEN)"
	@echo "        grpcurl -plaintext -d '{\"path\": \"demo-gpt2\"}' $(LISTEN) metaload.v1.ModelLoader/LoadModel"
	@echo "        curl -s http://$(METRICS)/metrics | grep ^metaload_"
	@echo ""
	@exec $(BUILD_DIR)/server/metaloadd --listen=$(LISTEN) --metrics_listen=$(METRICS) --model_root=$(MODEL_ROOT) --state_dir=var/state

# A fixed-seed slice of every fuzzer, the unit, e2e and reference tests (with a 50-cycle soak),
# then the same core, cache and service tests under ASan+UBSan and the cache's races under TSan.
test: build
	@./tests/fuzz/run.sh $(CI_FUZZ_SECONDS) build-fuzz
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)
	@$(MAKE) --no-print-directory sanitize

sanitize: asan tsan

asan: deps
	cmake -S . -B $(ASAN_DIR) $(SANITIZER_CMAKE) -DMETALOAD_SANITIZE=address -DMETALOAD_BUILD_SERVICE=$(ASAN_SERVICE) > $(ASAN_DIR).configure.log
	cmake --build $(ASAN_DIR) -j $(JOBS) --target $(ASAN_TARGETS)
	cd $(ASAN_DIR) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --output-on-failure -j $(JOBS) -R '$(ASAN_TESTS)'

tsan: deps
	cmake -S . -B $(TSAN_DIR) $(SANITIZER_CMAKE) -DMETALOAD_SANITIZE=thread -DMETALOAD_BUILD_SERVICE=OFF > $(TSAN_DIR).configure.log
	cmake --build $(TSAN_DIR) -j $(JOBS) --target metaload_cache_tests
	cd $(TSAN_DIR) && TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$(CURDIR)/tests/tsan.supp" OMP_NUM_THREADS=1 \
	  ctest --output-on-failure -j $(JOBS) -R '$(TSAN_TESTS)'

# 500 load/unload cycles of a ~160 MiB model under Infer traffic; prints RSS, fds, threads.
soak: build
	@$(BUILD_DIR)/tests/soak --cycles=$(SOAK_CYCLES)

# Benchmarks print ratios and figures; see README "Performance" for the recorded table.
bench: build
	cmake --build $(BUILD_DIR) -j $(JOBS) --target load_bench infer_bench
	@$(BUILD_DIR)/tests/bench/parse_bench
	@$(BUILD_DIR)/tests/bench/load_bench --dir=$(BUILD_DIR)/bench-data
	@$(BUILD_DIR)/tests/bench/load_bench --model=sd1 --dir=$(BUILD_DIR)/bench-data
	@$(BUILD_DIR)/tests/bench/infer_bench --daemon=$(BUILD_DIR)/server/metaloadd --cli=$(BUILD_DIR)/client/metaload

# Long fuzzing: make fuzz FUZZ_SECONDS=3600 (per target).
fuzz: deps
	@./tests/fuzz/run.sh $(FUZZ_SECONDS) build-fuzz

format:
	@find server client tests -name '*.h' -o -name '*.cc' | xargs clang-format -i --style=file
	@echo "formatted"

clean:
	rm -rf $(BUILD_DIR) build-fuzz build-fuzz.configure.log $(ASAN_DIR) $(TSAN_DIR) $(ASAN_DIR).configure.log $(TSAN_DIR).configure.log
