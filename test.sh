#!/usr/bin/env bash
# Every test of the workspace, in one command: the README's test command.
#
#   1. cargo test --workspace --all-features       unit and integration tests of every package
#      --lib --bins --tests                        (the tower/hyper/gRPC middleware, the bridges,
#      with --cfg tokio_unstable                   the fuzz corpora, the seed transcript) *and*
#                                                  the tokio implicit mode (task hooks) and its
#                                                  race tests, in one build (target/unstable);
#                                                  `--exclude localsession-benches` (criterion
#                                                  benchmarks, no tests) keeps criterion out
#   2. cargo test --workspace --all-features --doc every documentation example (the README's
#                                                  Rust examples are doctests of
#                                                  localsession-examples); same build
#
# Cold, on 2 cores: 112-115 s (2026-11-30, idle VM; `CARGO_TARGET_DIR=/tmp/coldN ./test.sh -q`).
# Examples are not built here: .ci/run's README-commands stage runs every one of them and clippy
# checks them. Two other configurations need builds of their own, which would double this
# script's cold time, so .ci/run runs them in their own stages:
# - without --cfg tokio_unstable, one assertion (`runtime_builder` refusing implicit mode with an
#   error naming the flag, tokio-adapter/tests/implicit_env.rs): stage "stable-only test",
#   `cargo test -p localsession-tokio --test implicit_env`; the stable build of everything else is
#   checked by the clippy and doc stages;
# - the core without `std` (SessionMap reads take the no_std epoch path, the only code the
#   feature changes): stage "no_std (thumbv7em, tests without std)", `cargo test -p localsession-core --lib --test model_map
#   --test model_sharded` (and the miri stage runs those tests without `std` as well).
#
# Arguments are passed to every `cargo test` (e.g. `./test.sh -q`). Stops at the first failing
# step.
set -euo pipefail
cd "$(dirname "$0")"

base="${CARGO_TARGET_DIR:-target}"
# Incremental compilation costs more than it saves on a cold build of this workspace (80 s
# instead of 92 s for step 1's build on 2 cores); set CARGO_INCREMENTAL=1 to keep it for quick
# re-runs after small edits.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
start=$SECONDS

step() {
    echo "::: test.sh: $1 ($((SECONDS - start))s)" >&2
}

unstable() {
    RUSTFLAGS="--cfg tokio_unstable" RUSTDOCFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR="$base/unstable" "$@"
}

step "1/2 cargo test --workspace --exclude localsession-benches --all-features --lib --bins --tests (--cfg tokio_unstable, target dir $base/unstable)"
unstable cargo test --workspace --exclude localsession-benches --all-features --lib --bins --tests "$@"

step "2/2 cargo test --workspace --exclude localsession-benches --all-features --doc"
unstable cargo test --workspace --exclude localsession-benches --all-features --doc "$@"

echo "::: test.sh: all tests passed in $((SECONDS - start))s" >&2
