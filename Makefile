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
# What the sanitizer runs cover is said by CTest labels in tests/CMakeLists.txt (asan, tsan,
# asan_service), so a new suite cannot escape them. `make asan ASAN_SERVICE=ON` adds the gRPC
# service and its end-to-end tests (an ASan daemon; about 4 more minutes).
ASAN_SERVICE ?= OFF
ifeq ($(ASAN_SERVICE),ON)
ASAN_TARGETS = metaload_core_tests metaload_concurrency_tests metaload_cache_tests metaload_models_tests metaload_service_tests metaload_e2e_tests
ASAN_LABELS = ^asan
else
ASAN_TARGETS = metaload_core_tests metaload_concurrency_tests metaload_cache_tests metaload_models_tests
ASAN_LABELS = ^asan$$
endif
TSAN_TARGETS = metaload_concurrency_tests metaload_cache_tests

.PHONY: all deps configure build run test bench fuzz soak sanitize asan tsan thread-safety format format-check clean

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

# The format and thread-safety checks, a fixed-seed slice of every fuzzer, the unit, e2e and
# reference tests (with a 50-cycle soak), then the core, cache and model tests under
# ASan+UBSan and the concurrent ones under TSan.
test: build
	@$(MAKE) --no-print-directory format-check thread-safety
	@./tests/fuzz/run.sh $(CI_FUZZ_SECONDS) build-fuzz
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)
	@$(MAKE) --no-print-directory sanitize

sanitize: asan tsan

asan: deps
	cmake -S . -B $(ASAN_DIR) $(SANITIZER_CMAKE) -DMETALOAD_SANITIZE=address -DMETALOAD_BUILD_SERVICE=$(ASAN_SERVICE) > $(ASAN_DIR).configure.log
	cmake --build $(ASAN_DIR) -j $(JOBS) --target $(ASAN_TARGETS)
	cd $(ASAN_DIR) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --output-on-failure -j $(JOBS) -L '$(ASAN_LABELS)'

tsan: deps
	cmake -S . -B $(TSAN_DIR) $(SANITIZER_CMAKE) -DMETALOAD_SANITIZE=thread -DMETALOAD_BUILD_SERVICE=OFF > $(TSAN_DIR).configure.log
	cmake --build $(TSAN_DIR) -j $(JOBS) --target $(TSAN_TARGETS)
	cd $(TSAN_DIR) && TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$(CURDIR)/tests/tsan.supp" OMP_NUM_THREADS=1 \
	  ctest --output-on-failure -j $(JOBS) -L '^tsan$$'

# clang's thread-safety analysis (-Werror=thread-safety) over every file that uses the annotated
# core::Mutex, with the build's own compile commands (server/core/mutex.h says why).
thread-safety: configure
	@/usr/bin/python3 tests/tools/thread_safety_check.py $(BUILD_DIR) clang++-14

# 500 load/unload cycles of a ~160 MiB model under Infer traffic; prints RSS, fds, threads.
soak: build
	@$(BUILD_DIR)/tests/soak --cycles=$(SOAK_CYCLES)

# Benchmarks print ratios and figures; see README "Performance" for the recorded table.
bench: build
	cmake --build $(BUILD_DIR) -j $(JOBS) --target load_bench infer_bench
	@$(BUILD_DIR)/tests/bench/parse_bench
	@$(BUILD_DIR)/tests/bench/load_bench --dir=$(BUILD_DIR)/bench-data
	@$(BUILD_DIR)/tests/bench/load_bench --model=sd1 --dir=$(BUILD_DIR)/bench-data
	@$(BUILD_DIR)/tests/bench/load_bench --model=sdxl --dir=$(BUILD_DIR)/bench-data
	@$(BUILD_DIR)/tests/bench/infer_bench --daemon=$(BUILD_DIR)/server/metaloadd --cli=$(BUILD_DIR)/client/metaload
	@/usr/bin/python3 tests/bench/switch_bench.py $(BUILD_DIR)/server/metaloadd $(BUILD_DIR)/client/metaload . $(BUILD_DIR)/python --dir=$(BUILD_DIR)/bench-data

# Long fuzzing: make fuzz FUZZ_SECONDS=3600 (per target).
fuzz: deps
	@./tests/fuzz/run.sh $(FUZZ_SECONDS) build-fuzz

format:
	@find server client tests -name '*.h' -o -name '*.cc' | xargs clang-format -i --style=file
	@echo "formatted"

# Fails naming every C++ file that `make format` would change.
format-check:
	@find server client tests \( -name '*.h' -o -name '*.cc' \) -print0 | \
	  xargs -0 clang-format --style=file --dry-run --Werror
	@echo "format-check: clean"

clean:
	rm -rf $(BUILD_DIR) build-fuzz build-fuzz.configure.log $(ASAN_DIR) $(TSAN_DIR) $(ASAN_DIR).configure.log $(TSAN_DIR).configure.log
