//! Where "the current session" lives: [`ContextStore`], the global store and the binding API.
//!
//! The binding API is [`bind`], [`unbind`], [`current`], [`with_current`], [`enter`] and
//! [`scope`]; [`EpochHandle`] and [`EpochGuard`] are what a `no_std` store hands to
//! `SessionMap` reads through [`ContextStore::pin_epoch`] (this module registers that as the
//! epoch pin source of [`primitive`](crate::primitive) when a store is set).
//!
//! The core knows nothing about threads or tasks. An adapter (or your executor) implements
//! [`ContextStore`] for its execution unit — a thread-local slot, a slot in a task struct, a map
//! keyed by task id ([`ShardedStore`](crate::ShardedStore)) — and registers it once with
//! [`set_global_store`], so that library code deep in a call stack can call [`current`] without
//! knowing the executor. [`LocalSlot`] is the building block for slots owned by one execution
//! unit: it hands out borrows of the current session without cloning it (no atomic
//! read-modify-write on the read path), and stays sound when the session is replaced while
//! borrowed.
//!
//! The scoped forms follow tracing-core's dispatcher and tokio's `task_local!`: [`enter`] returns
//! a `!Send` guard that restores the previous binding when dropped — also during a panic — and
//! [`scope`] is `let _guard = enter(session); f()`.

use core::cell::{Cell, UnsafeCell};
use core::fmt;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ptr;

use alloc::vec::Vec;

use crate::global::Global;
use crate::primitive::epoch::{self, PinSource, collector};
use crate::session::AnySession;

