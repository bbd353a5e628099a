//! Sessions: Go's `Session` interface, [`SessionCtx`] and the [`AnySession`] handle stores keep.
//!
//! A [`Session`] is what "the current session" is: it can tell whether it is still valid, read
//! a value, and derive a session with one more value. The library ships two implementations,
//! [`SessionCtx`] (immutable, over a [`Context`]) and [`SessionMap`] (one shared mutable map);
//! users may implement the trait for their own types, and every store accepts them through
//! [`AnySession::custom`].
//!
//! # Validity scopes
//!
//! [`SessionCtx::new`] opens a new cancel scope under the given context. Sessions derived with
//! [`with_value`](SessionCtx::with_value) share that scope (Go parity: `Disable()` on any of
//! them disables all of them — the seed program relies on it), while [`fork`](SessionCtx::fork)
//! opens a child scope: disabling the fork leaves the parent valid, disabling the parent reaches
//! the fork. Unlike Go, which ignores the wrapped context, a session is also invalid once that
//! context is cancelled or past its deadline.
//!
//! # Layering
//!
//! This module sits above [`map`](crate::map): [`AnySession`] holds a [`SessionMap`], so the
//! `Session` impl of `SessionMap` is here too (over the map's erased read and insert), and the
//! map never names the sessions. [`AnySession`]'s inherent methods are the fast paths for the
//! built-in sessions (no dynamic dispatch); where there is none to take they delegate to
//! [`SessionExt`] (`try_value_cloned`, `str_value`, and every method for a user session).

use core::any::{Any, type_name};
use core::fmt;
use core::hash::Hash;
use core::time::Duration;

use alloc::borrow::Cow;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;

use crate::context::Context;
use crate::error::{ContextError, ReadError};
use crate::key::{DynKey, Key, KeyQuery};
use crate::map::SessionMap;
use crate::node::{ChainOwner, F_VALUE, NodeRef, SharedKey, SharedValue, TypedKey, register_chain_owner};
use crate::scope::Done;
use crate::time::{Instant, NoClockError, global_clock};

/// Go's `Session` interface: implicit request context that a store binds to an execution unit.
///
/// Object safe; typed conveniences live in [`SessionExt`], implemented for every session.
///
/// # Examples
/// A user session backed by a fixed table:
/// ```
/// use std::any::Any;
/// use std::sync::Arc;
/// use localsession_core::{AnySession, DynKey, KeyQuery, Session, SessionCtx, SessionExt, Context};
///
/// struct Tenant(&'static str);
///
/// impl Session for Tenant {
///     fn is_valid(&self) -> bool { true }
///     fn get_with(&self, key: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) {
///         if key.downcast::<&str>() == Some(&"tenant") { f(Some(&self.0)) } else { f(None) }
///     }
///     fn with_value_dyn(&self, key: DynKey, value: Arc<dyn Any + Send + Sync>) -> AnySession {
///         // Derive a context-backed session that still answers "tenant".
///         let ctx = Context::background().with_value("tenant", self.0);
///         SessionCtx::new(&ctx).with_value_dyn(key, value)
///     }
/// }
///
/// let s = AnySession::custom(Tenant("acme"));
/// assert_eq!(s.value_cloned::<&str, _>(&"tenant"), Some("acme"));
/// let s2 = s.with_value("user", 7u32);
/// assert_eq!(s2.value_cloned::<u32, _>(&"user"), Some(7));
/// assert_eq!(s2.value_cloned::<&str, _>(&"tenant"), Some("acme"));
/// ```
pub trait Session: Send + Sync + 'static {
    /// Whether the session is still valid (Go `IsValid`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, Session, SessionCtx};
    /// let s = SessionCtx::new(&Context::background());
    /// let erased: &dyn Session = &s;
    /// assert!(erased.is_valid());
    /// s.disable();
    /// assert!(!erased.is_valid());
    /// ```
    fn is_valid(&self) -> bool;

    /// Calls `f` with the value bound to `key`, or `None` (Go `Get`). The value is only borrowed
    /// for the call, so implementations can hand out data guarded by a lock or an epoch.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{KeyQuery, Session, SessionMap};
    /// let map = SessionMap::new().with_value("n", 3u32);
    /// let mut seen = None;
    /// map.get_with(&KeyQuery::new(&"n"), &mut |v| seen = v.and_then(|v| v.downcast_ref::<u32>()).copied());
    /// assert_eq!(seen, Some(3));
    /// ```
    fn get_with(&self, key: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>));

    /// A session with `key` bound to `value` (Go `WithValue`). For an immutable session this
    /// derives a new one; for a shared map it updates the map and returns it.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use localsession_core::{Context, DynKey, Session, SessionCtx, SessionMap};
    /// let s = SessionCtx::new(&Context::background());
    /// let derived = s.with_value_dyn(DynKey::new("k"), Arc::new(1u8));
    /// assert_eq!((s.value::<u8, _>(&"k"), derived.value_cloned::<u8, _>(&"k")), (None, Some(1))); // a new session
    /// let map = SessionMap::new();
    /// let same = map.with_value_dyn(DynKey::new("k"), Arc::new(1u8));
    /// assert!(same.as_map().unwrap().ptr_eq(&map) && map.contains(&"k")); // the shared map changed
    /// ```
    fn with_value_dyn(&self, key: DynKey, value: Arc<dyn Any + Send + Sync>) -> AnySession;
}

