//! [`WithSession`]: a future that carries its session across every `.await`, on any executor.
//!
//! Follows tokio's `TaskLocalFuture` and tracing's `Instrumented`/`WithDispatch`: around every
//! `poll` — and around the inner future's drop — the wrapper swaps its session into the store's
//! slot for the running unit and swaps whatever the slot holds afterwards back out. Nothing is
//! cloned per poll. Because the session is taken back *from the slot*, a `bind` or `unbind`
//! inside the future sticks to the future (Go's `BindSession` inside a goroutine), and never
//! leaks into the next task the worker polls. A panic inside `poll` still restores the slot.
//! A session the future holds while its store is reset ([`ContextStore::generation`] changes:
//! the std adapter's `reset_default_manager`) is dropped at the next poll instead of being
//! installed: every binding from before a reset ends, also one an idle task carries.

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context as TaskContext, Poll};

use crate::session::AnySession;
use crate::store::{ContextStore, current, global_store};

/// The store type a [`WithSession`] installs its session in: any [`ContextStore`], named by its
/// type (the calls around each poll are then static and can be inlined), or `dyn ContextStore`
/// (the default type parameter: a store chosen at run time, or the [global
/// store](crate::global_store) when none is given). Implemented for both; nothing else
/// implements it.
///
/// # Examples
/// ```
/// use localsession_core::{SingleSlotStore, StoreType, WithSession};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// fn by_type<S: StoreType + ?Sized>(_: &WithSession<(), S>) {}
/// by_type(&WithSession::new_in_store(&STORE, (), None)); // S = SingleSlotStore
/// by_type(&WithSession::new((), None)); // S = dyn ContextStore
/// ```
pub trait StoreType: ContextStore + sealed::Sealed {
    /// The store to use: `store`, or for `dyn ContextStore` without one, the global store.
    #[doc(hidden)]
    fn resolve(store: Option<&'static Self>) -> Option<&'static Self>;
}

mod sealed {
    pub trait Sealed {}
    impl<S: super::ContextStore> Sealed for S {}
    impl Sealed for dyn super::ContextStore {}
}

impl<S: ContextStore> StoreType for S {
    #[inline]
    fn resolve(store: Option<&'static S>) -> Option<&'static S> {
        store
    }
}

impl StoreType for dyn ContextStore {
    #[inline]
    fn resolve(store: Option<&'static dyn ContextStore>) -> Option<&'static dyn ContextStore> {
        store.or_else(global_store)
    }
}

pin_project_lite::pin_project! {
    /// A future that runs with a session bound (see the [module docs](self)).
    ///
    /// The second type parameter is the store's type (see [`StoreType`]): `dyn ContextStore`
    /// unless the future was made with [`new_in_store`](WithSession::new_in_store).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{current, set_global_store, Context, FutureExt, SessionCtx, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// set_global_store(&STORE).unwrap();
    ///
    /// let s = SessionCtx::new(&Context::background()).with_value("req", 7u32);
    /// let fut = async { current().unwrap().value_cloned::<u32, _>(&"req") }.with_session(s);
    /// assert_eq!(futures::executor::block_on(fut), Some(7));
    /// assert!(current().is_none()); // nothing left behind
    /// ```
    #[must_use = "futures do nothing unless polled"]
    pub struct WithSession<F, S = dyn ContextStore>
    where
        S: ?Sized,
        S: StoreType,
    {
        store: Option<&'static S>,
        session: Option<AnySession>,
        // The store generation `session` belongs to (`None`: not known yet, no store was
        // resolvable when the future was made). A session held across a reset of the store is
        // dropped before the next poll, not installed again.
        generation: Option<u64>,
        #[pin]
        future: Option<F>,
    }

    impl<F, S> PinnedDrop for WithSession<F, S>
    where
        S: ?Sized,
        S: StoreType,
    {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if this.future.is_some() {
                let store = *this.store;
                with_swapped(store, this.session, this.generation, || this.future.set(None));
            }
        }
    }
}

impl<F> WithSession<F> {
    /// Wraps `future` so that it runs with `session` (or with none) bound in the default store.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{current, set_global_store, SessionMap, SingleSlotStore, WithSession};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// set_global_store(&STORE).unwrap();
    ///
    /// let map = SessionMap::new().with_value("k", 1u8);
    /// let fut = WithSession::new(async { current().unwrap().value_cloned::<u8, _>(&"k") }, Some(map.into()));
    /// assert_eq!(futures::executor::block_on(fut), Some(1));
    /// let bare = WithSession::new(async { current().is_none() }, None); // with no session
    /// assert!(futures::executor::block_on(bare));
    /// ```
    ///
    /// See also [`WithSession`].
    pub fn new(future: F, session: Option<AnySession>) -> Self {
        let generation = global_store().map(|store| store.generation());
        WithSession { store: None, session, generation, future: Some(future) }
    }