/// The slot of "the current session" for the running execution unit.
///
/// Implementations decide what the unit is (a thread, a task, a core). The methods act on the
/// unit that calls them.
///
/// # Examples
/// A store for a single-threaded executor whose tasks each carry a [`LocalSlot`]; see also
/// `tests/examples/custom_executor.rs` in the repository for a complete executor.
/// ```
/// use localsession_core::{AnySession, BindError, ContextStore, SingleSlotStore, Context, SessionCtx};
///
/// static STORE: SingleSlotStore = SingleSlotStore::new();
///
/// let s = SessionCtx::new(&Context::background()).with_value("k", 1u8);
/// assert!(STORE.replace(Some(s.into())).unwrap().is_none());
/// STORE.with_current(&mut |cur| {
///     assert_eq!(cur.unwrap().value_cloned::<u8, _>(&"k"), Some(1));
/// });
/// assert!(STORE.replace(None).unwrap().is_some());
/// ```
pub trait ContextStore: Send + Sync + 'static {
    /// Calls `f` with the session bound to the running unit, without cloning it.
    ///
    /// `f` may call back into the store (bind, unbind, read); implementations must stay sound
    /// and must not deadlock when it does.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ContextStore, SessionMap, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// STORE.replace(Some(SessionMap::new().with_value("k", 1u8).into())).unwrap();
    /// let mut seen = None;
    /// STORE.with_current(&mut |s| seen = s.and_then(|s| s.value_cloned::<u8, _>(&"k")));
    /// assert_eq!(seen, Some(1));
    /// ```
    fn with_current(&self, f: &mut dyn FnMut(Option<&AnySession>));

    /// Binds `session` to the running unit (`None` clears it) and returns the previous binding.
    ///
    /// # Errors
    /// [`BindError`] if the store cannot tell which unit is running (for example a task-keyed
    /// store called outside any task, or a thread-local slot during thread teardown). The
    /// session is handed back inside the error: nothing is lost.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ContextStore, SessionMap, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// let map = SessionMap::new();
    /// assert!(STORE.replace(Some(map.clone().into())).unwrap().is_none());
    /// let previous = STORE.replace(None).unwrap().unwrap();
    /// assert!(previous.as_map().unwrap().ptr_eq(&map));
    /// ```
    fn replace(&self, session: Option<AnySession>) -> Result<Option<AnySession>, BindError>;

    /// Exchanges the running unit's session with `*session` in place: the hot path of
    /// [`WithSession`](crate::WithSession) and [`EnterGuard`] (twice per poll or scope). Returns
    /// `false`, leaving `*session` as it was, if the store cannot tell the running unit.
    ///
    /// The default goes through [`replace`](ContextStore::replace); stores built on a
    /// [`LocalSlot`] should override it with [`LocalSlot::swap`], which moves nothing but the two
    /// handles (passing a session by value costs store-forwarding stalls that dominate the
    /// few nanoseconds of the rest).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ContextStore, SessionMap, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// let mut s = Some(SessionMap::new().into());
    /// assert!(STORE.swap(&mut s));
    /// assert!(s.is_none()); // what the slot held: nothing
    /// assert!(STORE.swap(&mut s) && s.is_some()); // and back out
    /// ```
    #[inline]
    fn swap(&self, session: &mut Option<AnySession>) -> bool {
        match self.replace(session.take()) {
            Ok(previous) => {
                *session = previous;
                true
            }
            Err(e) => {
                *session = e.into_session();
                false
            }
        }
    }

    /// The store's generation: a store that can be reset (the std adapter's
    /// `reset_default_manager`) changes it, so that guards made before a reset do not restore
    /// bindings from before it. Stores that are never reset keep the default (0).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ContextStore, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// assert_eq!(STORE.generation(), 0); // never reset
    /// ```
    fn generation(&self) -> u64 {
        0
    }

    /// Whether `session` stays bound across a reset of this store (see
    /// [`generation`](ContextStore::generation)): guards and `WithSession` futures made before
    /// a reset restore such a session instead of dropping it. The std adapter's thread store
    /// says so of its shared workers' marker session, which is no request's; the default is
    /// `false` (a reset ends every binding).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ContextStore, SessionMap, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// assert!(!STORE.survives_reset(&SessionMap::new().into()));
    /// ```
    fn survives_reset(&self, session: &AnySession) -> bool {
        let _ = session;
        false
    }

    /// Opens a scope: exchanges the running unit's session with `*session` like
    /// [`swap`](ContextStore::swap), for a scope that [`exit_scope`](ContextStore::exit_scope)
    /// closes on the same unit ([`EnterGuard`], each poll of [`WithSession`](crate::WithSession)).
    /// Returns a token to pass to `exit_scope`, or `None` (leaving `*session` as it was) if the
    /// store cannot tell the running unit.
    ///
    /// Stores that attach state to a binding — the std adapter tags a binding made inside a
    /// task of a runtime without hooks with that task, so that other tasks on the thread never
    /// see it — save it in the token and restore it on exit. The default is `swap` with a token
    /// of 0.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ContextStore, SessionMap, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// let mut s = Some(SessionMap::new().into());
    /// let token = STORE.enter_scope(&mut s).unwrap();
    /// assert!(s.is_none()); // the unit had nothing before
    /// STORE.exit_scope(&mut s, token);
    /// assert!(s.is_some()); // the scope's session came back
    /// ```
    fn enter_scope(&self, session: &mut Option<AnySession>) -> Option<u64> {
        self.swap(session).then_some(0)
    }

    /// Closes a scope opened by [`enter_scope`](ContextStore::enter_scope) with its `token`:
    /// exchanges the unit's session with `*session` (the binding from before the scope) and
    /// restores what the token saved.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ContextStore, SessionMap, SingleSlotStore, with_current_in};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// let mut s = Some(SessionMap::new().into());
    /// let token = STORE.enter_scope(&mut s).unwrap();
    /// assert!(with_current_in(&STORE, |cur| cur.is_some()));
    /// STORE.exit_scope(&mut s, token);
    /// assert!(with_current_in(&STORE, |cur| cur.is_none()));
    /// ```
    fn exit_scope(&self, session: &mut Option<AnySession>, token: u64) {
        let _ = token;
        self.swap(session);
    }

    /// An epoch guard for reading [`SessionMap`](crate::SessionMap)s, for `no_std` executors
    /// that register an [`EpochHandle`] per execution unit. The default (`None`)
    /// makes reads register a handle for their duration. Unused with the `std` feature, which
    /// uses crossbeam-epoch's default collector.
    ///
    /// The guard is an [`EpochGuard`], which can only be made by pinning an [`EpochHandle`] of
    /// this crate's collector: a guard of any other collector would not hold back the
    /// reclamation of the chains a read walks.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ContextStore, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new();
    /// assert!(STORE.pin_epoch().is_none()); // the default: reads register a handle themselves
    /// ```
    fn pin_epoch(&self) -> Option<EpochGuard> {
        None
    }
}

/// Binding failed; the session is returned.
///
/// # Examples
/// ```
/// use localsession_core::{bind, Context, SessionCtx};
/// // No global store is registered in this doctest's process:
/// let err = bind(SessionCtx::new(&Context::background())).unwrap_err();
/// assert!(err.into_session().is_some());
/// ```
pub struct BindError {
    session: Option<AnySession>,
    reason: &'static str,
}

impl BindError {
    /// A bind error for stores that cannot identify the running unit; `reason` says why.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{BindError, SessionMap};
    /// let err = BindError::new(Some(SessionMap::new().into()), "not inside a task");
    /// assert_eq!(err.to_string(), "cannot bind the session: not inside a task");
    /// assert!(err.into_session().is_some());
    /// ```
    #[must_use]
    pub fn new(session: Option<AnySession>, reason: &'static str) -> BindError {
        BindError { session, reason }
    }

    pub(crate) fn no_store(session: Option<AnySession>) -> BindError {
        BindError::new(
            session,
            "no global context store is registered (initialize an adapter, e.g. \
             localsession_std::init_default_manager, or call localsession_core::set_global_store)",
        )
    }

