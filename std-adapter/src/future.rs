//! [`FutureExt`]: sessions that follow a future, on any executor whose workers are OS threads.
//!
//! The core's [`WithSession`] swaps a session into a store's slot around every poll (and around
//! the future's drop). Bound to [`THREAD_STORE`] — the slot of the thread that polls — it gives
//! every executor built on OS threads (tokio, async-std, smol, async-executor, futures'
//! `ThreadPool`, your own) correct sessions across `.await`, with no runtime-specific code: the
//! tokio and async-std adapters re-export this trait.

use std::future::Future;

use localsession_core::{AnySession, WithSession};

use crate::store::THREAD_STORE;

/// Session combinators for futures, bound to the thread-local store.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{current, FutureExt};
///
/// let s = SessionCtx::new(&Context::background()).with_value("k", 1u8);
/// let fut = async { current().unwrap().value_cloned::<u8, _>(&"k") }.with_session(s);
/// // Any executor: here futures' single-threaded one.
/// assert_eq!(futures_lite_block_on(fut), Some(1));
/// # fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     use std::task::{Context, Poll, Waker};
/// #     let mut f = std::pin::pin!(f);
/// #     let mut cx = Context::from_waker(Waker::noop());
/// #     loop { if let Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v } }
/// # }
/// ```
pub trait FutureExt: Future + Sized {
    /// Runs this future with `session` bound, around every poll and around its drop.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, FutureExt};
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     use std::task::{Context, Poll, Waker};
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = Context::from_waker(Waker::noop());
    /// #     loop { if let Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v } }
    /// # }
    ///
    /// let map = SessionMap::new().with_value("k", 1u8);
    /// let v = block_on(async { current().unwrap().value_cloned::<u8, _>(&"k") }.with_session(map));
    /// assert_eq!(v, Some(1));
    /// assert!(current().is_none()); // swapped out again after each poll
    /// ```
    fn with_session(self, session: impl Into<AnySession>) -> WithSession<Self> {
        WithSession::new_in(&THREAD_STORE, self, Some(session.into()))
    }

    /// Runs this future with the session current *now* (none if none is bound).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, scope, FutureExt};
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     use std::task::{Context, Poll, Waker};
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = Context::from_waker(Waker::noop());
    /// #     loop { if let Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v } }
    /// # }
    ///
    /// let map = SessionMap::new().with_value("k", 2u8);
    /// let fut = scope(map, || async { current().unwrap().value_cloned::<u8, _>(&"k") }.in_current_session());
    /// // Polled later, outside the scope, it still runs with the session:
    /// assert_eq!(block_on(fut), Some(2));
    /// ```
    fn in_current_session(self) -> WithSession<Self> {
        WithSession::new_in(&THREAD_STORE, self, crate::flow_session())
    }

    /// Runs this future with no session bound, whatever the polling thread has.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, scope, FutureExt};
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     use std::task::{Context, Poll, Waker};
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = Context::from_waker(Waker::noop());
    /// #     loop { if let Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v } }
    /// # }
    ///
    /// let hidden = scope(SessionMap::new(), || block_on(async { current().is_none() }.without_session()));
    /// assert!(hidden); // the polling thread's session is not visible to the future
    /// ```
    fn without_session(self) -> WithSession<Self> {
        WithSession::new_in(&THREAD_STORE, self, None)
    }
}

impl<F: Future> FutureExt for F {}
