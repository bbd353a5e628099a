//! The cross-crate tests that share no process-wide state, in one test binary (one build and
//! link of tonic, hyper and opentelemetry-sdk instead of three, which keeps `./test.sh`'s cold
//! build short):
//! - `seed`: the seed program's transcript;
//! - `grpc_e2e`: real tonic servers on 127.0.0.1;
//! - `otel_propagators` (feature `opentelemetry`): interop with opentelemetry-sdk's propagators.
//!
//! The other files of this directory each need their own process (the default manager, the
//! environment, the live-session count; `fuzz_corpus` and `custom_executor` register global
//! stores) and stay separate binaries.
#![allow(missing_docs)]

mod grpc_e2e;
#[cfg(feature = "opentelemetry")]
mod otel_propagators;
mod seed;