    /// The session that could not be bound.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{bind, SessionMap};
    /// let map = SessionMap::new();
    /// // No store is registered in this doctest's process, so binding fails...
    /// let err = bind(map.clone()).unwrap_err();
    /// // ...and hands the session back.
    /// assert!(err.into_session().unwrap().as_map().unwrap().ptr_eq(&map));
    /// ```
    #[must_use]
    pub fn into_session(self) -> Option<AnySession> {
        self.session
    }
}

impl fmt::Debug for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BindError").field("reason", &self.reason).finish_non_exhaustive()
    }
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot bind the session: {}", self.reason)
    }
}

impl core::error::Error for BindError {}

static GLOBAL_STORE: Global<dyn ContextStore> = Global::new();

/// Registers the process-wide default store (once; like `log::set_logger`).
///
/// # Errors
/// [`SetGlobalStoreError`] if a store was registered already (or is being registered).
///
/// # Examples
/// ```
/// use localsession_core::{set_global_store, global_store, SingleSlotStore};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// assert!(set_global_store(&STORE).is_ok());
/// assert!(set_global_store(&STORE).is_err());
/// assert!(global_store().is_some());
/// ```
pub fn set_global_store(store: &'static dyn ContextStore) -> Result<(), SetGlobalStoreError> {
    // Registered before the store becomes visible, so that no `no_std` map read made after
    // `global_store()` returns the store misses its `pin_epoch`.
    epoch::set_pin_source(&PIN_FROM_GLOBAL_STORE);
    GLOBAL_STORE.set(store).map_err(|()| SetGlobalStoreError(()))
}

/// How `no_std` `SessionMap` reads get an epoch guard from the registered store (see
/// [`epoch::set_pin_source`]): the inner guard of the store's [`EpochGuard`], which is pinned in
/// [`collector`] by construction.
static PIN_FROM_GLOBAL_STORE: PinSource = || global_store().and_then(|s| s.pin_epoch()).map(EpochGuard::into_inner);

/// The registered default store.
///
/// # Examples
/// ```
/// assert!(localsession_core::global_store().is_none());
/// ```
#[inline]
#[must_use]
pub fn global_store() -> Option<&'static dyn ContextStore> {
    GLOBAL_STORE.get()
}

/// The error of a second [`set_global_store`].
///
/// # Examples
/// ```
/// use localsession_core::{set_global_store, SingleSlotStore};
/// static FIRST: SingleSlotStore = SingleSlotStore::new();
/// static SECOND: SingleSlotStore = SingleSlotStore::new();
/// set_global_store(&FIRST).unwrap();
/// let err = set_global_store(&SECOND).unwrap_err();
/// assert_eq!(err.to_string(), "a global context store has already been set");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetGlobalStoreError(());

impl fmt::Display for SetGlobalStoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a global context store has already been set")
    }
}

impl core::error::Error for SetGlobalStoreError {}

/// An execution unit's registration with the epoch collector that `SessionMap` reads pin (the
/// crate's own: a handle of any other collector cannot be made). `no_std` executors register
/// one per execution unit and return [`EpochGuard`]s pinned from it in
/// [`ContextStore::pin_epoch`], so that map reads do not register a handle each.
///
/// `!Send`, like the crossbeam-epoch `LocalHandle` it wraps (crossbeam-epoch is not part of this
/// crate's public API).
///
/// # Examples
/// ```
/// use localsession_core::{EpochGuard, EpochHandle};
/// let handle = EpochHandle::register();
/// let guard = EpochGuard::pin(&handle);
/// assert!(handle.is_pinned());
/// drop(guard);
/// assert!(!handle.is_pinned());
/// ```
pub struct EpochHandle(crossbeam_epoch::LocalHandle);

impl EpochHandle {
    /// Registers a new participant with the crate's collector.
    ///
    /// # Examples
    /// ```
    /// assert!(!localsession_core::EpochHandle::register().is_pinned());
    /// ```
    #[must_use]
    pub fn register() -> EpochHandle {
        EpochHandle(collector().register())
    }

    /// Whether a guard of this handle is alive.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{EpochGuard, EpochHandle};
    /// let handle = EpochHandle::register();
    /// let _guard = EpochGuard::pin(&handle);
    /// assert!(handle.is_pinned());
    /// ```
    #[must_use]
    pub fn is_pinned(&self) -> bool {
        self.0.is_pinned()
    }
}

impl fmt::Debug for EpochHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochHandle").field("pinned", &self.is_pinned()).finish()
    }
}

/// A pinned epoch guard of the crate's collector: what [`ContextStore::pin_epoch`] hands to
/// [`SessionMap`](crate::SessionMap) reads.
///
/// It can only be made by [`EpochGuard::pin`] from an [`EpochHandle`], and an `EpochHandle` can
/// only be registered with the crate's collector, so a store cannot make reads pin a collector
/// that the map's writers do not wait for: the type system rules it out.
///
/// # Examples
/// ```
/// use localsession_core::{EpochGuard, EpochHandle};
/// let handle = EpochHandle::register();
/// let guard = EpochGuard::pin(&handle);
/// guard.flush(); // runs pending deferred reclamation, if the epoch allows
/// ```
pub struct EpochGuard(epoch::Guard);

