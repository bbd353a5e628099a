//! [`Context`]: the port of Go's `context.Context` (values, cancellation, deadlines).
//!
//! A context is two pointers: the newest node of an immutable chain of bindings and cancel
//! scopes (see [`node`](crate::node)), and the nearest cancel scope in that chain (see
//! [`scope`](crate::scope)). Deriving never changes the context derived from:
//!
//! | Go | Rust | cost |
//! |----|------|------|
//! | `context.Background()` | [`Context::background`] | free (no allocation) |
//! | `context.WithValue(ctx, k, v)` | [`Context::with_value`], [`Context::with`] | one node |
//! | `ctx.Value(k)` | [`Context::value`], [`Context::get`] | no allocation, no lock |
//! | `context.WithCancel(ctx)` | [`Context::with_cancel`] | one scope node, one lock of the parent scope |
//! | `context.WithCancelCause(ctx)` | [`CancelHandle::cancel_with_cause`] | |
//! | `context.WithDeadline` / `WithTimeout` | [`Context::with_deadline`] / [`Context::with_timeout`] | as `with_cancel` |
//! | `context.WithoutCancel(ctx)` | [`Context::without_cancel`] | free |
//! | `ctx.Deadline()` | [`Context::deadline`] | |
//! | `ctx.Err()`, `context.Cause(ctx)` | [`Context::err`] | one atomic load |
//! | `ctx.Done()` | [`Context::done`], [`Context::is_done`] | |
//! | `context.AfterFunc(ctx, f)` | [`Context::after_cancel`] | |

use core::any::{Any, TypeId};
use core::fmt;
use core::hash::Hash;
use core::time::Duration;

use alloc::boxed::Box;

use crate::error::ContextError;
use crate::key::{Key, KeyQuery, hashed_tag};
use crate::node::{
    ChainOwner, F_TYPED_INLINE, F_VALUE, InlineKey, InlineValue, NodePtr, NodeRef, TypedKey, lookup, lookup_by,
    register_chain_owner,
};
use crate::scope::{AfterCancel, Done, ScopeNode, ScopePtr};
use crate::time::{Instant, NoClockError, global_clock};

/// Immutable, execution-crossing request context: values, cancellation, deadline.
///
/// `Clone` is one reference-count increment; `Context` is `Send + Sync`.
///
/// # Examples
/// ```
/// use localsession_core::{Context, Key};
///
/// static USER_ID: Key<u64> = Key::new("user_id");
///
/// let root = Context::background();
/// let ctx = root.with(&USER_ID, 42).with_value("trace", "abc");
/// assert_eq!(ctx.get(&USER_ID), Some(&42));
/// assert_eq!(ctx.value::<&str, _>(&"trace"), Some(&"abc"));
/// assert_eq!(root.get(&USER_ID), None); // deriving never changes the parent
///
/// let (child, cancel) = ctx.with_cancel();
/// cancel.cancel();
/// assert!(child.is_done());
/// assert!(!ctx.is_done()); // never an ancestor
/// ```
pub struct Context {
    top: Option<NodeRef>,
    /// The nearest cancel scope: `top` or an ancestor of it (so kept alive by `top`).
    scope: Option<ScopePtr>,
}