/// Typed conveniences for every [`Session`] (including `dyn Session`).
///
/// # Examples
/// ```
/// use localsession_core::{Context, Key, SessionCtx, SessionExt};
/// static N: Key<u32> = Key::new("n");
/// let s = SessionCtx::new(&Context::background()).with(&N, 5);
/// let erased: &dyn localsession_core::Session = &s;
/// assert_eq!(erased.read_key(&N, |v| v.copied()), Some(5));
/// ```
pub trait SessionExt: Session {
    /// Calls `f` with the value bound to `key` if it is a `V`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Session, SessionExt, SessionMap};
    /// let map = SessionMap::new().with_value("name", String::from("ann"));
    /// let erased: &dyn Session = &map;
    /// assert_eq!(erased.read(&"name", |v: Option<&String>| v.map(String::len)), Some(3)); // no clone
    /// assert_eq!(erased.read(&"name", |v: Option<&u32>| v.copied()), None); // another type: absent
    /// ```
    fn read<V: Any, K: Eq + Hash + Any + Send + Sync, R>(&self, key: &K, f: impl FnOnce(Option<&V>) -> R) -> R {
        read_query(self, &KeyQuery::new(key), f)
    }

    /// Calls `f` with the value bound to a typed key.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Key, Session, SessionExt, SessionMap};
    /// static TAGS: Key<Vec<&'static str>> = Key::new("tags");
    /// let map = SessionMap::new().with(&TAGS, vec!["beta", "eu"]);
    /// let erased: &dyn Session = &map;
    /// assert_eq!(erased.read_key(&TAGS, |tags| tags.map_or(0, Vec::len)), 2);
    /// ```
    fn read_key<T: Any, R>(&self, key: &'static Key<T>, f: impl FnOnce(Option<&T>) -> R) -> R {
        read_query(self, &KeyQuery::typed(key), f)
    }

    /// A clone of the value bound to `key`, if it is a `V`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, Session, SessionCtx, SessionExt};
    /// let s = SessionCtx::new(&Context::background()).with_value("trace", String::from("abc"));
    /// let erased: &dyn Session = &s;
    /// assert_eq!(erased.value_cloned::<String, _>(&"trace").as_deref(), Some("abc"));
    /// ```
    fn value_cloned<V: Any + Clone, K: Eq + Hash + Any + Send + Sync>(&self, key: &K) -> Option<V> {
        self.read(key, |v: Option<&V>| v.cloned())
    }

    /// A clone of the value bound to a typed key.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, Key, Session, SessionCtx, SessionExt};
    /// static USER: Key<u64> = Key::new("user");
    /// let s = SessionCtx::new(&Context::background()).with(&USER, 42);
    /// let erased: &dyn Session = &s;
    /// assert_eq!(erased.get_cloned(&USER), Some(42));
    /// ```
    fn get_cloned<T: Any + Clone>(&self, key: &'static Key<T>) -> Option<T> {
        self.read_key(key, |v| v.cloned())
    }

    /// A clone of the value bound to `key`, or why there is none: [`ReadError::Absent`] (nothing
    /// bound under this key — remember that the key's type is part of the key, so `"k"` and
    /// `String::from("k")` are different keys) or [`ReadError::WrongType`] (a value of another
    /// type is bound). The error names the types involved.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, ReadError, Session, SessionCtx, SessionExt};
    /// let s = SessionCtx::new(&Context::background()).with_value("port", 8080u16);
    /// let erased: &dyn Session = &s;
    /// assert_eq!(erased.try_value_cloned::<u16, _>(&"port"), Ok(8080));
    /// let err = erased.try_value_cloned::<u32, _>(&"port").unwrap_err();
    /// assert!(matches!(err, ReadError::WrongType { .. }));
    /// assert!(err.to_string().contains("u32"));
    /// let err = erased.try_value_cloned::<u16, _>(&String::from("port")).unwrap_err();
    /// assert!(matches!(err, ReadError::Absent { .. })); // a `String` key is not a `&str` key
    /// assert!(err.to_string().contains("String"));
    /// ```
    fn try_value_cloned<V: Any + Clone, K: Eq + Hash + Any + Send + Sync>(&self, key: &K) -> Result<V, ReadError> {
        let mut out = Err(ReadError::Absent { key_type: type_name::<K>() });
        self.get_with(&KeyQuery::new(key), &mut |v| {
            if let Some(v) = v {
                out = v
                    .downcast_ref::<V>()
                    .cloned()
                    .ok_or(ReadError::WrongType { key_type: type_name::<K>(), expected: type_name::<V>() });
            }
        });
        out
    }