impl EpochGuard {
    /// Pins `handle`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{EpochGuard, EpochHandle};
    /// let handle = EpochHandle::register();
    /// let guard = EpochGuard::pin(&handle);
    /// assert!(handle.is_pinned());
    /// drop(guard);
    /// assert!(!handle.is_pinned());
    /// ```
    #[must_use]
    pub fn pin(handle: &EpochHandle) -> EpochGuard {
        EpochGuard(handle.0.pin())
    }

    /// Tries to advance the epoch and run the reclamation it makes due (old `SessionMap`
    /// chains are released to their maps' writers this way). Useful at shutdown and in tests.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{EpochGuard, EpochHandle};
    /// EpochGuard::pin(&EpochHandle::register()).flush();
    /// ```
    pub fn flush(&self) {
        self.0.flush();
    }

    /// The underlying crossbeam guard (pinned in [`collector`]).
    pub(crate) fn into_inner(self) -> epoch::Guard {
        self.0
    }
}

impl fmt::Debug for EpochGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochGuard").finish_non_exhaustive()
    }
}

/// A clone of the current session of the default store (Go `CurSession`).
///
/// Cloning is one reference-count increment; to read without it, use [`with_current`].
///
/// # Examples
/// ```
/// // No store registered: nothing is current.
/// assert!(localsession_core::current().is_none());
/// ```
#[must_use]
pub fn current() -> Option<AnySession> {
    with_current(|s| s.cloned())
}

/// Calls `f` with the current session of the default store, borrowed (no clone).
///
/// # Examples
/// ```
/// use localsession_core::with_current;
/// assert_eq!(with_current(|s| s.is_some()), false);
/// ```
#[inline]
pub fn with_current<R>(f: impl FnOnce(Option<&AnySession>) -> R) -> R {
    match global_store() {
        Some(store) => with_current_in(store, f),
        None => f(None),
    }
}

/// Calls `f` with the current session of `store`, borrowed.
///
/// # Examples
/// ```
/// use localsession_core::{with_current_in, SingleSlotStore};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// assert!(with_current_in(&STORE, |s| s.is_none()));
/// ```
#[inline]
pub fn with_current_in<R>(store: &dyn ContextStore, f: impl FnOnce(Option<&AnySession>) -> R) -> R {
    let mut f = Some(f);
    let mut out = None;
    store.with_current(&mut |s| {
        if let Some(f) = f.take() {
            out = Some(f(s));
        }
    });
    match (out, f) {
        (Some(r), _) => r,
        // A store that never called back (it could not tell the unit): nothing is current.
        (None, Some(f)) => f(None),
        (None, None) => unreachable!("callback consumed without a result"),
    }
}

/// Binds `session` to the running unit in the default store until it is unbound or replaced
/// (Go `BindSession`). The previous binding is dropped.
///
/// # Errors
/// [`BindError`] (with the session inside) if no store is registered or the store cannot tell
/// the running unit.
///
/// # Examples
/// ```
/// use localsession_core::{bind, Context, SessionCtx};
/// assert!(bind(SessionCtx::new(&Context::background())).is_err()); // no store here
/// ```
pub fn bind(session: impl Into<AnySession>) -> Result<(), BindError> {
    let session = session.into();
    let store = global_store().ok_or_else(|| BindError::no_store(Some(session.clone())))?;
    // The previous session is dropped here, outside the store's slot.
    store.replace(Some(session)).map(drop)
}

/// Removes the binding of the running unit in the default store and returns it (Go
/// `UnbindSession`).
///
/// # Examples
/// ```
/// assert!(localsession_core::unbind().is_none());
/// ```
pub fn unbind() -> Option<AnySession> {
    global_store().and_then(|s| s.replace(None).ok().flatten())
}

/// Binds `session` to the running unit of the default store until the guard is dropped, then
/// restores the previous binding — also when unwinding from a panic. If no store is
/// registered, the guard does nothing.
///
/// # Examples
/// ```
/// use localsession_core::{enter, current, set_global_store, Context, SessionCtx, SingleSlotStore};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// set_global_store(&STORE).unwrap();
///
/// let s = SessionCtx::new(&Context::background());
/// {
///     let _guard = enter(s.clone());
///     assert!(current().is_some());
/// }
/// assert!(current().is_none());
/// ```
pub fn enter(session: impl Into<AnySession>) -> EnterGuard {
    match global_store() {
        Some(store) => enter_in(store, session),
        None => EnterGuard { store: None, prev: None, generation: 0, token: 0, _not_send: PhantomData },
    }
}

/// [`enter`] on a given store.
///
/// # Examples
/// ```
/// use localsession_core::{enter_in, with_current_in, Context, SessionCtx, SingleSlotStore};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// let guard = enter_in(&STORE, SessionCtx::new(&Context::background()));
/// assert!(with_current_in(&STORE, |s| s.is_some()));
/// drop(guard);
/// assert!(with_current_in(&STORE, |s| s.is_none()));
/// ```
pub fn enter_in(store: &'static dyn ContextStore, session: impl Into<AnySession>) -> EnterGuard {
    enter_option_in(store, Some(session.into()))
}

