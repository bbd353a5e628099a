//! `localsession-std`: implicit, execution-local sessions on OS threads, with Go's API.
//!
//! | Go (`cloudwego/localsession`) | here |
//! |---|---|
//! | `InitDefaultManager(opts)` | [`init_default_manager`] (errors instead of ignoring) |
//! | `ResetDefaultManager(opts)` | [`reset_default_manager`] |
//! | `DefaultManagerOptions()` | [`default_manager_options`] |
//! | `BindSession(s)` / `UnbindSession()` | [`bind`] / [`unbind`] |
//! | `CurSession()` | [`current`] (a clone) or [`with_current`] (a borrow) |
//! | — | [`enter`] / [`scope`]: bind for a scope, restored on drop or panic |
//! | `Go(f)` / `GoSession(s, f)` | [`go`] / [`go_session`], [`Builder`], [`ScopeExt`] |
//! | `NewSessionManager(opts)` + GC goroutine | [`ShardedManager`] (GC thread stopped on drop) |
//! | timers of `NewSessionCtxWithTimeout` | [`STD_CLOCK`]: one shared timer thread |
//! | — | [`FutureExt`]: a session that follows a future on any executor; [`in_current_session`] for pool jobs |
//! | — | bridges ([`Bridges`]): the spawner's `tracing` span (feature `tracing`, [`set_carry_spans`]) and the session's OpenTelemetry context (feature `opentelemetry`, [`OTEL_CONTEXT`], [`set_carry_otel_context`]) follow the session into every unit |
//! | — | [`SessionFieldsLayer`], [`SessionFieldsFormat`] (feature `tracing`): session values on spans and log lines |
//!
//! The sessions, contexts and the backup functions come from [`localsession_core`], re-exported
//! here.
//!
//! # Bridges
//!
//! Two opt-in bridges carry a request's observability context along with its session, into every
//! unit the adapters create — threads from [`go`] and [`Builder`], jobs wrapped with
//! [`in_current_session`], tokio tasks, rayon jobs. Each needs its cargo feature and its runtime
//! switch (both start off):
//! - `tracing` / `set_carry_spans(true)`: a unit captures the span current where it is created
//!   and enters it around each run or poll — the span tree `.in_current_span()` would give;
//! - `opentelemetry` / `set_carry_otel_context(true)`: the session value `OTEL_CONTEXT` (an
//!   `opentelemetry::Context`) is attached wherever an adapter installs the session.
//!
//! Off, a switch costs one relaxed load per spawn and per poll; without the feature, [`Bridges`]
//! is zero-sized and nothing is done. Spawns with the flow suppressed ([`without_flow`]) capture
//! no span. `SessionFields` (feature `tracing`) records session values on spans and log lines.
//! The design is argued in the module docs of `src/bridge.rs` and `src/trace_fields.rs`.
//!
//! # Examples
//! ```
//! use localsession_core::{Context, SessionCtx};
//! use localsession_std::{bind, current, go, init_default_manager, default_manager_options, unbind};
//!
//! init_default_manager(default_manager_options()).unwrap();
//! let session = SessionCtx::new(&Context::background()).with_value("user", 7u64);
//! bind(session.clone()).unwrap();
//! let child = go(|| current().unwrap().value_cloned::<u64, _>(&"user"));
//! assert_eq!(child.join().unwrap(), Some(7));
//! session.disable();
//! assert!(!current().unwrap().is_valid()); // still bound, now invalid (Go parity)
//! unbind();
//! ```
//!
// The items of the table above that exist only with a feature: linked to their docs when the
// feature is on, to the Bridges section otherwise (so that `cargo doc` without the features
// has no unresolved link).
#![cfg_attr(feature = "tracing", doc = "[`set_carry_spans`]: crate::set_carry_spans")]
#![cfg_attr(feature = "tracing", doc = "[`SessionFieldsLayer`]: crate::SessionFieldsLayer")]
#![cfg_attr(feature = "tracing", doc = "[`SessionFieldsFormat`]: crate::SessionFieldsFormat")]
#![cfg_attr(not(feature = "tracing"), doc = "[`set_carry_spans`]: #bridges")]
#![cfg_attr(not(feature = "tracing"), doc = "[`SessionFieldsLayer`]: #bridges")]
#![cfg_attr(not(feature = "tracing"), doc = "[`SessionFieldsFormat`]: #bridges")]
#![cfg_attr(feature = "opentelemetry", doc = "[`OTEL_CONTEXT`]: crate::OTEL_CONTEXT")]
#![cfg_attr(feature = "opentelemetry", doc = "[`set_carry_otel_context`]: crate::set_carry_otel_context")]
#![cfg_attr(not(feature = "opentelemetry"), doc = "[`OTEL_CONTEXT`]: #bridges")]
#![cfg_attr(not(feature = "opentelemetry"), doc = "[`set_carry_otel_context`]: #bridges")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod bridge;
mod clock;
mod flow;
mod future;
mod live;
mod manager;
#[cfg(feature = "opentelemetry")]
mod otel;
mod sharded;
mod store;
mod thread;
#[cfg(feature = "tracing")]
mod trace_fields;

