//! Runnable examples of localsession.
//!
//! [`seed`] is the seed program of Go's `cloudwego/localsession` README, ported to Rust with
//! deterministic, explained output. `examples/seed.rs` prints it
//! (`cargo run -p localsession-examples --example seed`); `tests/tests/seed.rs` in the
//! `localsession-tests` package asserts its transcript for both session kinds.

pub mod seed;

/// The README's Rust examples, run as doctests (`cargo test --doc -p localsession-examples`), so
/// the code the README shows keeps compiling and passing.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