/// [`enter_in`] with an optional session: `None` runs the guard's scope with *no* session bound
/// (a pool job that must not see what its thread had). The previous binding is restored when
/// the guard drops, as with [`enter_in`].
///
/// # Examples
/// ```
/// use localsession_core::{enter_in, enter_option_in, with_current_in, SessionMap, SingleSlotStore};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// let _outer = enter_in(&STORE, SessionMap::new());
/// {
///     let _none = enter_option_in(&STORE, None);
///     assert!(with_current_in(&STORE, |s| s.is_none()));
/// }
/// assert!(with_current_in(&STORE, |s| s.is_some())); // restored
/// ```
pub fn enter_option_in(store: &'static dyn ContextStore, session: Option<AnySession>) -> EnterGuard {
    let generation = store.generation();
    let mut slot = session;
    match store.enter_scope(&mut slot) {
        Some(token) => EnterGuard { store: Some(store), prev: slot, generation, token, _not_send: PhantomData },
        None => EnterGuard { store: None, prev: None, generation: 0, token: 0, _not_send: PhantomData },
    }
}

/// Runs `f` with `session` bound in the default store, restoring the previous binding after
/// (also on panic). `scope(s, f)` is `let _guard = enter(s); f()`.
///
/// # Examples
/// ```
/// use localsession_core::{scope, current, set_global_store, Context, SessionCtx, SingleSlotStore};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// set_global_store(&STORE).unwrap();
///
/// let s = SessionCtx::new(&Context::background()).with_value("k", 2u8);
/// let v = scope(s, || current().unwrap().value_cloned::<u8, _>(&"k"));
/// assert_eq!(v, Some(2));
/// assert!(current().is_none());
/// ```
pub fn scope<R>(session: impl Into<AnySession>, f: impl FnOnce() -> R) -> R {
    let _guard = enter(session);
    f()
}

/// Restores the previous binding when dropped. `!Send`: it must be dropped on the execution
/// unit that made it. If the store was reset meanwhile ([`ContextStore::generation`] changed),
/// the previous binding belonged to the old generation and is not restored: the slot is left
/// empty.
///
/// Guards must be dropped in the reverse order of their creation, as Rust drops locals. Each
/// guard restores what was bound when *it* was created, so `drop(outer); drop(inner);` ends
/// with the *outer* guard's session bound (the inner guard restores it last) — on a pool
/// thread, the next job would see it. Mind struct fields (dropped in declaration order, so
/// declare the inner guard first) and `Vec`s of guards (dropped front to back); prefer
/// [`scope`] where the work is a closure. (The order is not checked: a guard held across an
/// `.await` in a `WithSession` future is legitimately dropped after guards of other tasks on
/// the same thread were created and dropped, so a per-thread order would refuse correct code.)
///
/// # Examples
/// ```
/// use localsession_core::{current, enter, set_global_store, SessionMap, SingleSlotStore};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// set_global_store(&STORE).unwrap();
///
/// let _outer = enter(SessionMap::new().with_value("who", "outer"));
/// {
///     let _inner = enter(SessionMap::new().with_value("who", "inner"));
///     assert_eq!(current().unwrap().value_cloned::<&str, _>(&"who"), Some("inner"));
/// }
/// assert_eq!(current().unwrap().value_cloned::<&str, _>(&"who"), Some("outer")); // restored
/// ```
#[must_use = "dropping the guard restores the previous session"]
pub struct EnterGuard {
    store: Option<&'static dyn ContextStore>,
    prev: Option<AnySession>,
    generation: u64,
    /// The store's [`enter_scope`](ContextStore::enter_scope) token.
    token: u64,
    _not_send: PhantomData<*const ()>,
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        if let Some(store) = self.store {
            if store.generation() != self.generation && !self.prev.as_ref().is_some_and(|p| store.survives_reset(p)) {
                self.prev = None;
            }
            // The session we entered comes back into `prev` and is dropped with the guard,
            // outside the slot.
            store.exit_scope(&mut self.prev, self.token);
        }
    }
}

impl fmt::Debug for EnterGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnterGuard").field("active", &self.store.is_some()).finish_non_exhaustive()
    }
}