// SAFETY: `top` is `Send + Sync`; `scope` points into `top`'s chain, whose scope state is atomic
// or behind a lock.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Context {
    /// The empty context: no values, never cancelled, no deadline (Go `context.Background()`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// let ctx = Context::background();
    /// assert!(ctx.err().is_none() && ctx.deadline().is_none());
    /// ```
    #[must_use]
    pub const fn background() -> Context {
        Context { top: None, scope: None }
    }

    /// A context from its two pointers.
    ///
    /// # Safety
    /// `scope` is `None` or points to a scope node in `top`'s chain (`top` itself or one of its
    /// ancestors): `Context`'s `Send`/`Sync` impls and [`Context::scope`] rely on the scope
    /// being kept alive by `top`.
    pub(crate) unsafe fn from_parts(top: Option<NodeRef>, scope: Option<ScopePtr>) -> Context {
        Context { top, scope }
    }

    /// Moves the chain out (to release it iteratively). The context must only be dropped after
    /// this: its scope pointer is no longer kept alive by it.
    pub(crate) fn take_top(&mut self) -> Option<NodeRef> {
        self.scope = None;
        self.top.take()
    }

    /// Before a value of type `V` is bound in a node: if `V` is `Context`, makes sure node
    /// reclamation recognises it as a value owning a chain (see
    /// [`register_chain_owner`]). The test is on types, so for any other `V` this compiles to
    /// nothing. Every place that binds a value of a generic type calls it (`with_value`, `with`,
    /// `SessionMap::insert` and `set`).
    #[inline]
    pub(crate) fn note_value_type<V: Any>() {
        if TypeId::of::<V>() == TypeId::of::<Context>() {
            Context::register_chain_owner();
        }
    }

    /// Registers `Context` with node reclamation as a value owning a chain (for values whose
    /// type is erased: the `with_value_dyn` paths call it). After the first call, one load.
    pub(crate) fn register_chain_owner() {
        register_chain_owner(ChainOwner::Context, |value| value.downcast_mut::<Context>().and_then(Context::take_top));
    }

    pub(crate) fn top(&self) -> Option<&NodeRef> {
        self.top.as_ref()
    }

    pub(crate) fn scope_ptr(&self) -> Option<ScopePtr> {
        self.scope
    }

    #[inline]
    pub(crate) fn scope(&self) -> Option<&ScopeNode> {
        // SAFETY: the scope is in `top`'s chain, alive as long as `self`.
        self.scope.map(|s| unsafe { s.as_ref() })
    }

    /// The scope node as an owned reference (for `Done`, `AfterCancel`, handles).
    fn scope_ref(&self) -> Option<NodeRef> {
        // SAFETY: the scope node is alive (in our chain).
        self.scope.map(|s| unsafe { NodeRef::clone_from_ptr(NodePtr(s.cast())) })
    }

    /// Binds `key` to `value` in a new context (Go `context.WithValue`).
    ///
    /// Any `Eq + Hash + Any + Send + Sync` value is a key; keys match when they have the same
    /// type and compare equal. The newest binding of a key shadows older ones. One allocation.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// let a = Context::background().with_value("k", 1u32);
    /// let b = a.with_value("k", 2u32);
    /// assert_eq!(a.value::<u32, _>(&"k"), Some(&1));
    /// assert_eq!(b.value::<u32, _>(&"k"), Some(&2));
    /// // `String` keys are not `&str` keys:
    /// assert_eq!(b.value::<u32, _>(&String::from("k")), None);
    /// ```
    #[must_use]
    pub fn with_value<K, V>(&self, key: K, value: V) -> Context
    where
        K: Eq + Hash + Any + Send + Sync,
        V: Any + Send + Sync,
    {
        Context::note_value_type::<V>();
        let tag = hashed_tag(&key);
        let node = NodeRef::new_value(self.top.clone(), tag, F_VALUE, InlineKey(key), InlineValue(value));
        Context { top: Some(node), scope: self.scope }
    }

    /// Binds a typed key (compared by identity: no hashing, no runtime type check on reads).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, Key};
    /// static LOCALE: Key<&'static str> = Key::new("locale");
    /// let ctx = Context::background().with(&LOCALE, "fr");
    /// assert_eq!(ctx.get(&LOCALE), Some(&"fr"));
    /// ```
    #[must_use]
    pub fn with<T: Any + Send + Sync>(&self, key: &'static Key<T>, value: T) -> Context {
        Context::note_value_type::<T>();
        let node =
            NodeRef::new_value(self.top.clone(), key.tag(), F_VALUE | F_TYPED_INLINE, TypedKey, InlineValue(value));
        Context { top: Some(node), scope: self.scope }
    }

    /// The value bound to `key`, if it is a `V` (Go `ctx.Value(k).(V)`; a value of another type
    /// reads as absent).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// let ctx = Context::background().with_value(7u8, String::from("seven"));
    /// assert_eq!(ctx.value::<String, _>(&7u8).map(String::as_str), Some("seven"));
    /// assert_eq!(ctx.value::<u32, _>(&7u8), None); // wrong type: absent, no panic
    /// ```
    #[inline]
    #[must_use]
    pub fn value<V: Any, K: Eq + Hash + Any + Send + Sync>(&self, key: &K) -> Option<&V> {
        let top = self.top.as_ref()?.ptr();
        // SAFETY: `top` is alive as long as `self`, and so is every node found under it;
        // `key_is` is only called with live value nodes (they have the key's tag). The key's
        // type is known here: keys compare and the value is reached without indirect calls.
        unsafe {
            let node = lookup_by(top, hashed_tag(key), |n| n.key_is(key))?;
            if node.header().is_tombstone() { None } else { node.value_as::<V, _>(self) }
        }
    }

    /// The value bound to `key`, whatever its type.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// let ctx = Context::background().with_value("n", 5i64);
    /// assert!(ctx.value_any(&"n").unwrap().is::<i64>());
    /// ```
    #[inline]
    #[must_use]
    pub fn value_any<K: Eq + Hash + Any + Send + Sync>(&self, key: &K) -> Option<&(dyn Any + Send + Sync)> {
        self.lookup(&KeyQuery::new(key))
    }

    /// The value bound to a typed key.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, Key};
    /// static ATTEMPT: Key<u32> = Key::new("attempt");
    /// assert_eq!(Context::background().get(&ATTEMPT), None);
    /// assert_eq!(Context::background().with(&ATTEMPT, 3).get(&ATTEMPT), Some(&3));
    /// ```
    #[inline]
    #[must_use]
    pub fn get<T: Any>(&self, key: &'static Key<T>) -> Option<&T> {
        let top = self.top.as_ref()?.ptr();
        // SAFETY: `top` is alive as long as `self`, and so is every node found under it.
        unsafe {
            let node = lookup(top, &KeyQuery::typed(key))?;
            let h = node.header();
            if h.flags & F_TYPED_INLINE != 0 {
                // SAFETY: the flag and a tag equal to `key`'s address mean `with::<T>(key, _)`.
                Some(node.typed_value::<T, _>(self))
            } else if h.is_tombstone() {
                None
            } else {
                node.value(self).downcast_ref::<T>()
            }
        }
    }

    /// The value for an erased key (what [`Session`](crate::Session) implementations use).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, KeyQuery};
    /// let ctx = Context::background().with_value("a", 1u8);
    /// assert!(ctx.lookup(&KeyQuery::new(&"a")).is_some());
    /// ```
    #[inline]
    #[must_use]
    pub fn lookup(&self, query: &KeyQuery<'_>) -> Option<&(dyn Any + Send + Sync)> {
        let top = self.top.as_ref()?.ptr();
        // SAFETY: `top` is alive as long as `self`, and so is every node found under it.
        unsafe {
            let node = lookup(top, query)?;
            if node.header().is_tombstone() { None } else { Some(node.value(self)) }
        }
    }

    /// A child context with its own cancel scope, and the handle that cancels it (Go
    /// `context.WithCancel`). Cancelling reaches every context derived from the child, never the
    /// parent or a sibling. If `self` is cancelled already, the child is born cancelled.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, ContextError};
    /// let (parent, cancel_parent) = Context::background().with_cancel();
    /// let (a, cancel_a) = parent.with_cancel();
    /// let (b, _cancel_b) = parent.with_cancel();
    /// cancel_a.cancel();
    /// assert!(a.is_done() && !b.is_done() && !parent.is_done());
    /// cancel_parent.cancel();
    /// assert_eq!(b.err(), Some(ContextError::Canceled));
    /// ```
    #[must_use]
    pub fn with_cancel(&self) -> (Context, CancelHandle) {
        self.open_scope(None)
    }

    /// Like [`with_cancel`](Context::with_cancel), and the child expires at `deadline` (or at
    /// the parent's deadline, if earlier) — Go `context.WithDeadline`.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::{Clock, Context, ContextError, Instant};
    /// struct At100;
    /// impl Clock for At100 { fn now(&self) -> Duration { Duration::from_secs(100) } }
    /// static CLOCK: At100 = At100;
    ///
    /// let past = Instant::from_clock_time(&CLOCK, Duration::from_secs(99));
    /// let (ctx, _cancel) = Context::background().with_deadline(past);
    /// assert_eq!(ctx.err(), Some(ContextError::DeadlineExceeded));
    /// assert_eq!(ctx.deadline(), Some(past));
    /// ```
    #[must_use]
    pub fn with_deadline(&self, deadline: Instant) -> (Context, CancelHandle) {
        self.open_scope(Some(deadline))
    }

    /// Like [`with_deadline`](Context::with_deadline) at now + `timeout` on the
    /// [global clock](crate::set_global_clock) (Go `context.WithTimeout`).
    ///
    /// # Errors
    /// [`NoClockError`] if no clock is registered.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::Context;
    /// // No clock registered in this doctest's process:
    /// assert!(Context::background().with_timeout(Duration::from_secs(1)).is_err());
    /// ```
    pub fn with_timeout(&self, timeout: Duration) -> Result<(Context, CancelHandle), NoClockError> {
        let clock = global_clock().ok_or(NoClockError(()))?;
        Ok(self.with_deadline(Instant::now(clock) + timeout))
    }

    fn open_scope(&self, deadline: Option<Instant>) -> (Context, CancelHandle) {
        // SAFETY: `self.scope` is in `self.top`'s chain (the invariant of `Context`).
        let (node, scope) = unsafe { ScopeNode::open(self.top.clone(), self.scope, deadline, false) };
        let handle = CancelHandle { scope: node.clone() };
        (Context { top: Some(node), scope: Some(scope) }, handle)
    }

    /// Opens a scope and returns the context only (sessions keep the scope themselves). A
    /// `barrier` scope hides the values below it (a `SessionMap`'s base).
    pub(crate) fn open_scope_ctx(&self, deadline: Option<Instant>, barrier: bool) -> Context {
        // SAFETY: as in `open_scope`.
        let (node, scope) = unsafe { ScopeNode::open(self.top.clone(), self.scope, deadline, barrier) };
        Context { top: Some(node), scope: Some(scope) }
    }

    /// The same values, detached from cancellation: never done, no deadline (Go
    /// `context.WithoutCancel`). Free: no allocation.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// let (ctx, cancel) = Context::background().with_value("k", 1u8).with_cancel();
    /// cancel.cancel();
    /// let detached = ctx.without_cancel();
    /// assert!(ctx.is_done() && !detached.is_done());
    /// assert_eq!(detached.value::<u8, _>(&"k"), Some(&1));
    /// ```
    #[must_use]
    pub fn without_cancel(&self) -> Context {
        Context { top: self.top.clone(), scope: None }
    }

    /// The deadline, if this context or an ancestor scope has one (the earliest).
    ///
    /// Deadlines of different [`Clock`](crate::Clock)s cannot be compared: when a scope's
    /// deadline is on another clock than its parent's, this is the scope's own (on its clock),
    /// and the context still expires no later than the parent, whose deadline is checked on
    /// the parent's clock.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// assert!(Context::background().deadline().is_none());
    /// ```
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        self.scope()?.deadline()
    }

    /// Why this context is done, or `None` while it is not (Go `ctx.Err()` and
    /// `context.Cause`: a cause given to [`CancelHandle::cancel_with_cause`] is returned as is).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, ContextError};
    /// #[derive(Debug)]
    /// struct Shutdown;
    /// impl std::fmt::Display for Shutdown {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("shutdown") }
    /// }
    /// impl std::error::Error for Shutdown {}
    ///
    /// let (ctx, cancel) = Context::background().with_cancel();
    /// cancel.cancel_with_cause(ContextError::cause(Shutdown));
    /// assert_eq!(ctx.err().unwrap().to_string(), "shutdown");
    /// ```
    #[must_use]
    pub fn err(&self) -> Option<ContextError> {
        self.scope()?.err()
    }

    /// Whether this context is cancelled or past its deadline. One atomic load (and a clock
    /// read if there is a deadline); no lock.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// let (ctx, cancel) = Context::background().with_cancel();
    /// assert!(!ctx.is_done());
    /// cancel.cancel();
    /// assert!(ctx.is_done());
    /// ```
    #[inline]
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.scope().is_some_and(ScopeNode::is_done)
    }

    /// A future that resolves when this context is done (Go `ctx.Done()`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// # futures::executor::block_on(async {
    /// let (ctx, cancel) = Context::background().with_cancel();
    /// std::thread::spawn(move || cancel.cancel());
    /// ctx.done().await;
    /// assert!(ctx.err().is_some());
    /// # });
    /// ```
    pub fn done(&self) -> Done {
        Done::new(self.scope_ref())
    }

    /// Runs `f` once when this context is cancelled (or its deadline fires on the clock's timer),
    /// on the thread that cancels it; immediately if it is done already (Go `context.AfterFunc`).
    /// The returned handle can [stop](AfterCancel::stop) it.
    ///
    /// The cancel wakes the tasks waiting on [`done`](Context::done) first, then runs the
    /// callbacks in registration order; the scope and every scope under it are cancelled before
    /// any of them runs. A panic there — a callback's, or a waker's `wake` — goes on to the
    /// cancelling caller: with the `std` feature (which the std adapter enables) after every
    /// other waker and callback has run; without it at once, and the callbacks after it are
    /// dropped without running (there is no `catch_unwind` without `std`).
    ///
    /// # Examples
    /// ```
    /// use std::sync::mpsc;
    /// use localsession_core::Context;
    /// let (ctx, cancel) = Context::background().with_cancel();
    /// let (tx, rx) = mpsc::channel();
    /// let _handle = ctx.after_cancel(move || tx.send("cleaned up").unwrap());
    /// cancel.cancel();
    /// assert_eq!(rx.recv().unwrap(), "cleaned up");
    /// ```
    pub fn after_cancel(&self, f: impl FnOnce() + Send + 'static) -> AfterCancel {
        AfterCancel::register(self.scope_ref(), Box::new(f))
    }

    /// Whether both are the same context (same chain head and scope).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// let a = Context::background().with_value(1u8, 1u8);
    /// assert!(a.ptr_eq(&a.clone()));
    /// assert!(!a.ptr_eq(&a.with_value(1u8, 1u8)));
    /// ```
    #[must_use]
    pub fn ptr_eq(&self, other: &Context) -> bool {
        let same_top = match (&self.top, &other.top) {
            (Some(a), Some(b)) => NodeRef::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same_top && self.scope == other.scope
    }
}

