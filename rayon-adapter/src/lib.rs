//! `localsession-rayon`: sessions that reach rayon's parallel iterators, `join`, `scope` and
//! pool jobs.
//!
//! rayon runs work on pool threads whose thread-local slot knows nothing of the caller's
//! session, and it runs some of that work *inline* on the calling thread or on a blocked
//! worker's stack. Without help, items of a `par_iter` see no session (or whatever a previous
//! job left bound), and a job that binds leaks into its worker. This crate carries the caller's
//! session (captured with [`localsession_std::flow_session`], so [`localsession_std::without_flow`]
//! is honoured) into every piece of work, and installs it as a *scope*: when the work ends, its
//! thread has exactly what it had before, panic or not.
//!
//! | rayon | here |
//! |---|---|
//! | `iter.par_iter().map(f).sum()` | `iter.par_iter().map(f).in_current_session().sum()` ([`ParallelIteratorExt`]) |
//! | `rayon::join(a, b)` | [`join`] |
//! | `rayon::scope(|s| s.spawn(f))` | [`scope`] and [`ScopeExt::spawn_in_current_session`] |
//! | `rayon::spawn(f)` / `pool.spawn(f)` | [`spawn`] / [`spawn_in`] |
//! | `pool.install(f)` | [`install`] |
//!
//! A parallel iterator installs the session once per *job* (a leaf of rayon's splitting), not
//! per item: on a 10^6-item `sum` over two threads the cost is within noise of the plain
//! iterator (benchmark P10 in `tests/benches/sessions.rs`).
//!
//! # Why a separate crate
//! `localsession-std` depends on nothing but the core, and the tokio and async-std adapters
//! build on it. A `rayon` feature there would put rayon (and its global pool, crossbeam-deque
//! and rayon-core) into the dependency graph of every build that unifies that feature, and tie
//! the std adapter's releases to rayon's plumbing API, which this crate implements directly.
//! As its own crate, like the other adapters, it is compiled only by those who use rayon.
//!
//! # Examples
//! ```
//! use localsession_core::{Context, Key, SessionCtx};
//! use localsession_rayon::ParallelIteratorExt;
//! use localsession_std::{current, scope};
//! use rayon::prelude::*;
//!
//! static TENANT: Key<&str> = Key::new("tenant");
//!
//! fn deep_callee(x: u64) -> u64 {
//!     assert_eq!(current().unwrap().get_cloned(&TENANT), Some("acme")); // no ctx parameter
//!     x * 2
//! }
//!
//! let request = SessionCtx::new(&Context::background()).with(&TENANT, "acme");
//! let total: u64 = scope(request, || {
//!     let data: Vec<u64> = (0..10_000).collect();
//!     data.par_iter().map(|&x| deep_callee(x)).in_current_session().sum()
//! });
//! assert_eq!(total, 2 * (0..10_000u64).sum::<u64>());
//! ```

mod install;
mod iter;
mod jobs;

pub use iter::{InSession, ParallelIteratorExt};
pub use jobs::{ScopeExt, install, join, scope, spawn, spawn_in};