/// A slot for one execution unit (a thread-local, a task struct): the building block of
/// [`ContextStore`] implementations.
///
/// [`LocalSlot::with`] lends the current session without cloning it: it makes a bitwise view
/// of the slot's handle and links a small record of that view (on its own stack frame) into
/// the slot's list of active readers — no allocation and no atomic read-modify-write.
///
/// The retirement rule: when the slot is replaced ([`replace`](LocalSlot::replace),
/// [`swap`](LocalSlot::swap)) while readers are active, the old session is still handed back
/// to the caller; if an active reader views that very session, the slot also keeps one clone
/// of it in a *retired* list, and drops that clone as soon as the last reader viewing it
/// returns. A session nobody views is not kept alive: at most one clone per distinct viewed
/// session (so at most the readers' nesting depth) is retired at any time, however many
/// replacements happen during a read. Without active readers, replacing costs nothing extra.
/// `!Sync`: one unit uses it at a time.
///
/// # Examples
/// ```
/// use localsession_core::{Context, LocalSlot, SessionCtx};
/// let slot = LocalSlot::new();
/// let s = SessionCtx::new(&Context::background()).with_value("k", 1u8);
/// slot.replace(Some(s.into()));
/// slot.with(|cur| {
///     // Replacing while borrowed is fine: `cur` stays valid.
///     let _old = slot.replace(None);
///     assert_eq!(cur.unwrap().value_cloned::<u8, _>(&"k"), Some(1));
/// });
/// assert!(slot.with(|cur| cur.is_none()));
/// ```
pub struct LocalSlot {
    current: UnsafeCell<Option<AnySession>>,
    /// The innermost active reader's record, or null; records link outwards.
    readers: Cell<*const ReaderFrame>,
    /// One clone of each replaced session that an active reader views.
    retired: UnsafeCell<Vec<AnySession>>,
}

/// What one active [`LocalSlot::with`] views; lives on that call's stack frame.
struct ReaderFrame {
    /// A bitwise copy of the slot's handle, never dropped.
    view: ManuallyDrop<Option<AnySession>>,
    /// The next reader outwards, or null.
    outer: *const ReaderFrame,
}

// SAFETY: a slot moves between threads only with its owner (a task struct); all its state is
// owned, and `readers` is null whenever the slot can be moved (a reader borrows the slot). It
// is deliberately not `Sync`.
unsafe impl Send for LocalSlot {}

impl LocalSlot {
    /// An empty slot.
    ///
    /// # Examples
    /// ```
    /// let slot = localsession_core::LocalSlot::new();
    /// assert!(slot.with(|s| s.is_none()));
    /// ```
    #[must_use]
    pub const fn new() -> LocalSlot {
        LocalSlot {
            current: UnsafeCell::new(None),
            readers: Cell::new(ptr::null()),
            retired: UnsafeCell::new(Vec::new()),
        }
    }