impl Clone for Context {
    #[inline]
    fn clone(&self) -> Self {
        Context { top: self.top.clone(), scope: self.scope }
    }
}

impl Default for Context {
    fn default() -> Self {
        Context::background()
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("cancellable", &self.scope.is_some())
            .field("err", &self.err())
            .field("deadline", &self.deadline())
            .finish_non_exhaustive()
    }
}

/// Cancels the scope made by [`Context::with_cancel`] / `with_deadline` / `with_timeout` (Go's
/// `CancelFunc`). Cloning gives another handle to the same scope; dropping does not cancel.
///
/// # Examples
/// ```
/// use localsession_core::Context;
/// let (ctx, cancel) = Context::background().with_cancel();
/// assert!(cancel.cancel());   // cancelled it
/// assert!(!cancel.cancel());  // already cancelled
/// assert!(ctx.is_done());
/// ```
#[derive(Clone)]
pub struct CancelHandle {
    scope: NodeRef,
}

impl CancelHandle {
    /// Cancels with [`ContextError::Canceled`]. Returns `false` if the scope was done already
    /// (cancelled, through an ancestor too, or past its deadline; `err()` then keeps its first
    /// value, as in Go).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, ContextError};
    /// let (parent, cancel_parent) = Context::background().with_cancel();
    /// let (child, cancel_child) = parent.with_cancel();
    /// assert!(cancel_parent.cancel());
    /// assert!(!cancel_child.cancel()); // done already, through its parent
    /// assert_eq!(child.err(), Some(ContextError::Canceled));
    /// ```
    pub fn cancel(&self) -> bool {
        self.cancel_with_cause(ContextError::Canceled)
    }

