//! The benchmarks of localsession live in `sessions.rs` (`cargo bench -p localsession-benches`,
//! or `tests/benches/report.sh` for the table of `docs/performance.md`). This library is empty.