    /// Calls `f` with the slot's session, borrowed.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{LocalSlot, SessionMap};
    /// let slot = LocalSlot::new();
    /// assert!(slot.with(|s| s.is_none()));
    /// slot.replace(Some(SessionMap::new().with_value("k", 1u8).into()));
    /// assert_eq!(slot.with(|s| s.and_then(|s| s.value_cloned::<u8, _>(&"k"))), Some(1));
    /// ```
    ///
    /// See also [`LocalSlot`].
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(Option<&AnySession>) -> R) -> R {
        let frame = ReaderFrame {
            // SAFETY: a bitwise copy of the handle, never dropped (`ManuallyDrop`). The session
            // it points to stays alive while the frame is linked: the handle it copies is owned
            // by `current` until a `replace`/`swap` moves it out, which then parks a clone in
            // `retired` because this frame views it (see `retire`). `AnySession` holds only
            // reference-counted raw pointers (no `Box`, no `&mut`), so a bitwise copy aliases
            // nothing exclusively.
            view: ManuallyDrop::new(unsafe { ptr::read(self.current.get()) }),
            outer: self.readers.get(),
        };
        // The frame is not moved while linked: `_reader` unlinks it before it goes away (also
        // when `f` unwinds).
        self.readers.set(&frame);
        let _reader = Reader { slot: self, frame: &frame };
        f(frame.view.as_ref())
    }

    /// Puts `session` in the slot (`None` empties it) and returns what was there.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{LocalSlot, SessionMap};
    /// let slot = LocalSlot::new();
    /// assert!(slot.replace(Some(SessionMap::new().into())).is_none());
    /// let old = slot.replace(None);
    /// assert!(old.is_some() && !slot.is_set());
    /// ```
    ///
    /// See also [`LocalSlot`].
    pub fn replace(&self, session: Option<AnySession>) -> Option<AnySession> {
        // SAFETY: no reference into `current` is ever held across calls (readers hold copies),
        // and the slot is used by one unit at a time (`!Sync`).
        let old = unsafe { ptr::replace(self.current.get(), session) };
        self.retire(&old);
        old
    }

    /// Exchanges the slot's session with `*other` in place (the cheapest form of
    /// [`replace`](LocalSlot::replace): nothing is moved but the two handles).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{LocalSlot, SessionMap};
    /// let slot = LocalSlot::new();
    /// let mut s = Some(SessionMap::new().into());
    /// slot.swap(&mut s);
    /// assert!(s.is_none() && slot.is_set());
    /// slot.swap(&mut s);
    /// assert!(s.is_some() && !slot.is_set());
    /// ```
    #[inline]
    pub fn swap(&self, other: &mut Option<AnySession>) {
        // SAFETY: as in `replace`; `other` is a distinct place (a `&mut` cannot alias the slot).
        unsafe { ptr::swap(self.current.get(), other) };
        self.retire(other);
    }

    /// Keeps a clone of `old`, just moved out of the slot, if an active reader views it.
    ///
    /// Checks for readers *before* looking at `old`: `old` was just written by the swap, and
    /// reading its discriminant first made every swap wait on a store-forwarding stall.
    #[inline]
    fn retire(&self, old: &Option<AnySession>) {
        if self.readers.get().is_null() {
            return;
        }
        if let Some(old) = old {
            self.retire_viewed(old);
        }
    }

    #[cold]
    fn retire_viewed(&self, old: &AnySession) {
        if !self.is_viewed(old, self.readers.get()) {
            return;
        }
        // SAFETY: no other reference to `retired` exists (they are all momentary, and the slot
        // is used by one unit at a time); `ptr_eq`, `clone` and `push` run no user code.
        let retired = unsafe { &mut *self.retired.get() };
        if !retired.iter().any(|r| r.ptr_eq(old)) {
            retired.push(old.clone());
        }
    }

    /// Whether a reader from `frame` outwards views `session`.
    fn is_viewed(&self, session: &AnySession, mut frame: *const ReaderFrame) -> bool {
        while !frame.is_null() {
            // SAFETY: linked frames are alive (each is unlinked before its `with` returns) and
            // only read.
            let f = unsafe { &*frame };
            if f.view.as_ref().is_some_and(|v| v.ptr_eq(session)) {
                return true;
            }
            frame = f.outer;
        }
        false
    }

    /// After `frame` was unlinked: drops the retired clone of the session it viewed, unless an
    /// outer reader views it too.
    #[cold]
    fn release(&self, frame: &ReaderFrame) {
        let outer = self.readers.get();
        let dead: Vec<AnySession> = {
            // SAFETY: as in `retire_viewed`; the borrow ends before anything is dropped.
            let retired = unsafe { &mut *self.retired.get() };
            if outer.is_null() {
                core::mem::take(retired)
            } else {
                let Some(view) = frame.view.as_ref() else { return };
                let Some(i) = retired.iter().position(|r| r.ptr_eq(view)) else { return };
                if self.is_viewed(view, outer) {
                    return;
                }
                alloc::vec![retired.swap_remove(i)]
            }
        };
        // Dropped outside every borrow of the slot: a session's drop may use the slot again.
        drop(dead);
    }

    /// A clone of the slot's session. Unlike [`with`](LocalSlot::with) it links no reader
    /// frame: a clone only increments a reference count and runs no user code, so nothing can
    /// replace the slot while it is read.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{LocalSlot, SessionMap};
    /// let slot = LocalSlot::new();
    /// assert!(slot.cloned().is_none());
    /// let map = SessionMap::new();
    /// slot.replace(Some(map.clone().into()));
    /// assert!(slot.cloned().unwrap().as_map().unwrap().ptr_eq(&map));
    /// ```
    #[inline]
    #[must_use]
    pub fn cloned(&self) -> Option<AnySession> {
        // SAFETY: a momentary shared read, as in `is_set`. Cloning an `AnySession` increments a
        // reference count (a node's, or an `Arc`'s — also for `Custom`) and calls no user
        // code, so no `replace`/`swap` of this slot can run while the reference exists.
        unsafe { (*self.current.get()).clone() }
    }

    /// Whether a session is in the slot.
    ///
    /// # Examples
    /// ```
    /// let slot = localsession_core::LocalSlot::new();
    /// assert!(!slot.is_set());
    /// ```
    #[must_use]
    pub fn is_set(&self) -> bool {
        // SAFETY: a momentary shared read; no mutable access can be active (single unit).
        unsafe { (*self.current.get()).is_some() }
    }
}

struct Reader<'a> {
    slot: &'a LocalSlot,
    frame: &'a ReaderFrame,
}

impl Drop for Reader<'_> {
    #[inline]
    fn drop(&mut self) {
        let slot = self.slot;
        slot.readers.set(self.frame.outer);
        // SAFETY: a momentary shared read of `retired` (single unit, no other borrow).
        if unsafe { !(*slot.retired.get()).is_empty() } {
            slot.release(self.frame);
        }
    }
}

impl Default for LocalSlot {
    fn default() -> Self {
        LocalSlot::new()
    }
}

impl fmt::Debug for LocalSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSlot").field("set", &self.is_set()).finish_non_exhaustive()
    }
}

/// A store with one slot for the whole program: for single-core `no_std` targets, or an
/// executor that swaps the slot around each task poll itself.
///
/// Thread-safe (a spin lock guards the slot, and it is never held while user code runs):
/// [`with_current`](ContextStore::with_current) clones the session out and calls `f` unlocked.
///
/// # Examples
/// ```
/// use localsession_core::{ContextStore, SingleSlotStore};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// assert!(STORE.replace(None).unwrap().is_none());
/// ```
pub struct SingleSlotStore {
    slot: spin::Mutex<Option<AnySession>>,
}

