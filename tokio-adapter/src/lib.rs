//! `localsession-tokio`: sessions that follow tokio tasks.
//!
//! Two ways to hand a session to a task:
//!
//! - **Explicit** (any build): [`spawn`], [`spawn_with`], [`spawn_blocking`], [`spawn_local`],
//!   [`JoinSetExt`] and [`FutureExt::with_session`] / [`FutureExt::in_current_session`]. The
//!   session is installed around every poll of the future and around its drop, on whichever
//!   worker polls it, and removed afterwards.
//! - **Implicit** (`--cfg tokio_unstable`): build the runtime through
//!   `enable_implicit_sessions` and every plain `tokio::spawn` inherits the spawner's
//!   session — also in library code you do not control. No other Rust crate does this; tokio's
//!   own `task_local!` cannot, and Go had to drop its implicit mode. See the `implicit` module for what
//!   the hooks do not cover (`spawn_blocking`, `LocalSet`), where the explicit helpers apply.
//!
//! Reading the session inside a task is the std adapter's thread-local read
//! ([`current`], [`with_current`], re-exported here): the session is in the polling worker's slot
//! for the duration of the poll.
//!
//! This crate re-exports the everyday API of the core and the std adapter (session types,
//! `bind`/`enter`/`scope`/`current`, `go`, the default manager's init, flow suppression), so a
//! tokio application depends on `localsession-tokio` alone.
//!
//! Deadlines run on tokio's timer once [`init`] registered [`TOKIO_CLOCK`].
//!
//! # Examples
//! ```
//! use localsession_tokio::{Context, SessionCtx, current, default_manager_options, scope};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)] async fn main() {
//! localsession_tokio::init(default_manager_options()).unwrap();
//! let request = SessionCtx::new(&Context::background()).with_value("trace", "abc");
//! let handle = scope(request.clone(), || localsession_tokio::spawn(async {
//!     let child = localsession_tokio::spawn(async { current().unwrap().str_value(&"trace") });
//!     child.await.unwrap()
//! }));
//! assert_eq!(handle.await.unwrap().as_deref(), Some("abc"));
//! # }
//! ```

mod clock;
mod detached;
mod explicit;
#[cfg(feature = "hyper")]
pub mod hyper;
#[cfg(tokio_unstable)]
pub mod implicit;
mod probe;
mod runtime;
#[cfg(feature = "tower")]
pub mod tower;

pub use clock::{TOKIO_CLOCK, TokioClock};
pub use detached::spawn_without_session;
pub use explicit::{FutureExt, JoinSetExt, spawn, spawn_blocking, spawn_local, spawn_with};
#[cfg(tokio_unstable)]
pub use implicit::{
    ImplicitSessions, enable_implicit_sessions, hook_drop_panics, implicit_task_sessions, implicit_tasks,
    sweep_ended_sessions,
};
pub use runtime::{ImplicitUnavailableError, apply_manager_options, runtime_builder};

/// The everyday API of the core and the std adapter, so that a tokio application needs only
/// this crate (`localsession_std` and `localsession_core` hold the rest).
pub use localsession_std::{
    AnySession, BindError, Context, ContextError, EnterGuard, InitError, Key, ManagerOptions, MetaInfo, ReadError,
    Session, SessionCtx, SessionExt, SessionMap, backed_up_ctx, backup_ctx, bind, clear_ctx, current,
    default_manager_options, ensure_default_manager, enter, go, go_session, scope, suppress_flow, unbind, with_current,
    without_flow,
};

/// Registers [`TOKIO_CLOCK`] as the process-wide clock (so `with_timeout` deadlines fire on
/// tokio's timer), then initializes the std default manager (the thread-local store tokio's
/// workers use) with `opts`.
///
/// # Errors
/// As [`localsession_std::init_default_manager`], and
/// [`InitError::ForeignClock`] if another clock was
/// registered before (then deadlines would not run on tokio's timer).
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use localsession_core::Context;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// localsession_tokio::init(localsession_std::default_manager_options()).unwrap();
/// // Timeouts now fire on tokio's timer:
/// let (ctx, _cancel) = Context::background().with_timeout(Duration::from_millis(10)).unwrap();
/// ctx.done().await;
/// assert!(ctx.err().unwrap().is_deadline_exceeded());
/// # }
/// ```
pub fn init(opts: ManagerOptions) -> Result<(), localsession_std::InitError> {
    probe::register();
    localsession_std::register_adapter_clock(&TOKIO_CLOCK)?;
    localsession_std::init_default_manager(opts)
}