pub use bridge::{BridgeGuard, Bridged, Bridges};
#[cfg(feature = "opentelemetry")]
pub use bridge::{carries_otel_context, set_carry_otel_context};
#[cfg(feature = "tracing")]
pub use bridge::{carries_spans, set_carry_spans};
pub use clock::{STD_CLOCK, StdClock};
pub use flow::{SuppressFlowGuard, flow_session, is_flow_suppressed, suppress_flow, without_flow};
pub use future::FutureExt;
pub use live::live_sessions;
pub use manager::{
    InitError, default_manager_options, ensure_default_manager, init_default_manager, manager_options,
    register_adapter_clock, reset_default_manager,
};
#[cfg(feature = "opentelemetry")]
pub use otel::{BaggageError, OTEL_CONTEXT, baggage_from_metainfo, metainfo_with_baggage, try_baggage_from_metainfo};
pub use sharded::{ShardedManager, thread_id};
pub use store::{
    BindSink, THREAD_STORE, ThreadStore, UnitScope, is_shared_worker_session, register_reset_hook, register_task_probe,
    shared_worker_session,
};
pub use thread::{Builder, ScopeExt, go, go_session, in_current_session, with_session};
#[cfg(feature = "tracing")]
pub use trace_fields::{RecordedSessionFields, SessionFields, SessionFieldsFormat, SessionFieldsLayer};

pub use localsession_core::config::ManagerOptions;
pub use localsession_core::{
    AnySession, BindError, Context, ContextError, EnterGuard, Key, MetaInfo, ReadError, Session, SessionCtx,
    SessionExt, SessionMap, backed_up_ctx, clear_ctx, recover_ctx_on_demands,
};

/// Backs `ctx` up as this thread's session (Kitex `BackupCtx`; see
/// [`localsession_core::backup_ctx`]). Unlike the core function, which does nothing while no
/// store is registered, this registers the thread-local store first, so a server that backs up
/// before anything else was bound does not lose the backup.
///
/// # Examples
/// ```
/// use localsession_core::{Context, MetaInfo};
/// use localsession_std::{backed_up_ctx, backup_ctx, clear_ctx};
/// let ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
/// backup_ctx(&ctx);
/// assert_eq!(MetaInfo::of(&backed_up_ctx().unwrap()).persistent("tenant"), Some("acme"));
/// clear_ctx();
/// ```
pub fn backup_ctx(ctx: &Context) {
    // `bind` registers the store. During thread teardown there is no slot to back up into; the
    // core function drops the backup then too.
    drop(bind(SessionCtx::new(ctx)));
}

