#!/usr/bin/env bash
# Every test of the workspace, in one command: the README's test command.
#
#   1. cargo test --workspace --all-features   stable: unit, integration and doc tests of every
#                                              package (the tower/hyper middleware, live-session
#                                              counter, fuzz corpora, the seed transcript)
#   2. cargo test -p localsession-core --tests the core without `std` (SessionMap reads take the
#                                              no_std epoch path)
#   3. cargo test -p localsession-tokio        again with RUSTFLAGS="--cfg tokio_unstable": the
#      --all-features                          implicit mode (task hooks) and its race tests
#
# Step 3 builds in its own target directory (target/unstable, as .ci/run's clippy does), so the
# changed RUSTFLAGS never invalidate the stable build of steps 1 and 2. Arguments are passed to
# every `cargo test` (e.g. `./test.sh -q`). Stops at the first failing step.
set -euo pipefail
cd "$(dirname "$0")"

base="${CARGO_TARGET_DIR:-target}"
start=$SECONDS

step() {
    echo "::: test.sh: $1" >&2
}

step "1/3 cargo test --workspace --all-features"
cargo test --workspace --all-features "$@"

step "2/3 cargo test -p localsession-core --tests (no std)"
cargo test -p localsession-core --tests "$@"

step "3/3 cargo test -p localsession-tokio --all-features (--cfg tokio_unstable, target dir $base/unstable)"
RUSTFLAGS="--cfg tokio_unstable" RUSTDOCFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR="$base/unstable" \
    cargo test -p localsession-tokio --all-features "$@"

echo "::: test.sh: all tests passed in $((SECONDS - start))s" >&2