    /// The string bound to `key`, whichever of the usual string types holds it (`String`,
    /// `&'static str`, `Arc<str>`, `Box<str>`, `Cow<'static, str>`): no turbofish, no guessing
    /// which one the writer used.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, Session, SessionCtx, SessionExt};
    /// let s = SessionCtx::new(&Context::background())
    ///     .with_value("tenant", "acme")
    ///     .with_value("user", String::from("ann"));
    /// let erased: &dyn Session = &s;
    /// assert_eq!(erased.str_value(&"tenant").as_deref(), Some("acme"));
    /// assert_eq!(erased.str_value(&"user").as_deref(), Some("ann"));
    /// assert_eq!(erased.str_value(&"missing"), None);
    /// ```
    fn str_value<K: Eq + Hash + Any + Send + Sync>(&self, key: &K) -> Option<String> {
        let mut out = None;
        self.get_with(&KeyQuery::new(key), &mut |v| out = v.and_then(any_str).map(String::from));
        out
    }

    /// Derives with one more binding (boxes the value; `SessionCtx::with_value` does not).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, Session, SessionCtx, SessionExt};
    /// let base = SessionCtx::new(&Context::background());
    /// let erased: &dyn Session = &base;
    /// let derived = erased.with_value("k", 1u8);
    /// assert_eq!(derived.value_cloned::<u8, _>(&"k"), Some(1));
    /// base.disable();
    /// assert!(!derived.is_valid()); // the same validity scope
    /// ```
    fn with_value<K: Eq + Hash + Any + Send + Sync, V: Any + Send + Sync>(&self, key: K, value: V) -> AnySession {
        self.with_value_dyn(DynKey::new(key), Arc::new(value))
    }
}

impl<S: Session + ?Sized> SessionExt for S {}

/// The string in `v`, if it holds one of the usual string types.
fn any_str(v: &(dyn Any + Send + Sync)) -> Option<&str> {
    if let Some(s) = v.downcast_ref::<String>() {
        Some(s)
    } else if let Some(s) = v.downcast_ref::<&'static str>() {
        Some(s)
    } else if let Some(s) = v.downcast_ref::<Arc<str>>() {
        Some(s)
    } else if let Some(s) = v.downcast_ref::<Box<str>>() {
        Some(s)
    } else {
        v.downcast_ref::<Cow<'static, str>>().map(|s| &**s)
    }
}

fn read_query<S: Session + ?Sized, V: Any, R>(s: &S, q: &KeyQuery<'_>, f: impl FnOnce(Option<&V>) -> R) -> R {
    let mut f = Some(f);
    let mut out = None;
    s.get_with(q, &mut |v| {
        if let Some(f) = f.take() {
            out = Some(f(v.and_then(|v| v.downcast_ref::<V>())));
        }
    });
    match (out, f) {
        (Some(r), _) => r,
        // The implementation never called back: treat as absent.
        (None, Some(f)) => f(None),
        (None, None) => unreachable!("callback consumed without a result"),
    }
}

/// Go's `SessionCtx`: an immutable session over a [`Context`], with its own validity scope.
///
/// `Clone` is one reference-count increment. Reads borrow from the session: no allocation, no
/// lock, no atomic read-modify-write.
///
/// # Examples
/// The seed program's rules:
/// ```
/// use localsession_core::{Context, SessionCtx};
///
/// let session = SessionCtx::new(&Context::background());
/// let start = session.with_value("a", "b");
/// let next = start.with_value("c", "d");
/// assert_eq!(start.value::<&str, _>(&"c"), None); // `with_value` never changes `start`
/// assert_eq!(next.value::<&str, _>(&"a"), Some(&"b"));
///
/// let forked = next.fork();
/// forked.disable();
/// assert!(!forked.is_valid() && next.is_valid()); // a fork's disable stays in the fork
///
/// session.disable(); // same scope as `start` and `next`
/// assert!(!start.is_valid() && !next.is_valid());
/// ```
#[derive(Clone)]
pub struct SessionCtx {
    /// Always has a scope: the session's validity scope.
    ctx: Context,
}

impl SessionCtx {
    /// A new session over `ctx`, with a new validity scope under `ctx`'s (Go `NewSessionCtx`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionCtx};
    /// let ctx = Context::background().with_value("k", 1u8);
    /// let s = SessionCtx::new(&ctx);
    /// assert_eq!(s.value::<u8, _>(&"k"), Some(&1));
    /// assert!(s.is_valid());
    /// ```
    #[must_use]
    pub fn new(ctx: &Context) -> SessionCtx {
        register_session_chain_owner();
        SessionCtx { ctx: ctx.open_scope_ctx(None, false) }
    }

    /// A new session over `ctx` that becomes invalid after `timeout` on the
    /// [global clock](crate::set_global_clock) (Go `NewSessionCtxWithTimeout`, without a
    /// goroutine per session: expiry is observed lazily and fired by the clock's timer).
    ///
    /// # Errors
    /// [`NoClockError`] if no clock is registered.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::{Context, SessionCtx};
    /// // No clock in this doctest's process:
    /// assert!(SessionCtx::with_timeout(&Context::background(), Duration::from_secs(1)).is_err());
    /// ```
    pub fn with_timeout(ctx: &Context, timeout: Duration) -> Result<SessionCtx, NoClockError> {
        let clock = global_clock().ok_or(NoClockError(()))?;
        Ok(SessionCtx::with_deadline(ctx, Instant::now(clock) + timeout))
    }

