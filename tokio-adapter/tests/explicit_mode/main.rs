//! The tokio adapter's tests that share no process-wide state, in one test binary — one build
//! and link of tokio, hyper and tower instead of four, which keeps `./test.sh`'s cold build
//! short:
//! - `explicit`: the spawn helpers, `JoinSetExt` and `FutureExt` on multi-thread runtimes;
//! - `lifecycle` (features `tower`, `hyper`): sessions end with their response, session-free
//!   spawning;
//! - `propagation` (features `tower`, `hyper`): the propagators over real HTTP, hostile headers;
//! - `tower_e2e` (feature `tower`): two real hyper services on 127.0.0.1.
//!
//! Tests that need their own process (a global allocator, the implicit table, the live-session
//! count, environment variables) stay in their own files.
#![allow(missing_docs)]

#[path = "../common/mod.rs"]
mod common;

mod explicit;
#[cfg(all(feature = "tower", feature = "hyper"))]
mod lifecycle;
#[cfg(all(feature = "tower", feature = "hyper"))]
mod propagation;
#[cfg(feature = "tower")]
mod tower_e2e;