impl SingleSlotStore {
    /// An empty store, usable in a `static`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{with_current_in, ContextStore, SessionMap, SingleSlotStore};
    /// static STORE: SingleSlotStore = SingleSlotStore::new(); // `const`: no lazy initialization
    /// assert!(with_current_in(&STORE, |s| s.is_none()));
    /// STORE.replace(Some(SessionMap::new().into())).unwrap();
    /// assert!(with_current_in(&STORE, |s| s.is_some()));
    /// ```
    #[must_use]
    pub const fn new() -> SingleSlotStore {
        SingleSlotStore { slot: spin::Mutex::new(None) }
    }
}

impl Default for SingleSlotStore {
    fn default() -> Self {
        SingleSlotStore::new()
    }
}

impl ContextStore for SingleSlotStore {
    fn with_current(&self, f: &mut dyn FnMut(Option<&AnySession>)) {
        let cur = self.slot.lock().clone();
        f(cur.as_ref());
    }

    fn replace(&self, session: Option<AnySession>) -> Result<Option<AnySession>, BindError> {
        Ok(core::mem::replace(&mut *self.slot.lock(), session))
    }
}

impl fmt::Debug for SingleSlotStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleSlotStore").field("set", &self.slot.lock().is_some()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cloned` reads the slot without a reader frame: its clones stay valid after the slot is
    /// replaced (also inside a reader) and after the original handle is dropped (miri checks the
    /// raw read).
    #[test]
    fn cloned_hands_out_independent_handles() {
        // A `SessionCtx`, not a `SessionMap`: the lib tests run under stacked borrows, which
        // crossbeam-epoch (the map's reads) does not pass.
        use crate::{Context, SessionCtx};
        let slot = LocalSlot::new();
        assert!(slot.cloned().is_none());
        let session = SessionCtx::new(&Context::background()).with_value("k", 1u8);
        slot.replace(Some(session.clone().into()));
        let a = slot.cloned().expect("bound");
        let b = slot.with(|_| {
            let inner = slot.cloned();
            drop(slot.replace(None)); // replaced while a reader is active
            inner
        });
        assert!(slot.cloned().is_none());
        drop(session);
        assert_eq!(a.value_cloned::<u8, _>(&"k"), Some(1));
        drop(a);
        assert_eq!(b.expect("cloned before the replace").value_cloned::<u8, _>(&"k"), Some(1));
    }

    /// Regression: every session replaced while any reader was active used to be kept alive
    /// until the outermost reader returned (10 000 replacements inside one `with`: 10 000 live
    /// sessions). Now only the sessions readers view are kept, one clone each.
    #[test]
    fn replacing_during_a_read_keeps_only_the_viewed_sessions() {
        use crate::{Context, SessionCtx};
        use core::sync::atomic::{AtomicUsize, Ordering};

        static MADE: AtomicUsize = AtomicUsize::new(0);
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        struct Counted;
        impl Drop for Counted {
            fn drop(&mut self) {
                DROPPED.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn session(i: u32) -> Option<AnySession> {
            MADE.fetch_add(1, Ordering::SeqCst);
            Some(SessionCtx::new(&Context::background()).with_value(0u8, Counted).with_value(1u8, i).into())
        }
        fn alive() -> usize {
            MADE.load(Ordering::SeqCst) - DROPPED.load(Ordering::SeqCst)
        }
        fn index(s: Option<&AnySession>) -> Option<u32> {
            s?.value_cloned::<u32, _>(&1u8)
        }

        let n = if cfg!(miri) { 100 } else { 10_000 };
        let slot = LocalSlot::new();
        slot.replace(session(0));
        slot.with(|outer| {
            for i in 1..=n {
                drop(slot.replace(session(i)));
            }
            // The current session and the one this reader views: nothing else.
            assert_eq!(alive(), 2);
            assert_eq!(index(outer), Some(0));
            slot.with(|inner| {
                for i in n + 1..=2 * n {
                    let mut s = session(i);
                    slot.swap(&mut s);
                    drop(s);
                }
                // One more: the session the inner reader views.
                assert_eq!(alive(), 3);
                assert_eq!(index(inner), Some(n));
                assert_eq!(index(outer), Some(0));
            });
            // Released as soon as its last reader returned.
            assert_eq!(alive(), 2);
            // A session replaced, put back and replaced again is kept once.
            let viewed_again = slot.with(|s| s.cloned());
            slot.with(|_| {
                drop(slot.replace(viewed_again.clone()));
                drop(slot.replace(session(0)));
                drop(slot.replace(viewed_again.clone()));
                drop(slot.replace(session(0)));
            });
            drop(viewed_again);
            assert_eq!(alive(), 2);
            assert_eq!(index(outer), Some(0));
        });
        assert_eq!(alive(), 1);
        drop(slot.replace(None));
        assert_eq!(alive(), 0);
    }
}
