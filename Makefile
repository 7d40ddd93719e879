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

.PHONY: all deps configure build run test bench fuzz format clean

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

# A fixed-seed slice of every fuzzer, then the unit, e2e and reference tests.
test: build
	@./tests/fuzz/run.sh $(CI_FUZZ_SECONDS) build-fuzz
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

# Benchmarks print ratios and figures; see README "Performance" for the recorded table.
bench: build
	@$(BUILD_DIR)/tests/bench/parse_bench
	@$(BUILD_DIR)/tests/bench/load_bench --dir=$(BUILD_DIR)/bench-data

# Long fuzzing: make fuzz FUZZ_SECONDS=3600 (per target).
fuzz: deps
	@./tests/fuzz/run.sh $(FUZZ_SECONDS) build-fuzz

format:
	@find server client tests -name '*.h' -o -name '*.cc' | xargs clang-format -i --style=file
	@echo "formatted"

clean:
	rm -rf $(BUILD_DIR) build-fuzz build-fuzz.configure.log