    /// Cancels with a cause that [`Context::err`] will return (Go `CancelCauseFunc`).
    /// Returns `false` if the scope was done already (the first cause stays).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, ContextError};
    /// let (ctx, cancel) = Context::background().with_cancel();
    /// let cause = ContextError::cause(std::io::Error::other("client went away"));
    /// assert!(cancel.cancel_with_cause(cause.clone()));
    /// assert!(!cancel.cancel()); // the first cause stays
    /// assert_eq!(ctx.err(), Some(cause));
    /// assert_eq!(ctx.err().unwrap().to_string(), "client went away");
    /// ```
    pub fn cancel_with_cause(&self, cause: ContextError) -> bool {
        // SAFETY: a handle always holds a scope node.
        unsafe { ScopeNode::from_node(&self.scope) }.cancel(cause)
    }

    /// Whether the scope is done: cancelled (by this handle or an ancestor) or past its deadline.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::{Clock, Context, Instant};
    /// struct Fixed;
    /// impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(10) } }
    /// static CLOCK: Fixed = Fixed;
    ///
    /// let (_ctx, cancel) = Context::background().with_cancel();
    /// assert!(!cancel.is_cancelled());
    /// let past = Instant::from_clock_time(&CLOCK, Duration::from_secs(5));
    /// let (_expired, handle) = Context::background().with_deadline(past);
    /// assert!(handle.is_cancelled()); // past its deadline counts, without any cancel
    /// ```
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        // SAFETY: as above.
        unsafe { ScopeNode::from_node(&self.scope) }.is_done()
    }
}

