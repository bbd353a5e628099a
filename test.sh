#!/usr/bin/env bash
# Every test of the workspace, in one command: the README's test command.
#
#   1. cargo test --workspace --all-features   unit, integration and doc tests of every package
#      with --cfg tokio_unstable               (the tower/hyper/gRPC middleware, the bridges, the
#                                              fuzz corpora, the seed transcript) *and* the tokio
#                                              implicit mode (task hooks) and its race tests, in
#                                              one build (target/unstable)
#   2. cargo test -p localsession-core --tests the core without `std` (SessionMap reads take the
#                                              no_std epoch path); same target directory
#   3. cargo test -p localsession-tokio        the one behaviour that only exists *without*
#      --test implicit_env                     --cfg tokio_unstable: `runtime_builder` refusing
#                                              implicit mode with an error naming the flag
#
# One build of the workspace instead of two (stable, then tokio_unstable) roughly halves the
# cold time; the stable build of everything is still checked by .ci/run's clippy and doc stages
# and by the README's example commands. Arguments are passed to every `cargo test` (e.g.
# `./test.sh -q`). Stops at the first failing step.
set -euo pipefail
cd "$(dirname "$0")"

base="${CARGO_TARGET_DIR:-target}"
start=$SECONDS

step() {
    echo "::: test.sh: $1" >&2
}

unstable() {
    RUSTFLAGS="--cfg tokio_unstable" RUSTDOCFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR="$base/unstable" "$@"
}

step "1/3 cargo test --workspace --all-features (--cfg tokio_unstable, target dir $base/unstable)"
unstable cargo test --workspace --all-features "$@"

step "2/3 cargo test -p localsession-core --tests (no std)"
unstable cargo test -p localsession-core --tests "$@"

step "3/3 cargo test -p localsession-tokio --test implicit_env (stable cfg)"
cargo test -p localsession-tokio --test implicit_env "$@"

echo "::: test.sh: all tests passed in $((SECONDS - start))s" >&2
