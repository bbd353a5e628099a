//! Suppressing the flow of the session to new work (.NET's `ExecutionContext.SuppressFlow`).
//!
//! Long-lived work — a connection pool's connection tasks, a `tower::buffer::Buffer` worker, a
//! background refresher — must not carry the session of the request that happened to create it:
//! that request's identity would be seen, or sent, on behalf of every later request. While a
//! [`SuppressFlowGuard`] lives on a thread, everything that *inherits* the current session
//! captures nothing instead: [`go`](crate::go), [`in_current_session`](crate::in_current_session),
//! [`FutureExt::in_current_session`](crate::FutureExt::in_current_session), the tokio and
//! async-std adapters' spawn helpers, and plain `tokio::spawn` in the tokio adapter's implicit
//! mode. Reading the current session ([`current`](crate::current)) is unaffected: the code that
//! suppressed the flow still sees its own session.
//!
//! The guard is a counter on the thread (nested guards compose) and is `!Send`.

use std::cell::Cell;
use std::marker::PhantomData;

use localsession_core::AnySession;

thread_local! {
    static SUPPRESSED: Cell<usize> = const { Cell::new(0) };
}

/// While alive, spawns on this thread inherit no session: everything that inherits the current
/// session captures nothing instead (see [`flow_session`]); reading it is unaffected.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_std::{current, go, scope, suppress_flow};
///
/// scope(SessionMap::new().with_value("tenant", "acme"), || {
///     let worker = {
///         let _no_flow = suppress_flow();
///         go(|| current().is_none()) // a long-lived worker: it must not carry this request's tenant
///     };
///     assert!(worker.join().unwrap());
///     assert!(current().is_some()); // the caller still sees its own session
/// });
/// ```
#[must_use = "the flow is suppressed only while the guard lives"]
pub fn suppress_flow() -> SuppressFlowGuard {
    // `try_with`: during thread teardown there is nothing to inherit anyway.
    let _ = SUPPRESSED.try_with(|n| n.set(n.get() + 1));
    SuppressFlowGuard { _not_send: PhantomData }
}

/// Runs `f` with the flow suppressed: what `f` spawns inherits no session.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_std::{go, current, scope, without_flow};
///
/// let h = scope(SessionMap::new(), || without_flow(|| go(|| current().is_none())));
/// assert!(h.join().unwrap());
/// ```
pub fn without_flow<R>(f: impl FnOnce() -> R) -> R {
    let _guard = suppress_flow();
    f()
}

/// Whether a [`SuppressFlowGuard`] is alive on this thread.
///
/// # Examples
/// ```
/// use localsession_std::{is_flow_suppressed, suppress_flow};
/// assert!(!is_flow_suppressed());
/// let guard = suppress_flow();
/// assert!(is_flow_suppressed());
/// drop(guard);
/// assert!(!is_flow_suppressed());
/// ```
#[inline]
#[must_use]
pub fn is_flow_suppressed() -> bool {
    SUPPRESSED.try_with(|n| n.get() > 0).unwrap_or(true)
}

/// The session new work inherits: the current session, or none while the flow is suppressed.
/// Spawn helpers (yours too) capture this rather than [`current`](crate::current).
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_std::{flow_session, scope, without_flow};
///
/// scope(SessionMap::new(), || {
///     assert!(flow_session().is_some());
///     assert!(without_flow(flow_session).is_none());
/// });
/// ```
#[inline]
#[must_use]
pub fn flow_session() -> Option<AnySession> {
    if is_flow_suppressed() { None } else { crate::current() }
}

/// Restores the flow when dropped (see [`suppress_flow`]). `!Send`.
///
/// # Examples
/// ```
/// let guard = localsession_std::suppress_flow();
/// assert!(localsession_std::is_flow_suppressed());
/// drop(guard);
/// ```
#[derive(Debug)]
pub struct SuppressFlowGuard {
    _not_send: PhantomData<*const ()>,
}

impl Drop for SuppressFlowGuard {
    fn drop(&mut self) {
        let _ = SUPPRESSED.try_with(|n| n.set(n.get().saturating_sub(1)));
    }
}
