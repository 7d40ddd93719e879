#!/usr/bin/env bash
# Builds the libFuzzer targets with clang in BUILD_DIR and runs each for SECONDS with a fixed
# seed, starting from the repo's seed corpus, as many at once as there are cores. New inputs go
# to BUILD_DIR/corpus/<target> (not to the repo). Crashes are saved in BUILD_DIR/crashes and fail
# the run.
# -max_len is 128 KiB so mutations reach the 64-100 KiB hostile seeds (make_hostile_seeds.py:
# memory that grows faster than the input) and grow past them; libFuzzer's default is the
# largest seed.
# Usage: tests/fuzz/run.sh SECONDS [BUILD_DIR]
set -euo pipefail
seconds="${1:-60}"
build="${2:-build-fuzz}"
src="$(cd "$(dirname "$0")/../.." && pwd)"
mapfile -t targets < <(awk '!/^#/ && NF { print $1 }' "$src/tests/fuzz/targets.txt")
if [ ! -f "$build/build.ninja" ]; then
  CC=clang-14 CXX=clang++-14 cmake -S "$src" -B "$build" -G Ninja -DMETALOAD_FUZZ=ON \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo > "$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
fi
cmake --build "$build" > "$build/build.log" 2>&1 || { tail -40 "$build/build.log"; exit 1; }
mkdir -p "$build/crashes"

fuzz_one() {
  local target="$1" corpus="$build/corpus/$1" log="$build/$1.log"
  mkdir -p "$corpus"
  if "$build/tests/fuzz/${target}_fuzzer" -seed=1 -max_total_time="$seconds" -timeout=10 \
       -max_len=131072 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$build/crashes/$target-" \
       "$corpus" "$src/tests/fuzz/corpus/$target" > "$log" 2>&1; then
    echo ok > "$log.verdict"
  else
    echo FAILED > "$log.verdict"
  fi
}

jobs_max="$(nproc)"
for target in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n || true; done
  fuzz_one "$target" &
done
wait

passed=0; failed=0
for target in "${targets[@]}"; do
  log="$build/$target.log"
  verdict="$(cat "$log.verdict" 2>/dev/null || echo FAILED)"
  if [ "$verdict" = ok ]; then passed=$((passed + 1)); else failed=$((failed + 1)); tail -40 "$log"; fi
  execs="$(grep -oE 'number_of_executed_units: [0-9]+' "$log" | grep -oE '[0-9]+' || echo 0)"
  echo "fuzz: $target ${seconds}s seed=1 executions=$execs $verdict"
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
