//! Shared pieces of localsession's cross-crate tests, examples and benchmarks.
//!
//! [`seed`] is the Go seed program ported line for line; the `seed` example prints it and
//! `tests/seed.rs` asserts it, for both session kinds. [`mini_executor`] is the
//! embed-in-your-own-executor guide: a run-queue executor built on `localsession-core` alone.

pub mod mini_executor;
pub mod seed;
