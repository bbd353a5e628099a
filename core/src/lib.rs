//! `localsession-core`: implicit, execution-local context for Rust — the `no_std + alloc` core.
//!
//! A *session* carries request data (user ids, trace ids, RPC metadata, deadlines) from a root
//! caller to deep callees without a `ctx` parameter in every signature, follows the work across
//! threads and tasks, and can be disabled so that every session derived from it becomes
//! invalid. This crate is a port of Go's `cloudwego/localsession` and of Go's `context` package:
//!
//! - [`Context`]: Go's `context.Context` — persistent values, a cancellation tree, deadlines
//!   against a [`Clock`], `done()` futures and `after_cancel` callbacks.
//! - [`Session`], [`SessionCtx`], [`SessionMap`], [`AnySession`]: Go's `Session` interface and
//!   its two implementations.
//! - [`ContextStore`] and the binding API ([`bind`], [`unbind`], [`current`], [`with_current`],
//!   [`enter`], [`scope`]), with [`LocalSlot`], [`SingleSlotStore`] and [`ShardedStore`] (Go's
//!   `SessionManager`) to build stores from; [`WithSession`] carries a session across
//!   `.await` on any executor.
//! - [`ManagerOptions`] with Go's defaults and its `CLOUDWEGO_SESSION_CONFIG_KEY` format.
//! - [`MetaInfo`] and the backup functions of Kitex's `WithContextBackup`.
//!
//! The core knows nothing about threads or runtimes. Pick the adapter for your runtime
//! (`localsession-std`, `localsession-tokio`, `localsession-async-std`), or implement
//! [`ContextStore`] for your own executor.
//!
//! # Examples
//! ```
//! use localsession_core::{scope, current, set_global_store, Context, Key, SessionCtx, SingleSlotStore};
//!
//! static STORE: SingleSlotStore = SingleSlotStore::new();
//! static USER: Key<u64> = Key::new("user");
//!
//! fn deep_callee() -> Option<u64> {
//!     // No context parameter: read the current session.
//!     current()?.get_cloned(&USER)
//! }
//!
//! set_global_store(&STORE).unwrap();
//! let session = SessionCtx::new(&Context::background()).with(&USER, 42);
//! assert_eq!(scope(session.clone(), deep_callee), Some(42));
//! session.disable();
//! assert!(!session.is_valid());
//! ```

#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms,
    clippy::std_instead_of_core,
    clippy::alloc_instead_of_core,
    clippy::undocumented_unsafe_blocks
)]

extern crate alloc;
// loom's macros name `std`; loom models always run with std.
#[cfg(localsession_loom)]
extern crate std;

// Modules bottom to top: each imports only modules of the groups above its own (checked by
// `tests/module_graph.rs`; see docs/architecture.md, "Module layering").
pub mod config;
mod error;
mod global;
mod key;

mod primitive;

mod index;

mod node;

mod time;

mod scope;

mod context;

mod map;
mod metainfo;

mod session;

mod store;
mod task_table;

mod backup;
mod future;
mod sharded;

pub use backup::{backed_up_ctx, backup_ctx, clear_ctx, recover_ctx_on_demands};
pub use config::{ConfigError, ConfigField, DurationError, ManagerOptions};
pub use context::{CancelHandle, Context};
pub use error::{ContextError, ReadError};
pub use future::{FutureExt, StoreType, WithSession};
pub use key::{DynKey, Key, KeyQuery};
pub use map::SessionMap;
#[cfg(localsession_loom)]
#[doc(hidden)]
pub use map::loom_collect;
pub use metainfo::MetaInfo;
pub use scope::{AfterCancel, Done};
pub use session::{AnySession, Session, SessionCtx, SessionExt};
pub use sharded::ShardedStore;
pub use store::{
    BindError, ContextStore, EnterGuard, EpochGuard, EpochHandle, LocalSlot, SetGlobalStoreError, SingleSlotStore,
    bind, current, enter, enter_in, enter_option_in, global_store, scope, set_global_store, unbind, with_current,
    with_current_in,
};
pub use task_table::{TaskAttachment, TaskTable};
pub use time::{
    Clock, Expiry, Instant, NoClockError, SetGlobalClockError, global_clock, registered_clock, set_fallback_clock,
    set_global_clock,
};

#[doc(hidden)]
pub mod __private {
    //! Internal measurements exposed for the test and benchmark crates; not a stable API.
    //!
    //! # Examples
    //! ```
    //! use localsession_core::__private::NODE_HEADER_BYTES;
    //! assert!(NODE_HEADER_BYTES > 0);
    //! ```

    /// Bytes in the common node header.
    ///
    /// # Examples
    /// ```
    /// // Internal: the benchmark crate reports node sizes with it.
    /// assert!(localsession_core::__private::NODE_HEADER_BYTES >= core::mem::size_of::<usize>());
    /// ```
    pub const NODE_HEADER_BYTES: usize = core::mem::size_of::<crate::node::Header>();

    /// Parses Go's duration syntax, as `CLOUDWEGO_SESSION_CONFIG_KEY` uses it (for the fuzz
    /// harness).
    ///
    /// # Errors
    /// A [`DurationError`](crate::config::DurationError) naming the input.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::__private::parse_go_duration;
    /// assert_eq!(parse_go_duration("1.5s").unwrap().as_millis(), 1500);
    /// ```
    pub fn parse_go_duration(s: &str) -> Result<core::time::Duration, crate::config::DurationError> {
        crate::config::parse_go_duration(s)
    }

    /// Formats a duration in Go's syntax (for the fuzz harness).
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// assert_eq!(localsession_core::__private::format_go_duration(Duration::from_secs(90)), "1m30s");
    /// ```
    #[must_use]
    pub fn format_go_duration(d: core::time::Duration) -> alloc::string::String {
        crate::config::format_go_duration(d)
    }
}
