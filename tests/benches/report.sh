#!/usr/bin/env bash
# Runs the whole benchmark suite — the implicit tokio mode included, which needs
# `--cfg tokio_unstable` — and prints the P1–P10 table at the end (targets and results: docs/performance.md).
# Usage: tests/benches/report.sh            (about 3 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/bench-unstable \
    cargo bench -p localsession-benches --bench sessions "$@"
