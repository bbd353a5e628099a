#!/usr/bin/env bash
# Instructions per operation of the hot paths (tests/benches/examples/ops.rs), counted by
# valgrind's callgrind: a figure that does not move with the machine's load, for A/B-testing a
# change of a few percent (time on the shared VM varies ±8–15% between identical runs). Each
# scenario runs with N and 2N iterations; (instructions(2N) - instructions(N)) / N is reported,
# so setup cancels out. Instructions are not time (cache misses and atomics cost more): use the
# criterion suite (report.sh) for time.
#
# Usage: tests/benches/instructions.sh [N] [scenario...]   (default N = 20000, all scenarios;
#        `cargo run -p localsession-benches --example ops -- list` lists them)
# Needs valgrind (apt install valgrind); not run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is not installed (apt install valgrind)" >&2; exit 2; }
n=20000
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then n=$1; shift; fi
export RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/bench-unstable
cargo build -q --release -p localsession-benches --example ops
bin=target/bench-unstable/release/examples/ops
scenarios=("$@")
if [[ ${#scenarios[@]} -eq 0 ]]; then mapfile -t scenarios < <("$bin" list | awk '{print $1}'); fi
count() { # instructions of one run: scenario, iterations
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 >/dev/null \
        | awk '/refs:/ {gsub(",", "", $NF); print $NF}'
}
printf '%-24s %12s\n' scenario "instr/op"
for s in "${scenarios[@]}"; do
    one=$(count "$s" "$n")
    two=$(count "$s" $((2 * n)))
    awk -v s="$s" -v a="$one" -v b="$two" -v n="$n" 'BEGIN { printf "%-24s %12.1f\n", s, (b - a) / n }'
done