    /// A new session over `ctx` that becomes invalid at `deadline`.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::{Clock, Context, Instant, SessionCtx};
    /// struct Fixed;
    /// impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(5) } }
    /// static CLOCK: Fixed = Fixed;
    /// let s = SessionCtx::with_deadline(&Context::background(), Instant::from_clock_time(&CLOCK, Duration::from_secs(5)));
    /// assert!(!s.is_valid());
    /// ```
    #[must_use]
    pub fn with_deadline(ctx: &Context, deadline: Instant) -> SessionCtx {
        register_session_chain_owner();
        SessionCtx { ctx: ctx.open_scope_ctx(Some(deadline), false) }
    }

    /// A session with one more binding, in the **same** validity scope (Go `WithValue`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionCtx};
    /// let s = SessionCtx::new(&Context::background());
    /// let t = s.with_value(1u32, "one");
    /// s.disable();
    /// assert!(!t.is_valid());
    /// ```
    #[must_use]
    pub fn with_value<K, V>(&self, key: K, value: V) -> SessionCtx
    where
        K: Eq + Hash + Any + Send + Sync,
        V: Any + Send + Sync,
    {
        SessionCtx { ctx: self.ctx.with_value(key, value) }
    }

    /// A session with one more typed binding, in the same validity scope.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, Key, SessionCtx};
    /// static USER: Key<String> = Key::new("user");
    /// let s = SessionCtx::new(&Context::background()).with(&USER, "ann".to_string());
    /// assert_eq!(s.get(&USER).map(String::as_str), Some("ann"));
    /// ```
    #[must_use]
    pub fn with<T: Any + Send + Sync>(&self, key: &'static Key<T>, value: T) -> SessionCtx {
        SessionCtx { ctx: self.ctx.with(key, value) }
    }

    /// The value bound to `key`, if it is a `V` (borrowed from the session).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionCtx};
    /// let s = SessionCtx::new(&Context::background()).with_value("n", 3i32);
    /// assert_eq!(s.value::<i32, _>(&"n"), Some(&3));
    /// ```
    #[inline]
    #[must_use]
    pub fn value<V: Any, K: Eq + Hash + Any + Send + Sync>(&self, key: &K) -> Option<&V> {
        self.ctx.value(key)
    }

    /// The value bound to a typed key (borrowed from the session).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, Key, SessionCtx};
    /// static N: Key<u8> = Key::new("n");
    /// assert_eq!(SessionCtx::new(&Context::background()).with(&N, 1).get(&N), Some(&1));
    /// ```
    #[inline]
    #[must_use]
    pub fn get<T: Any>(&self, key: &'static Key<T>) -> Option<&T> {
        self.ctx.get(key)
    }

    /// A session with a child validity scope: disabling it leaves `self` valid; disabling
    /// `self` (or anything in its scope) reaches it.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionCtx};
    /// let parent = SessionCtx::new(&Context::background());
    /// let child = parent.fork();
    /// parent.disable();
    /// assert!(!child.is_valid());
    /// ```
    #[must_use]
    pub fn fork(&self) -> SessionCtx {
        SessionCtx { ctx: self.ctx.open_scope_ctx(None, false) }
    }

    /// Invalidates this session's scope: this session, every session derived from it with
    /// `with_value`, and every fork (Go `Disable`). Returns `false` if the session was invalid
    /// already (disabled, expired, or its context cancelled); `err()` then keeps its first value.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, ContextError, SessionCtx};
    /// let s = SessionCtx::new(&Context::background());
    /// assert!(s.disable());
    /// assert!(!s.disable());
    /// assert_eq!(s.err(), Some(ContextError::Canceled));
    /// ```
    pub fn disable(&self) -> bool {
        self.ctx.scope().is_some_and(|s| s.cancel(ContextError::Canceled))
    }

    /// Whether the session is valid: not disabled, not expired, and its context not cancelled.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionCtx};
    /// let (ctx, cancel) = Context::background().with_cancel();
    /// let s = SessionCtx::new(&ctx);
    /// cancel.cancel(); // unlike Go, the wrapped context's cancellation counts
    /// assert!(!s.is_valid());
    /// ```
    #[inline]
    #[must_use]
    pub fn is_valid(&self) -> bool {
        !self.ctx.is_done()
    }

    /// Why the session is invalid, or `None` while it is valid.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionCtx};
    /// assert_eq!(SessionCtx::new(&Context::background()).err(), None);
    /// ```
    #[must_use]
    pub fn err(&self) -> Option<ContextError> {
        self.ctx.err()
    }

    /// A future that resolves when the session becomes invalid.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionCtx};
    /// # futures::executor::block_on(async {
    /// let s = SessionCtx::new(&Context::background());
    /// let derived = s.with_value("k", 1u8); // same validity scope
    /// std::thread::spawn(move || derived.disable());
    /// s.done().await;
    /// assert!(!s.is_valid());
    /// # });
    /// ```
    pub fn done(&self) -> Done {
        self.ctx.done()
    }

