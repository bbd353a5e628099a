//! Runnable examples of localsession.
//!
//! [`seed`] is the seed program of Go's `cloudwego/localsession` README, ported to Rust with
//! deterministic, explained output. `examples/seed.rs` prints it
//! (`cargo run -p localsession-examples --example seed`); `tests/tests/interop/seed.rs` in the
//! `localsession-tests` package asserts its transcript for both session kinds.
//!
// The `grpc` module exists only with its feature: linked when it is on.
#![cfg_attr(
    feature = "grpc",
    doc = "[`grpc`] (feature `grpc`) is a gRPC service and client written by hand over tonic (no"
)]
#![cfg_attr(
    not(feature = "grpc"),
    doc = "`grpc` (feature `grpc`) is a gRPC service and client written by hand over tonic (no"
)]
//! `protoc`), used by `examples/two_services.rs`: one request crossing two services over HTTP
//! and over gRPC (`cargo run -p localsession-examples --example two_services --features grpc`).

#[cfg(feature = "grpc")]
pub mod grpc;
pub mod seed;

/// The README's Rust examples, run as doctests (`cargo test --doc -p localsession-examples`), so
/// the code the README shows keeps compiling and passing.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
