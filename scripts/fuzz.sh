#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each, or only the TARGETs named:
#
#   scripts/fuzz.sh SECONDS [TARGET...]
#
# Coverage-guided with libFuzzer (the libfuzzer-sys crate, built with the C++ compiler) on the
# stable toolchain: the same instrumentation flags `cargo fuzz build --sanitizer none -a`
# passes, all stable (no sanitizer: those need nightly). Debug assertions and overflow checks
# are on. Each target starts from its seeds in fuzz/corpus/TARGET (read only) and keeps what
# it finds in fuzz/target/corpus/TARGET; a crash or a timeout (over 10 s on one input) is
# saved in fuzz/artifacts/TARGET/. Exits non-zero if any target crashed or timed out. Set
# FUZZ_JOBS to run that many targets at once, FUZZ_RUNS to stop each after that many inputs,
# FUZZ_ARGS for more libFuzzer options (e.g. -max_len=1024).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: scripts/fuzz.sh SECONDS [TARGET...]" >&2
  exit 2
fi
seconds=$1
shift
all=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^portcullis-fuzz$')
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets <<< "$all"
for t in "${targets[@]}"; do
  grep -qx "$t" <<< "$all" || { echo "no fuzz target $t; there are: $(echo $all)" >&2; exit 2; }
done

# The fuzz crate's own lock must pin what the workspace's pins, so the code fuzzed is the code
# shipped: after a dependency update, copy Cargo.lock here and let cargo add the fuzzing crates.
drift=$(diff <(grep -A1 '^name = ' ../Cargo.lock | paste - - - | awk '{print $3, $6}' | sort) \
             <(grep -A1 '^name = ' Cargo.lock | paste - - - | awk '{print $3, $6}' | sort) |
        grep '^>' | grep -v -e '"portcullis-fuzz"' -e '"libfuzzer-sys"' -e '"arbitrary"' -e '"jobserver"' || true)
if [ -n "$drift" ]; then
  echo "fuzz/Cargo.lock pins other versions than Cargo.lock:" >&2
  echo "$drift" >&2
  echo "fix: cp Cargo.lock fuzz/Cargo.lock && cargo metadata --manifest-path fuzz/Cargo.toml >/dev/null" >&2
  exit 2
fi

host=$(rustc -vV | sed -n 's/^host: //p')
flags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  --cfg fuzzing
  -Cdebug-assertions
)
# --target: the flags reach the targets and what they link, not build scripts or macros.
RUSTFLAGS="${flags[*]}" cargo build --release --locked --target "$host" \
  $(printf -- '--bin %s ' "${targets[@]}")

bin=target/$host/release
failed=()
run() {
  local t=$1
  mkdir -p "target/corpus/$t" "artifacts/$t" "corpus/$t"
  local log=target/fuzz-$t.log
  local status=0
  "$bin/$t" "target/corpus/$t" "corpus/$t" -max_total_time="$seconds" -runs="${FUZZ_RUNS:--1}" -timeout=10 \
    -print_final_stats=1 -artifact_prefix="artifacts/$t/" ${FUZZ_ARGS:-} > "$log" 2>&1 || status=$?
  local done_line runs
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  if [ "$status" -ne 0 ]; then
    echo "FAILED  $t (exit $status): $(grep -E 'ERROR|panicked|timeout' "$log" | head -3 | tr '\n' ' ')"
    echo "        input and log: fuzz/artifacts/$t/, fuzz/$log"
    return 1
  fi
  local took
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  printf 'ok      %-18s %10s runs in %ss  %s\n' "$t" "${runs:-?}" "${took:-?}" \
    "$(sed -E 's/^#[0-9]+[[:space:]]+DONE[[:space:]]+//; s/ rss:.*//' <<< "$done_line")"
}

jobs=${FUZZ_JOBS:-1}
pids=()
names=()
for t in "${targets[@]}"; do
  run "$t" &
  pids+=($!)
  names+=("$t")
  if [ ${#pids[@]} -ge "$jobs" ]; then
    wait "${pids[0]}" || failed+=("${names[0]}")
    pids=("${pids[@]:1}")
    names=("${names[@]:1}")
  fi
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || failed+=("${names[$i]}")
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets that failed: ${failed[*]}"
  echo "fuzzing: $(( ${#targets[@]} - ${#failed[@]} )) passed, ${#failed[@]} failed"
  exit 1
fi
echo "fuzzing: ${#targets[@]} passed, 0 failed"