    /// Runs `f` once when the session becomes invalid (disabled, expired on the clock's timer,
    /// or its context cancelled); immediately if it is invalid already. See
    /// [`Context::after_cancel`].
    ///
    /// # Examples
    /// ```
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    /// use localsession_core::{Context, SessionCtx};
    /// let s = SessionCtx::new(&Context::background());
    /// let flag = Arc::new(AtomicBool::new(false));
    /// let f = flag.clone();
    /// let _h = s.after_cancel(move || f.store(true, Ordering::SeqCst));
    /// s.disable();
    /// assert!(flag.load(Ordering::SeqCst));
    /// ```
    pub fn after_cancel(&self, f: impl FnOnce() + Send + 'static) -> crate::AfterCancel {
        self.ctx.after_cancel(f)
    }

    /// The underlying context (Go `Export`): values, and cancellation by this session's scope.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionCtx};
    /// let s = SessionCtx::new(&Context::background()).with_value("k", 9u8);
    /// let ctx = s.export();
    /// assert_eq!(ctx.value::<u8, _>(&"k"), Some(&9));
    /// s.disable();
    /// assert!(ctx.is_done());
    /// ```
    #[must_use]
    pub fn export(&self) -> Context {
        self.ctx.clone()
    }

    /// The underlying context, borrowed.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionCtx};
    /// let s = SessionCtx::new(&Context::background());
    /// assert!(!s.context().is_done());
    /// ```
    #[must_use]
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Whether both are the same session (same chain head and scope).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionCtx};
    /// let s = SessionCtx::new(&Context::background());
    /// assert!(s.ptr_eq(&s.clone()));
    /// ```
    #[must_use]
    pub fn ptr_eq(&self, other: &SessionCtx) -> bool {
        self.ctx.ptr_eq(&other.ctx)
    }
}

impl Session for SessionCtx {
    fn is_valid(&self) -> bool {
        SessionCtx::is_valid(self)
    }

    fn get_with(&self, key: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) {
        f(self.ctx.lookup(key));
    }

    fn with_value_dyn(&self, key: DynKey, value: Arc<dyn Any + Send + Sync>) -> AnySession {
        // The value's type is erased: it may be a `Context` (see `Context::note_value_type`).
        Context::register_chain_owner();
        let parent = self.ctx.top().cloned();
        let node = match key.key {
            Some(k) => NodeRef::new_value(parent, key.tag, F_VALUE, SharedKey(k), SharedValue::<true, _>(value)),
            None => NodeRef::new_value(parent, key.tag, F_VALUE, TypedKey, SharedValue::<true, _>(value)),
        };
        // SAFETY: `node` is linked above our own head, so our scope is in its chain.
        let ctx = unsafe { Context::from_parts(Some(node), self.ctx.scope_ptr()) };
        AnySession::Ctx(SessionCtx { ctx })
    }
}

impl fmt::Debug for SessionCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCtx").field("valid", &self.is_valid()).finish_non_exhaustive()
    }
}

/// A session of any kind, as stores hold it: the two built-in sessions without dynamic
/// dispatch, or a user [`Session`] behind an `Arc`.
///
/// Cloning is one reference-count increment.
///
/// # Examples
/// ```
/// use localsession_core::{AnySession, Context, SessionCtx, SessionMap};
/// let a: AnySession = SessionCtx::new(&Context::background()).with_value("k", 1u8).into();
/// let b: AnySession = SessionMap::new().with_value("k", 2u8).into();
/// assert_eq!(a.value_cloned::<u8, _>(&"k"), Some(1));
/// assert_eq!(b.value_cloned::<u8, _>(&"k"), Some(2));
/// ```
#[derive(Clone)]
pub enum AnySession {
    /// A [`SessionCtx`].
    Ctx(SessionCtx),
    /// A [`SessionMap`].
    Map(SessionMap),
    /// A user implementation.
    Custom(Arc<dyn Session>),
}

impl AnySession {
    /// Wraps a user [`Session`].
    ///
    /// # Examples
    /// ```
    /// use std::any::Any;
    /// use std::sync::Arc;
    /// use localsession_core::{AnySession, ContextError, DynKey, KeyQuery, Session};
    ///
    /// // A session for a request that was already answered: never valid.
    /// struct Answered;
    /// impl Session for Answered {
    ///     fn is_valid(&self) -> bool { false }
    ///     fn get_with(&self, _: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) { f(None) }
    ///     fn with_value_dyn(&self, _: DynKey, _: Arc<dyn Any + Send + Sync>) -> AnySession {
    ///         AnySession::custom(Answered)
    ///     }
    /// }
    /// let s = AnySession::custom(Answered);
    /// assert_eq!(s.err(), Some(ContextError::Canceled));
    /// assert!(!s.disable()); // a user session cannot be disabled through `AnySession`
    /// ```
    ///
    /// See also [`Session`].
    pub fn custom(session: impl Session) -> AnySession {
        AnySession::Custom(Arc::new(session))
    }