/// A clone of this thread's current session (Go `CurSession`).
///
/// # Examples
/// ```
/// assert!(localsession_std::current().is_none());
/// ```
#[inline]
#[must_use]
pub fn current() -> Option<AnySession> {
    THREAD_STORE.cloned()
}

/// Calls `f` with this thread's current session, borrowed: no clone, no lock, no atomic
/// read-modify-write.
///
/// # Examples
/// ```
/// use localsession_core::{Context, Key, SessionCtx};
/// use localsession_std::{scope, with_current};
/// static USER: Key<u64> = Key::new("user");
/// let s = SessionCtx::new(&Context::background()).with(&USER, 3);
/// let user = scope(s, || with_current(|s| s.and_then(|s| s.read_key(&USER, |u| u.copied()))));
/// assert_eq!(user, Some(3));
/// ```
#[inline]
pub fn with_current<R>(f: impl FnOnce(Option<&AnySession>) -> R) -> R {
    THREAD_STORE.with(f)
}

/// Binds `session` to this thread until [`unbind`] or another `bind` (Go `BindSession`); the
/// previous binding is dropped.
///
/// The same function as [`localsession_core::bind`] — same signature, same effect — on the store
/// this crate registers: if no store is registered yet, the thread-local store becomes the
/// process-wide default (so `localsession_core::current()` sees the binding too) and the std
/// clock is offered for `with_timeout` until an init registers one.
///
/// # Errors
/// [`BindError`] with the session inside (nothing is dropped) during thread teardown, when the
/// thread-local storage is already gone — the only time a thread cannot hold a binding.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{bind, current, unbind};
/// bind(SessionCtx::new(&Context::background())).unwrap();
/// assert!(current().is_some());
/// assert!(localsession_core::current().is_some()); // the core sees the same store
/// unbind();
/// ```
pub fn bind(session: impl Into<AnySession>) -> Result<(), BindError> {
    ensure_registered();
    THREAD_STORE.swap(Some(session.into())).map(drop)
}

/// Removes this thread's binding and returns it (Go `UnbindSession`).
///
/// # Examples
/// ```
/// assert!(localsession_std::unbind().is_none());
/// ```
pub fn unbind() -> Option<AnySession> {
    THREAD_STORE.swap(None).ok().flatten()
}

/// Binds `session` to this thread until the guard is dropped, then restores the previous
/// binding — also when a panic unwinds through it. The guard is `!Send`.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{current, enter};
/// {
///     let _guard = enter(SessionCtx::new(&Context::background()));
///     assert!(current().is_some());
/// }
/// assert!(current().is_none());
/// ```
pub fn enter(session: impl Into<AnySession>) -> EnterGuard {
    ensure_registered();
    localsession_core::enter_in(&THREAD_STORE, session)
}

/// Runs `f` with `session` bound to this thread, restoring the previous binding afterwards
/// (also on panic).
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{current, scope};
/// let s = SessionCtx::new(&Context::background()).with_value("k", 1u8);
/// assert_eq!(scope(s, || current().unwrap().value_cloned::<u8, _>(&"k")), Some(1));
/// assert!(current().is_none());
/// ```
pub fn scope<R>(session: impl Into<AnySession>, f: impl FnOnce() -> R) -> R {
    let _guard = enter(session);
    f()
}

/// Registers the thread store globally once, if no store is registered, and offers the std
/// clock as the fallback clock (`localsession_core::set_fallback_clock`), so that `with_timeout`
/// works in any program that uses this crate. The *registered* clock is left to the init
/// functions (`init_default_manager`, `localsession_tokio::init`, ...), so that binding before an
/// adapter's init does not pick the clock for it.
#[inline]
pub(crate) fn ensure_registered() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another store may be registered on purpose; then this crate's functions still act on
        // the thread-local store and `init_default_manager` reports the conflict.
        let _ = manager::register_store();
        localsession_core::set_fallback_clock(&STD_CLOCK);
    });
}