impl fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelHandle").field("done", &self.is_cancelled()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    static K1: Key<u32> = Key::new("k1");
    static K2: Key<u32> = Key::new("k2");

    /// Hashes exactly as the `u64` it wraps: its keys get the same tags as `u64` keys.
    #[derive(PartialEq, Eq, Hash)]
    struct Wrapped(u64);

    /// `value` compares keys and reaches values by static type where the node stores them
    /// inline (`NodePtr::key_is`, `NodePtr::value_as`) and through the node's vtable where they
    /// are erased (a session's `with_value_dyn`); both must read as the erased path alone does.
    #[test]
    fn typed_reads_agree_with_the_erased_path() {
        use crate::session::{SessionCtx, SessionExt};
        assert_eq!(hashed_tag(&Wrapped(9)), hashed_tag(&9u64), "the test needs equal tags");
        let ctx = Context::background().with_value(9u64, String::from("plain")).with_value(Wrapped(9), 7u32);
        assert_eq!(ctx.value::<String, _>(&9u64).map(String::as_str), Some("plain"));
        assert_eq!(ctx.value::<u32, _>(&Wrapped(9)), Some(&7));
        assert_eq!(ctx.value::<u32, _>(&9u64), None, "the key's value is a String");
        assert_eq!(ctx.value::<String, _>(&Wrapped(9)), None, "the key's value is a u32");
        // Deep enough that the bindings sit in index tables.
        let mut deep = ctx.clone();
        for i in 0..40u32 {
            deep = deep.with_value(i, i);
        }
        assert_eq!(deep.value::<u32, _>(&Wrapped(9)), Some(&7));
        assert_eq!(deep.value::<u32, _>(&17u32), Some(&17));
        // An erased binding (`SharedKey`, `Arc<dyn Any>`) of the same `u64` key shadows it.
        let erased = SessionExt::with_value(&SessionCtx::new(&deep), 9u64, 11u32);
        let ctx = erased.as_ctx().expect("a context session").context().clone();
        assert_eq!(ctx.value::<u32, _>(&9u64), Some(&11));
        assert_eq!(ctx.value::<String, _>(&9u64), None);
        assert_eq!(ctx.value::<u32, _>(&Wrapped(9)), Some(&7));
        assert_eq!(ctx.with_value(9u64, 12u32).value::<u32, _>(&9u64), Some(&12));
    }

    #[test]
    fn typed_keys_are_distinct_by_identity() {
        let ctx = Context::background().with(&K1, 1).with(&K2, 2);
        assert_eq!(ctx.get(&K1), Some(&1));
        assert_eq!(ctx.get(&K2), Some(&2));
    }

    #[test]
    fn wrong_type_reads_absent() {
        let ctx = Context::background().with_value(1u32, String::from("x"));
        assert_eq!(ctx.value::<u64, _>(&1u32), None);
        assert_eq!(ctx.value::<String, _>(&1u64), None);
        assert_eq!(ctx.value::<String, _>(&1u32).map(String::as_str), Some("x"));
    }

    #[test]
    fn scopes_are_transparent_to_values() {
        let ctx = Context::background().with_value("a", 1u8);
        let (c, _h) = ctx.with_cancel();
        let c = c.with_value("b", 2u8);
        let (c, _h2) = c.with_cancel();
        assert_eq!(c.value::<u8, _>(&"a"), Some(&1));
        assert_eq!(c.value::<u8, _>(&"b"), Some(&2));
    }

    #[test]
    fn cancel_reaches_descendants_not_ancestors_or_siblings() {
        let (root, cancel_root) = Context::background().with_cancel();
        let (a, cancel_a) = root.with_cancel();
        let a1 = a.with_value("x", 1u8);
        let (a2, _h) = a1.with_cancel();
        let (b, _hb) = root.with_cancel();
        assert!(cancel_a.cancel());
        assert!(a.is_done() && a1.is_done() && a2.is_done());
        assert!(!root.is_done() && !b.is_done());
        cancel_root.cancel();
        assert!(b.is_done());
        assert_eq!(a2.err(), Some(ContextError::Canceled));
    }

    #[test]
    fn child_of_cancelled_is_born_cancelled() {
        let (root, cancel) = Context::background().with_cancel();
        cancel.cancel();
        let (child, _h) = root.with_cancel();
        assert_eq!(child.err(), Some(ContextError::Canceled));
    }

    #[test]
    fn dropped_children_leave_the_parent_list() {
        let (root, cancel) = Context::background().with_cancel();
        for _ in 0..if cfg!(miri) { 50 } else { 1000 } {
            let (c, _h) = root.with_cancel();
            drop(c);
        }
        // SAFETY-free check through the public surface: cancelling still works and is cheap.
        assert!(cancel.cancel());
    }

    #[test]
    fn deep_scope_tree_cancels_without_recursion() {
        let (root, cancel) = Context::background().with_cancel();
        let mut ctx = root.clone();
        let mut handles = alloc::vec::Vec::new();
        for _ in 0..if cfg!(miri) { 300 } else { 50_000 } {
            let (c, h) = ctx.with_cancel();
            handles.push(h);
            ctx = c;
        }
        cancel.cancel();
        assert!(ctx.is_done());
        drop(handles);
        drop(ctx);
    }

    /// Regression: deadlines of different clocks were merged by raw time since each clock's
    /// origin, so a child whose deadline is on another clock could outlive its parent's.
    #[test]
    fn a_child_on_another_clock_expires_no_later_than_its_parent() {
        use crate::time::Clock;
        use core::sync::atomic::{AtomicU64, Ordering};

        struct Fake(AtomicU64);
        impl Clock for Fake {
            fn now(&self) -> Duration {
                Duration::from_secs(self.0.load(Ordering::SeqCst))
            }
        }
        // Two clocks with different origins: `OLD` has counted 1000 s more than `NEW`.
        static OLD: Fake = Fake(AtomicU64::new(1_000));
        static NEW: Fake = Fake(AtomicU64::new(0));
        let advance = |secs| {
            OLD.0.fetch_add(secs, Ordering::SeqCst);
            NEW.0.fetch_add(secs, Ordering::SeqCst);
        };

        // The parent expires in 5 s (on `OLD`), the child's own deadline is in 100 s (on `NEW`).
        let (parent, _p) =
            Context::background().with_deadline(Instant::from_clock_time(&OLD, Duration::from_secs(1_005)));
        let (child, _c) = parent.with_deadline(Instant::from_clock_time(&NEW, Duration::from_secs(100)));
        let (grandchild, _g) = child.with_cancel();
        // A sibling whose own deadline (on `NEW`) comes first: it counts.
        let (early, _e) = parent.with_deadline(Instant::from_clock_time(&NEW, Duration::from_secs(2)));
        assert!(!child.is_done() && !grandchild.is_done() && !early.is_done());
        advance(3);
        assert!(early.is_done() && !parent.is_done() && !child.is_done());
        advance(7);
        assert!(parent.is_done());
        assert!(child.is_done(), "the child outlived its parent's deadline");
        assert_eq!(child.err(), Some(ContextError::DeadlineExceeded));
        assert!(grandchild.is_done());
        // Scopes opened after the parent expired are done too.
        let (late, _l) = child.with_deadline(Instant::from_clock_time(&NEW, Duration::from_secs(1_000)));
        assert!(late.is_done());
    }
}