    /// Whether the session is valid.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, Context, SessionCtx};
    /// let s = AnySession::from(SessionCtx::new(&Context::background()));
    /// assert!(s.is_valid());
    /// ```
    #[inline]
    #[must_use]
    pub fn is_valid(&self) -> bool {
        match self {
            AnySession::Ctx(s) => s.is_valid(),
            AnySession::Map(s) => s.is_valid(),
            AnySession::Custom(s) => s.is_valid(),
        }
    }

    /// Why the session is invalid, or `None` while it is valid. A user session has no cause:
    /// an invalid one reports [`ContextError::Canceled`].
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, ContextError, SessionMap};
    /// let s = AnySession::from(SessionMap::new());
    /// s.disable();
    /// assert_eq!(s.err(), Some(ContextError::Canceled));
    /// ```
    #[must_use]
    pub fn err(&self) -> Option<ContextError> {
        match self {
            AnySession::Ctx(s) => s.err(),
            AnySession::Map(s) => s.err(),
            AnySession::Custom(s) => (!s.is_valid()).then_some(ContextError::Canceled),
        }
    }

    /// A future that resolves when a built-in session becomes invalid. A user session cannot
    /// signal that (the trait has no such method, as in Go): its future never resolves.
    ///
    /// # Examples
    /// ```
    /// use futures::FutureExt as _;
    /// use localsession_core::{AnySession, SessionMap};
    /// # futures::executor::block_on(async {
    /// let s = AnySession::from(SessionMap::new());
    /// assert!(s.done().now_or_never().is_none()); // valid: pending
    /// s.disable();
    /// s.done().await;
    /// assert!(s.err().is_some());
    /// # });
    /// ```
    pub fn done(&self) -> Done {
        match self {
            AnySession::Ctx(s) => s.done(),
            AnySession::Map(s) => s.done(),
            AnySession::Custom(_) => Done::new(None),
        }
    }

    /// Disables a built-in session (see [`SessionCtx::disable`], [`SessionMap::disable`]).
    /// User sessions have no `disable` in the trait (as in Go): returns `false` for them.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, SessionMap};
    /// let s = AnySession::from(SessionMap::new());
    /// assert!(s.disable());
    /// assert!(!s.is_valid());
    /// ```
    pub fn disable(&self) -> bool {
        match self {
            AnySession::Ctx(s) => s.disable(),
            AnySession::Map(s) => s.disable(),
            AnySession::Custom(_) => false,
        }
    }

    /// The session as a [`SessionCtx`], for borrowing reads without a closure.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, Context, SessionCtx};
    /// let s = AnySession::from(SessionCtx::new(&Context::background()).with_value("k", 1u8));
    /// assert_eq!(s.as_ctx().and_then(|c| c.value::<u8, _>(&"k")), Some(&1));
    /// ```
    #[must_use]
    pub fn as_ctx(&self) -> Option<&SessionCtx> {
        match self {
            AnySession::Ctx(s) => Some(s),
            _ => None,
        }
    }

    /// The session as a [`SessionMap`].
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, SessionMap};
    /// assert!(AnySession::from(SessionMap::new()).as_map().is_some());
    /// ```
    #[must_use]
    pub fn as_map(&self) -> Option<&SessionMap> {
        match self {
            AnySession::Map(s) => Some(s),
            _ => None,
        }
    }

    /// The session's context, for the built-in sessions (see `export` on each).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, Context, SessionCtx};
    /// let s = AnySession::from(SessionCtx::new(&Context::background()).with_value("k", 1u8));
    /// assert_eq!(s.export().unwrap().value::<u8, _>(&"k"), Some(&1));
    /// ```
    #[must_use]
    pub fn export(&self) -> Option<Context> {
        match self {
            AnySession::Ctx(s) => Some(s.export()),
            AnySession::Map(s) => Some(s.export()),
            AnySession::Custom(_) => None,
        }
    }

    /// Calls `f` with the value bound to a typed key, without cloning anything.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, Context, Key, SessionCtx};
    /// static N: Key<u64> = Key::new("n");
    /// let s = AnySession::from(SessionCtx::new(&Context::background()).with(&N, 4));
    /// assert_eq!(s.read_key(&N, |v| v.copied()), Some(4));
    /// ```
    #[inline]
    pub fn read_key<T: Any, R>(&self, key: &'static Key<T>, f: impl FnOnce(Option<&T>) -> R) -> R {
        match self {
            AnySession::Ctx(s) => f(s.get(key)),
            AnySession::Map(s) => s.read_key(key, f),
            AnySession::Custom(s) => SessionExt::read_key(&**s, key, f),
        }
    }

    /// Calls `f` with the value bound to `key` if it is a `V`, without cloning anything.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, SessionMap};
    /// let s = AnySession::from(SessionMap::new().with_value("k", 3u8));
    /// assert_eq!(s.read(&"k", |v: Option<&u8>| v.copied()), Some(3));
    /// ```
    #[inline]
    pub fn read<V: Any, K: Eq + Hash + Any + Send + Sync, R>(&self, key: &K, f: impl FnOnce(Option<&V>) -> R) -> R {
        match self {
            AnySession::Ctx(s) => f(s.value(key)),
            AnySession::Map(s) => s.read(key, f),
            AnySession::Custom(s) => SessionExt::read(&**s, key, f),
        }
    }

    /// A clone of the value bound to a typed key.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, Context, Key, SessionCtx};
    /// static NAME: Key<String> = Key::new("name");
    /// let s = AnySession::from(SessionCtx::new(&Context::background()).with(&NAME, "x".into()));
    /// assert_eq!(s.get_cloned(&NAME).as_deref(), Some("x"));
    /// ```
    #[must_use]
    pub fn get_cloned<T: Any + Clone>(&self, key: &'static Key<T>) -> Option<T> {
        self.read_key(key, |v| v.cloned())
    }

    /// A clone of the value bound to `key`, if it is a `V`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, Context, SessionCtx};
    /// let s = AnySession::from(SessionCtx::new(&Context::background()).with_value("a", "b"));
    /// assert_eq!(s.value_cloned::<&str, _>(&"a"), Some("b"));
    /// ```
    #[must_use]
    pub fn value_cloned<V: Any + Clone, K: Eq + Hash + Any + Send + Sync>(&self, key: &K) -> Option<V> {
        self.read(key, |v: Option<&V>| v.cloned())
    }

    /// A clone of the value bound to `key`, or why there is none (see
    /// [`SessionExt::try_value_cloned`]).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, Context, ReadError, SessionCtx};
    /// let s = AnySession::from(SessionCtx::new(&Context::background()).with_value("a", 1u8));
    /// assert_eq!(s.try_value_cloned::<u8, _>(&"a"), Ok(1));
    /// assert!(matches!(s.try_value_cloned::<i8, _>(&"a"), Err(ReadError::WrongType { .. })));
    /// assert!(matches!(s.try_value_cloned::<u8, _>(&"b"), Err(ReadError::Absent { .. })));
    /// ```
    pub fn try_value_cloned<V: Any + Clone, K: Eq + Hash + Any + Send + Sync>(&self, key: &K) -> Result<V, ReadError> {
        SessionExt::try_value_cloned(self, key)
    }

    /// The string bound to `key`, whichever of the usual string types holds it (see
    /// [`SessionExt::str_value`]).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, Context, SessionCtx};
    /// let s = AnySession::from(SessionCtx::new(&Context::background()).with_value("tenant", "acme"));
    /// assert_eq!(s.str_value(&"tenant").as_deref(), Some("acme"));
    /// ```
    #[must_use]
    pub fn str_value<K: Eq + Hash + Any + Send + Sync>(&self, key: &K) -> Option<String> {
        SessionExt::str_value(self, key)
    }

    /// Derives with one more binding (Go `WithValue`): a new session for a [`SessionCtx`], the
    /// same (updated) map for a [`SessionMap`].
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, Context, SessionCtx};
    /// let s = AnySession::from(SessionCtx::new(&Context::background()));
    /// let t = s.with_value("k", 1u8);
    /// assert_eq!(s.value_cloned::<u8, _>(&"k"), None);
    /// assert_eq!(t.value_cloned::<u8, _>(&"k"), Some(1));
    /// ```
    #[must_use]
    pub fn with_value<K: Eq + Hash + Any + Send + Sync + Clone, V: Any + Send + Sync>(
        &self,
        key: K,
        value: V,
    ) -> AnySession {
        match self {
            AnySession::Ctx(s) => AnySession::Ctx(s.with_value(key, value)),
            AnySession::Map(s) => AnySession::Map(s.with_value(key, value)),
            AnySession::Custom(s) => SessionExt::with_value(&**s, key, value),
        }
    }

    /// Derives with one more typed binding.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, Key, SessionMap};
    /// static N: Key<u8> = Key::new("n");
    /// let s = AnySession::from(SessionMap::new()).with(&N, 1);
    /// assert_eq!(s.get_cloned(&N), Some(1));
    /// ```
    #[must_use]
    pub fn with<T: Any + Send + Sync>(&self, key: &'static Key<T>, value: T) -> AnySession {
        match self {
            AnySession::Ctx(s) => AnySession::Ctx(s.with(key, value)),
            AnySession::Map(s) => AnySession::Map(s.with(key, value)),
            AnySession::Custom(s) => s.with_value_dyn(DynKey::typed(key), Arc::new(value)),
        }
    }

    /// Whether both handles are the same session.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, SessionMap};
    /// let a = AnySession::from(SessionMap::new());
    /// assert!(a.ptr_eq(&a.clone()));
    /// assert!(!a.ptr_eq(&AnySession::from(SessionMap::new())));
    /// ```
    #[must_use]
    pub fn ptr_eq(&self, other: &AnySession) -> bool {
        match (self, other) {
            (AnySession::Ctx(a), AnySession::Ctx(b)) => a.ptr_eq(b),
            (AnySession::Map(a), AnySession::Map(b)) => a.ptr_eq(b),
            (AnySession::Custom(a), AnySession::Custom(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Session for AnySession {
    fn is_valid(&self) -> bool {
        AnySession::is_valid(self)
    }

    fn get_with(&self, key: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) {
        match self {
            AnySession::Ctx(s) => s.get_with(key, f),
            AnySession::Map(s) => s.get_with(key, f),
            AnySession::Custom(s) => s.get_with(key, f),
        }
    }

    fn with_value_dyn(&self, key: DynKey, value: Arc<dyn Any + Send + Sync>) -> AnySession {
        match self {
            AnySession::Ctx(s) => s.with_value_dyn(key, value),
            AnySession::Map(s) => s.with_value_dyn(key, value),
            AnySession::Custom(s) => s.with_value_dyn(key, value),
        }
    }
}

impl From<SessionCtx> for AnySession {
    fn from(s: SessionCtx) -> Self {
        AnySession::Ctx(s)
    }
}

impl From<SessionMap> for AnySession {
    fn from(s: SessionMap) -> Self {
        // An `AnySession::Map` may exist without any `SessionCtx`: nested in a node, it must
        // still be recognised as owning a chain.
        register_session_chain_owner();
        AnySession::Map(s)
    }
}

impl From<Arc<dyn Session>> for AnySession {
    fn from(s: Arc<dyn Session>) -> Self {
        AnySession::Custom(s)
    }
}

impl fmt::Debug for AnySession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnySession::Ctx(s) => fmt::Debug::fmt(s, f),
            AnySession::Map(s) => fmt::Debug::fmt(s, f),
            AnySession::Custom(s) => f.debug_struct("CustomSession").field("valid", &s.is_valid()).finish(),
        }
    }
}

impl Session for SessionMap {
    fn is_valid(&self) -> bool {
        SessionMap::is_valid(self)
    }

    fn get_with(&self, key: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) {
        self.get_erased(key, f);
    }

    fn with_value_dyn(&self, key: DynKey, value: Arc<dyn Any + Send + Sync>) -> AnySession {
        // The value's type is erased: it may be a `Context` (see `Context::note_value_type`).
        Context::register_chain_owner();
        self.insert_erased(key, value);
        register_session_chain_owner();
        AnySession::Map(self.clone())
    }
}

/// Registers [`SessionCtx`], [`AnySession::Ctx`] and [`AnySession::Map`] with node reclamation
/// as values owning a chain (see [`register_chain_owner`]), so that sessions nested as values
/// in contexts or sessions drop iteratively. Called by the constructors that make a
/// `SessionCtx` from nothing (`new`, `with_deadline`) — every other `SessionCtx`, and every
/// `AnySession::Ctx`, is derived from one of those — and by the conversions that make an
/// `AnySession::Map` (`From<SessionMap>`, the `dyn Session` path). An `AnySession::Map(map)`
/// written out by hand, in a process that never made a `SessionCtx`, is not recognised: its
/// drop recurses once per nesting level (never unsound). After the first call, one load.
#[inline]
fn register_session_chain_owner() {
    register_chain_owner(ChainOwner::Session, take_session_chain);
}

/// The chain of a [`SessionCtx`], an [`AnySession::Ctx`] or an [`AnySession::Map`] (holding
/// the map's last handle) about to be dropped.
fn take_session_chain(value: &mut (dyn Any + Send + Sync)) -> Option<NodeRef> {
    if let Some(s) = value.downcast_mut::<SessionCtx>() {
        s.ctx.take_top()
    } else if let Some(any) = value.downcast_mut::<AnySession>() {
        match any {
            AnySession::Ctx(s) => s.ctx.take_top(),
            AnySession::Map(m) => m.take_chain(),
            AnySession::Custom(_) => None,
        }
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    /// Regression: a context stored as a value in a context used to drop recursively, one
    /// native stack frame group per nesting level.
    #[test]
    fn nested_contexts_drop_iteratively() {
        extern crate std;
        use crate::{AnySession, Context, SessionCtx, SessionExt};

        let levels = if cfg!(miri) { 1_000 } else { 1_000_000 };
        let mut ctx = Context::background();
        for _ in 0..levels {
            ctx = Context::background().with_value(0u8, ctx);
        }
        let levels = if cfg!(miri) { 300 } else { 100_000 };
        let mut session = SessionCtx::new(&Context::background());
        let mut any: AnySession = SessionCtx::new(&Context::background()).into();
        for _ in 0..levels {
            session = SessionCtx::new(&Context::background()).with_value(0u8, session);
            // A value behind an `Arc` (the `dyn Session` path).
            any = SessionExt::with_value(&SessionCtx::new(&Context::background()), 0u8, any);
        }
        // A session bound in a plain context (contexts in maps: `tests/model_map.rs`, which
        // miri runs under Tree Borrows, as everything that pins crossbeam-epoch).
        let mut mixed = Context::background();
        for _ in 0..levels {
            mixed = Context::background().with_value(0u8, SessionCtx::new(&mixed));
        }
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                drop(ctx);
                drop(session);
                drop(any);
                drop(mixed);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
