#!/usr/bin/env bash
# The public-API snapshot: renders each published crate's public API from rustdoc's JSON output
# (nightly) with tests/examples/public_api.rs and compares it with docs/public-api/<crate>.txt.
# A difference fails (exit 1) and is printed: a removed or changed line is a breaking change
# (say so in CHANGELOG.md), an added line a new API. After an intended change:
#   tests/public-api.sh --bless
# Implicit mode is public API too, so everything is built with `--cfg tokio_unstable`.
set -euo pipefail
cd "$(dirname "$0")/.."
bless=false
[[ "${1:-}" == "--bless" ]] && bless=true
export CARGO_TARGET_DIR=target/api
export RUSTFLAGS="--cfg tokio_unstable"
export RUSTDOCFLAGS="--cfg tokio_unstable"
mkdir -p docs/public-api
cargo build -q -p localsession-tests --example public_api
status=0
for spec in "localsession-core:std" "localsession-std:ALL" "localsession-tokio:ALL" \
    "localsession-rayon:ALL" "localsession-async-std:ALL"; do
    pkg=${spec%%:*}
    features=${spec#*:}
    if [[ "$features" == ALL ]]; then flags=(--all-features); else flags=(--features "$features"); fi
    cargo +nightly rustdoc -q -p "$pkg" "${flags[@]}" -- -Z unstable-options --output-format json
    json="target/api/doc/${pkg//-/_}.json"
    snapshot="docs/public-api/$pkg.txt"
    target/api/debug/examples/public_api "$json" >"target/api/$pkg.txt"
    if $bless; then
        cp "target/api/$pkg.txt" "$snapshot"
    elif ! diff -u "$snapshot" "target/api/$pkg.txt"; then
        echo "public API of $pkg changed (see the diff above); if intended: tests/public-api.sh --bless" >&2
        status=1
    fi
done
exit $status
