//! Shared pieces of localsession's cross-crate tests, examples and benchmarks.
//!
//! [`mini_executor`] is the embed-in-your-own-executor guide: a run-queue executor built on `localsession-core` alone.
//! [`fuzz_config`] and [`fuzz_ops`] are the interpreters behind the cargo-fuzz targets in `fuzz/`
//! (the config parser; operation sequences checked against a model), [`fuzz_headers`] those of
//! the header parsers (`baggage`, `traceparent`, `metainfo`); `tests/fuzz_corpus.rs` replays
//! their corpora.

pub mod fuzz_config;
pub mod fuzz_headers;
pub mod fuzz_ops;
pub mod mini_executor;
