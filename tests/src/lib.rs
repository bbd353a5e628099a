//! Shared pieces of localsession's cross-crate tests, examples and benchmarks.
//!
//! [`seed`] is the Go seed program ported line for line; the `seed` example prints it and
//! `tests/seed.rs` asserts it, for both session kinds.

pub mod seed;