    /// Wraps `future` for a given store instead of the default one.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{with_current_in, Context, SessionCtx, SingleSlotStore, WithSession};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// let s = SessionCtx::new(&Context::background());
    /// let fut = WithSession::new_in(&STORE, async { with_current_in(&STORE, |s| s.is_some()) }, Some(s.into()));
    /// assert!(futures::executor::block_on(fut));
    /// ```
    pub fn new_in(store: &'static dyn ContextStore, future: F, session: Option<AnySession>) -> Self {
        WithSession { store: Some(store), session, generation: Some(store.generation()), future: Some(future) }
    }
}

impl<F, S: ContextStore> WithSession<F, S> {
    /// Wraps `future` for a store named by its type: the same future as
    /// [`new_in`](WithSession::new_in), whose calls into the store around each poll are
    /// static (the tokio and async-std adapters' spawn helpers use it with the std adapter's
    /// thread store).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{with_current_in, Context, SessionCtx, SingleSlotStore, WithSession};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// let s = SessionCtx::new(&Context::background()).with_value("k", 4u8);
    /// let fut: WithSession<_, SingleSlotStore> = WithSession::new_in_store(
    ///     &STORE,
    ///     async { with_current_in(&STORE, |s| s.unwrap().value_cloned::<u8, _>(&"k")) },
    ///     Some(s.into()),
    /// );
    /// assert_eq!(futures::executor::block_on(fut), Some(4));
    /// ```
    pub fn new_in_store(store: &'static S, future: F, session: Option<AnySession>) -> Self {
        WithSession { store: Some(store), session, generation: Some(store.generation()), future: Some(future) }
    }
}

impl<F, S: ?Sized + StoreType> WithSession<F, S> {
    /// The session the future will run with next.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{SessionMap, SingleSlotStore, WithSession};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// let map = SessionMap::new().with_value("k", 1u8);
    /// let fut = WithSession::new_in(&STORE, async {}, Some(map.into()));
    /// assert_eq!(fut.session().unwrap().value_cloned::<u8, _>(&"k"), Some(1));
    /// assert!(WithSession::new_in(&STORE, async {}, None).session().is_none());
    /// ```
    #[must_use]
    pub fn session(&self) -> Option<&AnySession> {
        self.session.as_ref()
    }
}

/// Runs `f` with `session` swapped into the store's slot, and swaps the slot's content back
/// into `session` afterwards (also when `f` panics). `stamp` is the store generation `session`
/// belongs to: a session from before a reset of the store (the future was idle, or made, when
/// it happened) is dropped here, in the future's own poll, instead of being installed — as a
/// thread's binding from before the reset reads as empty. Afterwards `stamp` is the generation
/// the slot's content was taken back in.
#[inline]
fn with_swapped<S: ?Sized + StoreType, R>(
    store: Option<&'static S>,
    session: &mut Option<AnySession>,
    stamp: &mut Option<u64>,
    f: impl FnOnce() -> R,
) -> R {
    let Some(store) = S::resolve(store) else { return f() };
    let generation = store.generation();
    if stamp.is_some_and(|held| held != generation) && !session.as_ref().is_some_and(|s| store.survives_reset(s)) {
        *session = None;
    }
    *stamp = Some(generation);
    let Some(token) = store.enter_scope(session) else {
        // The store cannot tell the running unit: run without; the session stays with us.
        return f();
    };
    // `session` now holds what the unit had before; the future's session is in the slot.
    struct Restore<'a, S: ?Sized + StoreType> {
        store: &'static S,
        generation: u64,
        token: u64,
        session: &'a mut Option<AnySession>,
        stamp: &'a mut Option<u64>,
    }
    impl<S: ?Sized + StoreType> Drop for Restore<'_, S> {
        fn drop(&mut self) {
            let now = self.store.generation();
            // The unit's binding from before a reset is not restored (see `EnterGuard`).
            if now != self.generation && !self.session.as_ref().is_some_and(|s| self.store.survives_reset(s)) {
                *self.session = None;
            }
            // What the exit takes back is of this generation at least: a store hands back no
            // binding from before its reset (the std thread store parks a stale one).
            *self.stamp = Some(now);
            // Swap back: what the slot holds now is the future's session from here on (a
            // `bind` inside the future sticks to it).
            self.store.exit_scope(self.session, self.token);
        }
    }
    let _restore = Restore { store, generation, token, session, stamp };
    f()
}

impl<F: Future, S: ?Sized + StoreType> Future for WithSession<F, S> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        let store = *this.store;
        with_swapped(store, this.session, this.generation, || {
            let poll = match this.future.as_mut().as_pin_mut() {
                Some(fut) => fut.poll(cx),
                None => panic!("`WithSession` polled after completion"),
            };
            if poll.is_ready() {
                // Drop the finished inner future now, with the session still bound.
                this.future.set(None);
            }
            poll
        })
    }
}

impl<F, S: ?Sized + StoreType> fmt::Debug for WithSession<F, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithSession").field("session", &self.session).finish_non_exhaustive()
    }
}

/// Session combinators for every future, on the process-wide default store.
///
/// The std adapter's `localsession_std::FutureExt` (re-exported by the tokio and async-std
/// adapters) has the same methods bound to the thread-local store; import one of the two.
///
/// # Examples
/// ```
/// use localsession_core::{current, set_global_store, FutureExt, SessionMap, SingleSlotStore};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// set_global_store(&STORE).unwrap();
///
/// let read = || async { current().and_then(|s| s.value_cloned::<u32, _>(&"user")) };
/// let map = SessionMap::new().with_value("user", 7u32);
/// assert_eq!(futures::executor::block_on(read().with_session(map)), Some(7));
/// assert_eq!(futures::executor::block_on(read().without_session()), None);
/// ```
pub trait FutureExt: Future + Sized {
    /// Runs this future with `session` bound (in the default store).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{current, set_global_store, FutureExt, SessionMap, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// set_global_store(&STORE).unwrap();
    ///
    /// let map = SessionMap::new();
    /// let fut = async { current().unwrap().as_map().unwrap().insert("seen", true) }.with_session(map.clone());
    /// futures::executor::block_on(fut);
    /// assert!(map.contains(&"seen")); // the future wrote into the shared map
    /// assert!(current().is_none()); // and left nothing bound
    /// ```
    ///
    /// See also [`WithSession`].
    fn with_session(self, session: impl Into<AnySession>) -> WithSession<Self> {
        WithSession::new(self, Some(session.into()))
    }

    /// Runs this future with the session that is current *now* (when this is called), wherever
    /// and whenever it is polled.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{scope, current, set_global_store, Context, FutureExt, SessionCtx, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// set_global_store(&STORE).unwrap();
    ///
    /// let s = SessionCtx::new(&Context::background()).with_value("k", 1u8);
    /// let fut = scope(s, || async { current().is_some() }.in_current_session());
    /// assert!(futures::executor::block_on(fut));
    /// ```
    fn in_current_session(self) -> WithSession<Self> {
        WithSession::new(self, current())
    }

    /// Runs this future with no session bound, whatever the polling unit has.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{scope, current, set_global_store, Context, FutureExt, SessionCtx, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// set_global_store(&STORE).unwrap();
    /// let s = SessionCtx::new(&Context::background());
    /// let fut = async { current().is_none() }.without_session();
    /// assert!(scope(s, || futures::executor::block_on(fut)));
    /// ```
    fn without_session(self) -> WithSession<Self> {
        WithSession::new(self, None)
    }
}

impl<F: Future> FutureExt for F {}

#[cfg(test)]
mod tests {
    use core::future::Future;
    use core::pin::pin;
    use core::sync::atomic::{AtomicU64, Ordering};
    use core::task::{Context as TaskContext, Poll, Waker};

    use super::WithSession;
    use crate::store::{ContextStore, SingleSlotStore};
    use crate::{AnySession, BindError, Context, SessionCtx};

    /// A one-slot store with a generation that the test bumps (what `reset_default_manager`
    /// does to the std thread store).
    struct Resettable {
        slot: SingleSlotStore,
        generation: AtomicU64,
    }

    impl ContextStore for Resettable {
        fn with_current(&self, f: &mut dyn FnMut(Option<&AnySession>)) {
            self.slot.with_current(f);
        }
        fn replace(&self, session: Option<AnySession>) -> Result<Option<AnySession>, BindError> {
            self.slot.replace(session)
        }
        fn generation(&self) -> u64 {
            self.generation.load(Ordering::Acquire)
        }
    }

    static STORE: Resettable = Resettable { slot: SingleSlotStore::new(), generation: AtomicU64::new(0) };

    fn current_value() -> Option<u8> {
        let mut v = None;
        STORE.with_current(&mut |s| v = s.and_then(|s| s.value_cloned::<u8, _>(&"k")));
        v
    }

    /// Regression: a `WithSession` idle while its store was reset installed its pre-reset
    /// session again at its next poll (the generation was compared only within one poll).
    /// Now the session it held is dropped and the future runs with none — also when the reset
    /// came before its first poll.
    #[test]
    fn a_session_held_across_a_reset_is_not_installed_again() {
        let mut cx = TaskContext::from_waker(Waker::noop());
        let session: AnySession = SessionCtx::new(&Context::background()).with_value("k", 7u8).into();
        let mut yielded = false;
        let body = core::future::poll_fn(|_| {
            if yielded {
                Poll::Ready(current_value())
            } else {
                yielded = true;
                Poll::Pending
            }
        });
        let mut fut = pin!(WithSession::new_in_store(&STORE, body, Some(session.clone())));
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert!(fut.session().is_some(), "held between polls");
        STORE.generation.fetch_add(1, Ordering::AcqRel); // the reset, while the future is idle
        assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(None));

        // Made before the reset, first polled after it.
        let early =
            WithSession::new_in_store(&STORE, core::future::poll_fn(|_| Poll::Ready(current_value())), Some(session));
        STORE.generation.fetch_add(1, Ordering::AcqRel);
        assert_eq!(pin!(early).poll(&mut cx), Poll::Ready(None));

        // Made and polled in one generation: the session is installed.
        let fresh: AnySession = SessionCtx::new(&Context::background()).with_value("k", 8u8).into();
        let now =
            WithSession::new_in_store(&STORE, core::future::poll_fn(|_| Poll::Ready(current_value())), Some(fresh));
        assert_eq!(pin!(now).poll(&mut cx), Poll::Ready(Some(8)));
    }
}
