//! Cancel scopes: validity flags, the cancellation tree, `done()`, `after_cancel` and expiry.
//!
//! A scope is a node of the context chain (tag 0, so value lookups pass over it) that a
//! [`Context`](crate::Context) points at directly, so checking validity never walks the values.
//!
//! # Synchronization
//!
//! - `state` is `ACTIVE` or `CANCELLED`; it changes once, from `ACTIVE` to `CANCELLED`, under the
//!   scope's lock, after `cause` was written. Readers load it with `Acquire` and only then read
//!   `cause`, so checking validity is one atomic load per scope (plus a clock read when the scope
//!   has a deadline) and takes no lock.
//! - Cancellation propagates *down*, as in Go: a scope opened under another registers itself in
//!   its parent's list, under the parent's lock. If the parent is cancelled already, the child is
//!   born cancelled with the parent's cause; otherwise the parent's cancel will find it. Because
//!   both the registration and the cancel's `ACTIVE -> CANCELLED` happen under the same lock,
//!   no child is ever missed (the loom model `fork_vs_disable` checks this), and a single atomic
//!   load of the child's own state is enough to observe an ancestor's cancellation once the
//!   cancel returned.
//! - Cancel takes the whole list under the lock, then works outside it: children are cancelled
//!   iteratively (a work stack, so deep trees do not recurse), then wakers are woken, then
//!   callbacks run, in registration order, on the cancelling thread. A panicking callback (or
//!   `wake`) unwinds to the canceller after the scope and its descendants are already
//!   cancelled: with `std`, once every other waker and callback has run (each is caught and the
//!   first panic resumed); without `std`, at once, and the callbacks after it are dropped
//!   without running.
//! - A parent reaches a child through a raw pointer in its list. A child whose count reaches zero
//!   first removes itself from the parent's list, under the parent's lock ([`detach`]), and only
//!   then is freed; the parent's cancel takes a reference to each child under that same lock,
//!   only if the child's count is not already zero. So a child is never freed while its parent
//!   can still reach it.
//! - A cancel returns only once the scope and every scope under it are cancelled, also when it
//!   loses the race to another cancel. This follows Go's `cancelCtx.cancel`, which holds the
//!   scope's mutex while it cancels the children, so that a losing cancel, blocked on that mutex,
//!   returns after the whole subtree is cancelled. Here the winner propagates outside the lock
//!   (the children's `detach`, registrations and `err()` must not wait behind a whole subtree),
//!   so the winning `settle` raises the scope's `propagating` flag under the lock, and the
//!   winner lowers the flags of every scope it settled once its whole propagation loop is over
//!   (before it wakes wakers and runs callbacks). A cancel that finds the scope settled
//!   already — the loser at the top, or a winner that finds a child another cancel settled —
//!   waits until that scope's flag is down ([`ScopeNode::wait_propagated`], which argues why
//!   this cannot deadlock). Loom models `losing_cancel_returns_after_the_subtree` and
//!   `cancel_of_a_child_vs_cancel_of_the_root`.
//! - `done()` registers a waker under the lock after checking `state` under it, so a concurrent
//!   cancel either sees the waker or the poll sees `CANCELLED`: no lost wake-up (loom model
//!   `done_vs_cancel`). No user code runs under a scope's lock: a waker is cloned before the
//!   lock is taken (or between two lock sections, [`ScopeNode::update_waker`]), and wakers,
//!   callbacks and replaced wakers are woken, run or dropped after it is released.
//!
//! # Layering
//!
//! Scopes are built from [`node`](crate::node)s and read [`time`](crate::time); neither names
//! this module back. Node reclamation reaches a scope through its vtable (`SCOPE_VTABLE`'s
//! `detach` leaves the parent's list before the node is freed), and a clock's timer through the
//! [`Expiry`] handle that `time` defines and this module implements (`fire`, `is_settled`,
//! `settled`, `deadline`).

use core::future::Future;
use core::pin::Pin;
use core::ptr::NonNull;
use core::task::{Context as TaskContext, Poll, Waker};
use core::{fmt, mem};

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::error::ContextError;
use crate::node::{F_BARRIER, F_SCOPE, Header, NodePtr, NodeRef, VTable};
use crate::primitive::{AtomicBool, AtomicU8, Mutex, Ordering, UnsafeCell, spin_wait};
use crate::time::{Expiry, Instant};

const ACTIVE: u8 = 0;
const CANCELLED: u8 = 1;
const NO_SLOT: usize = usize::MAX;

/// A cancel scope: a node of the chain with the validity state.
#[repr(C)]
pub(crate) struct ScopeNode {
    header: Header,
    state: AtomicU8,
    cause: UnsafeCell<Option<ContextError>>,
    /// The nearest enclosing scope this one is registered in (alive: it is in our chain).
    parent: Option<NonNull<ScopeNode>>,
    slot_in_parent: usize,
    /// The earliest deadline of this scope and of its ancestors up to the nearest one whose
    /// deadline is on another clock (instants of different clocks do not compare).
    deadline: Option<Instant>,
    /// That ancestor, if any: its expiry (checked on its own clock, and through its own `outer`)
    /// is ours too. It is in our chain, so alive while we are.
    outer: Option<ScopePtr>,
    timer_armed: AtomicU8,
    /// Raised (under `regs`) by the cancel that settles this scope, lowered by it once it has
    /// settled every scope below; a cancel that finds the scope settled waits for it to be
    /// lowered ([`ScopeNode::wait_propagated`]).
    propagating: AtomicBool,
    regs: Mutex<Registrations>,
}

/// Raw pointer to a scope node, as kept in a [`Context`](crate::Context).
pub(crate) type ScopePtr = NonNull<ScopeNode>;

static UNIT: () = ();

const SCOPE_VTABLE: VTable = VTable {
    drop_and_free: ScopeNode::drop_and_free,
    key_eq: |_, _| false,
    key_eq_same_type: |_, _| false,
    key_any: |_| None,
    value: |_| &UNIT,
    shared: |_| None,
    rebind: None,
    detach: Some(detach),
    inline_key: None,
    shared_value: None,
    inline_value: None,
};

enum Slot {
    Vacant(usize),
    Child(NodePtr),
    Waker(Waker),
    Callback(Box<dyn FnOnce() + Send>),
}

/// A slab of registrations: O(1) insert and removal by index, so a long-lived root with many
/// short-lived children stays cheap.
struct Registrations {
    slots: Vec<Slot>,
    free: usize,
    live: usize,
    /// An `err()` reported `DeadlineExceeded` for the passed deadline before the scope was
    /// settled: the scope then settles with that cause, whatever a racing cancel brings.
    deadline_seen: bool,
}

impl Registrations {
    const fn new() -> Self {
        Registrations { slots: Vec::new(), free: NO_SLOT, live: 0, deadline_seen: false }
    }

    fn next_index(&self) -> usize {
        if self.free == NO_SLOT { self.slots.len() } else { self.free }
    }

    fn insert(&mut self, slot: Slot) -> usize {
        self.live += 1;
        if self.free == NO_SLOT {
            self.slots.push(slot);
            self.slots.len() - 1
        } else {
            let idx = self.free;
            self.free = match mem::replace(&mut self.slots[idx], slot) {
                Slot::Vacant(next) => next,
                _ => unreachable!("free list points at an occupied slot"),
            };
            idx
        }
    }

    fn remove(&mut self, idx: usize) -> Option<Slot> {
        match self.slots.get(idx) {
            None | Some(Slot::Vacant(_)) => return None,
            Some(_) => {}
        }
        let old = mem::replace(&mut self.slots[idx], Slot::Vacant(self.free));
        self.free = idx;
        self.live -= 1;
        if self.live == 0 {
            // Everything left: forget the free list and give memory back after a burst.
            self.slots.clear();
            self.free = NO_SLOT;
            if self.slots.capacity() > 64 {
                self.slots.shrink_to_fit();
            }
        }
        Some(old)
    }

    fn take(&mut self) -> Vec<Slot> {
        self.free = NO_SLOT;
        self.live = 0;
        mem::take(&mut self.slots)
    }
}

/// What a cancel collected, to be processed outside every lock.
#[derive(Default)]
struct Fired {
    children: Vec<NodeRef>,
    wakers: Vec<Waker>,
    callbacks: Vec<Box<dyn FnOnce() + Send>>,
}

impl ScopeNode {
    /// Opens a scope above `parent_top`, registered in `parent_scope`.
    ///
    /// # Safety
    /// `parent_scope` is `None` or points to a scope node in `parent_top`'s chain (the pair of a
    /// [`Context`](crate::Context)): it is dereferenced, and the new scope keeps a raw pointer
    /// to it that is valid only while the new node holds that chain.
    pub(crate) unsafe fn open(
        parent_top: Option<NodeRef>,
        parent_scope: Option<ScopePtr>,
        deadline: Option<Instant>,
        barrier: bool,
    ) -> (NodeRef, ScopePtr) {
        // SAFETY: `parent_scope` is in `parent_top`'s chain, which we hold (the caller's
        // guarantee).
        let (parent_deadline, parent_outer) =
            parent_scope.map_or((None, None), |p| unsafe { (p.as_ref().deadline, p.as_ref().outer) });
        let (deadline, outer) = match (deadline, parent_deadline) {
            // One clock: the earlier deadline is the one that counts.
            (Some(own), Some(inherited)) if own.same_clock(&inherited) => (Some(own.min(inherited)), parent_outer),
            // Two clocks: keep our own, and check the parent's expiry through the parent.
            (Some(own), Some(_)) => (Some(own), parent_scope),
            // (A parent without a deadline has no `outer` either.)
            (own, inherited) => (own.or(inherited), parent_outer),
        };
        let node = Box::new(ScopeNode {
            header: Header::new(&SCOPE_VTABLE, 0, if barrier { F_SCOPE | F_BARRIER } else { F_SCOPE }),
            state: AtomicU8::new(ACTIVE),
            cause: UnsafeCell::new(None),
            parent: parent_scope,
            slot_in_parent: NO_SLOT,
            deadline,
            outer,
            timer_armed: AtomicU8::new(0),
            propagating: AtomicBool::new(false),
            regs: Mutex::new(Registrations::new()),
        });
        let ptr: ScopePtr = NonNull::from(Box::leak(node));
        // SAFETY: a fresh node made with `Box`, freed by `SCOPE_VTABLE.drop_and_free`.
        let node = unsafe { NodeRef::from_new(ptr.cast(), parent_top) };
        if let Some(parent) = parent_scope {
            // SAFETY: the parent scope is in our chain, alive while `node` is.
            let parent = unsafe { parent.as_ref() };
            let mut regs = parent.regs.lock();
            // Relaxed: `state` only changes under this lock.
            if parent.state.load(Ordering::Relaxed) == CANCELLED {
                // Born cancelled; not registered anywhere. The node is still private to us.
                let cause = parent.cause_unchecked();
                // SAFETY: nobody else can reach the fresh node yet.
                unsafe {
                    (*ptr.as_ptr()).cause.with_mut(|c| *c = Some(cause));
                    (*ptr.as_ptr()).parent = None;
                }
                // Relaxed is enough: the node is published to other threads only through
                // synchronizing operations (a spawn, a channel, a lock).
                // SAFETY: `ptr` is live.
                unsafe { ptr.as_ref() }.state.store(CANCELLED, Ordering::Relaxed);
            } else {
                // SAFETY: the node is still private; the index is written before the parent
                // can see the node.
                unsafe { (*ptr.as_ptr()).slot_in_parent = regs.next_index() };
                regs.insert(Slot::Child(node.ptr()));
            }
        }
        (node, ptr)
    }

    /// The scope behind a node reference.
    ///
    /// # Safety
    /// `node` is a scope node.
    #[inline]
    pub(crate) unsafe fn from_node(node: &NodeRef) -> &ScopeNode {
        // SAFETY: forwarded; the pointer has the provenance of the whole allocation.
        unsafe { node.ptr().0.cast::<ScopeNode>().as_ref() }
    }

    /// # Safety
    /// `node` is a `ScopeNode` with no other references, detached, whose parent was moved out.
    unsafe fn drop_and_free(node: NonNull<Header>, _nested: &mut Vec<NodeRef>) {
        // SAFETY: allocated with `Box` in `open`.
        drop(unsafe { Box::from_raw(node.cast::<ScopeNode>().as_ptr()) });
    }

    #[inline]
    pub(crate) fn is_cancelled(&self) -> bool {
        // Acquire: pairs with the Release store in `settle`, making `cause` readable.
        self.state.load(Ordering::Acquire) == CANCELLED
    }

    #[inline]
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether this scope's deadline, or that of an ancestor on another clock, has passed.
    #[inline]
    fn deadline_passed(&self) -> bool {
        let mut scope = self;
        loop {
            if scope.deadline.is_some_and(|d| d.has_passed()) {
                return true;
            }
            match scope.outer {
                // SAFETY: `outer` is an ancestor scope in `scope`'s chain, alive while `self` is.
                Some(outer) => scope = unsafe { outer.as_ref() },
                None => return false,
            }
        }
    }

    #[inline]
    pub(crate) fn is_done(&self) -> bool {
        self.is_cancelled() || self.deadline_passed()
    }

    pub(crate) fn err(&self) -> Option<ContextError> {
        if self.is_cancelled() {
            Some(self.cause_unchecked())
        } else if self.deadline_passed() {
            // Decided under the lock `settle` takes: a cancel that settled first is seen here,
            // and one that read the clock before the deadline but settles after this finds the
            // mark and settles `DeadlineExceeded` — so `err()` never changes once it is `Some`.
            // (Nothing is settled here: no callback runs inside `err()` or `Debug`; and no
            // clock is read under the lock.)
            let mut regs = self.regs.lock();
            // Relaxed: `state` only changes under this lock.
            if self.state.load(Ordering::Relaxed) == CANCELLED {
                Some(self.cause_unchecked())
            } else {
                regs.deadline_seen = true;
                Some(ContextError::DeadlineExceeded)
            }
        } else {
            None
        }
    }

    /// Whether a deadline passed on the way from this scope up to `top` (excluded) that is
    /// earlier than `top`'s own: this scope's, or one of the scopes between — not one inherited
    /// from `top` or above (a scope stores its effective deadline, the earlier of its own and
    /// its parent's, so a deadline no earlier than `top`'s on the same clock is `top`'s).
    fn deadline_passed_below(&self, top: &ScopeNode) -> bool {
        let top_deadline = top.deadline;
        let mut scope = self;
        loop {
            if core::ptr::eq(scope, top) {
                return false;
            }
            let own = |d: &Instant| top_deadline.is_none_or(|t| !d.same_clock(&t) || *d < t);
            if scope.deadline.is_some_and(|d| own(&d) && d.has_passed()) {
                return true;
            }
            match scope.outer {
                // SAFETY: as in `deadline_passed`.
                Some(outer) => scope = unsafe { outer.as_ref() },
                None => return false,
            }
        }
    }

    /// The cause; the caller observed `CANCELLED` (with `Acquire`, or under the lock).
    fn cause_unchecked(&self) -> ContextError {
        // SAFETY: `cause` is written once before `state` becomes CANCELLED and never again.
        unsafe { self.cause.with(|c| (*c).clone()) }.unwrap_or(ContextError::Canceled)
    }

    /// Cancels this scope and every scope under it. Returns `false` if it was done already —
    /// cancelled, or past its deadline: like Go, whose timer would have cancelled it with
    /// `DeadlineExceeded` first, a scope whose deadline has passed settles with
    /// `DeadlineExceeded` whatever cause the late cancel brings, so `err()` never changes once
    /// it is `Some`.
    ///
    /// Whatever it returns, this scope and every scope under it are cancelled when it returns:
    /// a cancel that lost the race waits for the winner's propagation (as a losing cancel in Go
    /// waits on the mutex the winner holds while it cancels the children; see the module
    /// documentation).
    pub(crate) fn cancel(&self, cause: ContextError) -> bool {
        let given_deadline = cause.is_deadline_exceeded();
        let cause = if !given_deadline && self.deadline_passed() { ContextError::DeadlineExceeded } else { cause };
        let mut fired = Fired::default();
        let Some(cause) = self.settle(cause, &mut fired) else {
            // Cancelled already: return once whoever settled it has cancelled the subtree.
            self.wait_propagated();
            return false;
        };
        let expired = !given_deadline && cause.is_deadline_exceeded();
        // From here until `finish`, no user code runs (see `wait_propagated`): the references
        // to children are dropped only at the end (a last reference frees a chain, whose
        // values' `Drop` is user code), and the guard lowers our flags even if we unwind.
        let mut propagation = Propagation { top: Some(self), settled: Vec::new() };
        // Children another cancel settled first; we waited for its propagation.
        let mut waited = Vec::new();
        while let Some(child) = fired.children.pop() {
            // SAFETY: `Child` registrations are scope nodes; we hold a reference.
            let c = unsafe { ScopeNode::from_node(&child) };
            // A child already past an (earlier) deadline of its own reports that, as in Go —
            // not one it inherits from this scope or above, which this cancel's cause settled.
            let child_cause = if !cause.is_deadline_exceeded() && c.deadline_passed_below(self) {
                &ContextError::DeadlineExceeded
            } else {
                &cause
            };
            if c.settle(child_cause.clone(), &mut fired).is_some() {
                propagation.settled.push(child);
            } else {
                // Another cancel settled this child (it was cancelled itself: we took the list
                // it is registered in); it took the child's list, so wait until it is through.
                c.wait_propagated();
                waited.push(child);
            }
        }
        // Lowered before any user code runs: a waker or callback may cancel these scopes again
        // (and would then wait for our flags).
        let done = propagation.finish();
        run_user_code(fired.wakers, fired.callbacks);
        drop(done);
        drop(waited);
        !expired
    }

    /// Waits until the cancel that settled this scope has settled every scope below it: spins
    /// (yielding, [`spin_wait`]) until `propagating` is down. The caller found the scope
    /// `CANCELLED` under its lock, so it sees the flag raised or already lowered, never the
    /// initial `false` (the winner raised it in the same lock section that settled `state`). A
    /// scope born cancelled never raises it: every scope under it is born cancelled too.
    ///
    /// Why the waits cannot deadlock:
    /// - No thread waits while it holds a scope's lock (every lock section is short and never
    ///   waits), so the waits only wait for other threads' propagation loops.
    /// - A propagation loop runs no user code: it settles scopes and reads clocks; wakers,
    ///   callbacks and the `Drop` of references run after the flags are lowered. (A
    ///   `Clock::now` that cancelled a scope being propagated would re-enter, like any clock
    ///   that re-enters the scope it is read for.) So a thread never waits for its own flags:
    ///   it could only do so by cancelling again from inside its own propagation.
    /// - A thread whose cancel lost at the top settled nothing and raised no flag: nobody waits
    ///   for it.
    /// - The waits follow the tree downwards. A winner `W` waits for a child `c` of a scope it
    ///   settled, which another thread `T` settled; `T` cannot have reached `c` through `c`'s
    ///   parent (`W` took that list, and a scope is registered in one list only), so `c` is
    ///   the scope `T`'s cancel was called on, and every flag `T` raised is on `c` or below.
    ///   Along any chain of waits the top scope of the awaited thread is strictly deeper in the
    ///   tree than that of the waiting one: there is no cycle.
    /// - Each loop is finite: a child opened under a settled scope is born cancelled instead of
    ///   joining the list the loop took.
    fn wait_propagated(&self) {
        // Acquire: pairs with the Release store in `Propagation::finish` (or its `Drop`): once
        // the flag reads lowered, every scope below is seen `CANCELLED`, with its cause.
        while self.propagating.load(Ordering::Acquire) {
            spin_wait();
        }
    }

    /// Marks this scope cancelled and collects its registrations; returns the cause it settled
    /// with, `None` if it was cancelled already. A cause other than `DeadlineExceeded` becomes
    /// `DeadlineExceeded` if an `err()` already reported the passed deadline (it marks that
    /// under this lock): `err()` never changes once it is `Some`.
    fn settle(&self, cause: ContextError, fired: &mut Fired) -> Option<ContextError> {
        let (slots, cause) = {
            let mut regs = self.regs.lock();
            // Relaxed: `state` only changes under this lock.
            if self.state.load(Ordering::Relaxed) == CANCELLED {
                return None;
            }
            let cause = if regs.deadline_seen { ContextError::DeadlineExceeded } else { cause };
            // Relaxed: a cancel that loses reads the flag after it saw `CANCELLED` under this
            // lock, which orders this store before its load; the caller lowers it once the
            // scopes below are settled (see `wait_propagated`).
            self.propagating.store(true, Ordering::Relaxed);
            // SAFETY: no reader reads `cause` before seeing CANCELLED, which is stored below.
            unsafe { self.cause.with_mut(|c| *c = Some(cause.clone())) };
            // Release: publishes `cause` to lock-free readers of `state`.
            self.state.store(CANCELLED, Ordering::Release);
            let slots = regs.take();
            // Take references to children while we still hold the lock their `detach` needs.
            for slot in &slots {
                if let Slot::Child(child) = slot {
                    // SAFETY: a listed child is not freed before it detaches under our lock.
                    if unsafe { child.header() }.try_acquire_ref() {
                        // SAFETY: we just acquired this reference.
                        fired.children.push(unsafe { NodeRef::from_raw(child.0) });
                    }
                }
            }
            (slots, cause)
        };
        for slot in slots {
            match slot {
                Slot::Waker(w) => fired.wakers.push(w),
                Slot::Callback(f) => fired.callbacks.push(f),
                Slot::Child(_) | Slot::Vacant(_) => {}
            }
        }
        Some(cause)
    }

    /// Registers a waker or callback; gives it back if the scope is cancelled already.
    fn register(&self, slot: Slot) -> Result<usize, Slot> {
        let mut regs = self.regs.lock();
        // Relaxed: `state` only changes under this lock.
        if self.state.load(Ordering::Relaxed) == CANCELLED {
            return Err(slot);
        }
        Ok(regs.insert(slot))
    }

    /// Replaces the waker at `idx`; `Err` if the scope was cancelled meanwhile.
    ///
    /// `Waker::clone` (and `drop`) is user code, which may re-enter this scope (cancel it,
    /// register on it) and so must not run under `regs`, which is not re-entrant: the waker is
    /// compared under the lock (`will_wake` only compares pointers), cloned outside it, and put
    /// in under the lock again, after checking again that the scope is not cancelled; the old
    /// waker, or the clone if it is not needed any more, is dropped outside.
    fn update_waker(&self, idx: usize, waker: &Waker) -> Result<(), ()> {
        {
            let regs = self.regs.lock();
            // Relaxed: `state` only changes under this lock.
            if self.state.load(Ordering::Relaxed) == CANCELLED {
                return Err(());
            }
            match regs.slots.get(idx) {
                Some(Slot::Waker(w)) if w.will_wake(waker) => return Ok(()),
                Some(Slot::Waker(_)) => {}
                _ => return Err(()),
            }
        }
        let new = waker.clone();
        // The slot is still ours if the scope is not cancelled: only the `Done` that owns it
        // (polling now, through `&mut`) or a cancel (which settles the scope) removes it.
        let replaced = {
            let mut regs = self.regs.lock();
            if self.state.load(Ordering::Relaxed) == CANCELLED {
                Err(new)
            } else {
                match regs.slots.get_mut(idx) {
                    Some(Slot::Waker(w)) => Ok(mem::replace(w, new)),
                    _ => Err(new),
                }
            }
        };
        match replaced {
            Ok(old) => {
                drop(old);
                Ok(())
            }
            Err(unused) => {
                drop(unused);
                Err(())
            }
        }
    }

    /// Removes registration `idx`; `None` if the scope was cancelled (the cancel took it).
    fn unregister(&self, idx: usize) -> Option<Slot> {
        let mut regs = self.regs.lock();
        if self.state.load(Ordering::Relaxed) == CANCELLED {
            return None;
        }
        regs.remove(idx)
    }

    /// Asks the clock to fire this scope's expiry, once; and the clock of the ancestor on
    /// another clock (`outer`), whose expiry cancels this scope too.
    fn arm_timer(&self, node: &NodeRef) {
        if let Some(deadline) = self.deadline {
            // Relaxed: only decides which caller schedules; the expiry itself synchronizes
            // through the lock in `settle`.
            if self.timer_armed.swap(1, Ordering::Relaxed) == 0 {
                deadline.clock().schedule(deadline.since_origin(), Expiry { scope: node.clone() });
            }
        }
        if let Some(outer) = self.outer {
            // SAFETY: `outer` is an ancestor scope in our chain, alive while `node` is.
            let scope = unsafe { outer.as_ref() };
            // Relaxed: a hint that spares the reference below; `arm_timer` decides.
            if scope.timer_armed.load(Ordering::Relaxed) == 0 {
                // SAFETY: as above; the new reference keeps it alive for the call.
                let outer_node = unsafe { NodeRef::clone_from_ptr(NodePtr(outer.cast())) };
                scope.arm_timer(&outer_node);
            }
        }
    }
}

/// Wakes the wakers, then runs the callbacks, of one cancel (user code: the scopes are settled
/// and their flags lowered by now). With `std`, each runs under `catch_unwind`, so a panicking
/// `wake` or callback does not keep the ones after it from running; the first panic goes on to
/// the cancelling caller once all have run (later ones are reported by the panic hook and
/// dropped). Without `std` there is no `catch_unwind`: a panic goes on at once and the rest are
/// dropped without running (documented at `Context::after_cancel`).
fn run_user_code(wakers: Vec<Waker>, callbacks: Vec<Box<dyn FnOnce() + Send>>) {
    #[cfg(feature = "std")]
    {
        extern crate std;
        use core::panic::AssertUnwindSafe;
        use std::panic::{catch_unwind, resume_unwind};
        let mut first_panic = None;
        for waker in wakers {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| waker.wake())) {
                first_panic.get_or_insert(panic);
            }
        }
        for callback in callbacks {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(callback)) {
                first_panic.get_or_insert(panic);
            }
        }
        if let Some(panic) = first_panic {
            resume_unwind(panic);
        }
    }
    #[cfg(not(feature = "std"))]
    {
        for waker in wakers {
            waker.wake();
        }
        for callback in callbacks {
            callback();
        }
    }
}

/// The scopes one winning cancel settled: it lowers their `propagating` flags when its
/// propagation loop is over ([`finish`](Propagation::finish)) — or, should the loop unwind (a
/// panicking `Clock::now`), when the guard is dropped, so that no waiting cancel spins forever.
struct Propagation<'a> {
    /// The scope the cancel was called on; `None` once the flags are lowered.
    top: Option<&'a ScopeNode>,
    /// The scopes below it that this cancel settled (not those another cancel settled first).
    settled: Vec<NodeRef>,
}

impl Propagation<'_> {
    fn lower(&mut self) {
        if let Some(top) = self.top.take() {
            // Release: pairs with the Acquire load of `wait_propagated`; everything this loop
            // settled (states and causes, stored before) is visible to a waiter that sees it.
            top.propagating.store(false, Ordering::Release);
            for node in &self.settled {
                // SAFETY: only scope nodes are settled; we hold a reference to each.
                unsafe { ScopeNode::from_node(node) }.propagating.store(false, Ordering::Release);
            }
        }
    }

    /// Lowers the flags, and hands back the references (the caller drops them after the wakers
    /// and callbacks ran).
    fn finish(mut self) -> Vec<NodeRef> {
        self.lower();
        mem::take(&mut self.settled)
    }
}

impl Drop for Propagation<'_> {
    fn drop(&mut self) {
        self.lower();
    }
}

/// Removes a scope whose count reached zero from its parent's list: the scope vtable's
/// `detach`, which node reclamation calls before it releases the parent link.
///
/// # Safety
/// `node` is a scope node whose count reached zero and whose parent link is still held.
unsafe fn detach(node: NonNull<Header>) {
    // SAFETY: forwarded; only shared references are formed (the parent may be reading our count).
    let this = unsafe { node.cast::<ScopeNode>().as_ref() };
    if let Some(parent) = this.parent {
        // SAFETY: the parent scope is in our chain, which we still hold.
        let parent = unsafe { parent.as_ref() };
        let removed = {
            let mut regs = parent.regs.lock();
            if parent.state.load(Ordering::Relaxed) == CANCELLED { None } else { regs.remove(this.slot_in_parent) }
        };
        debug_assert!(removed.is_none() || matches!(removed, Some(Slot::Child(_))));
    }
}

/// A future that resolves when its context is cancelled or its deadline passes (Go's
/// `ctx.Done()`).
///
/// Made by [`Context::done`](crate::Context::done); owns a reference to the scope, so it is
/// `'static` and can move into a spawned task. A context that can never be cancelled
/// ([`Context::background`](crate::Context::background), `without_cancel`) gives a future that
/// never resolves.
///
/// # Examples
/// ```
/// use localsession_core::Context;
/// # futures::executor::block_on(async {
/// let (ctx, cancel) = Context::background().with_cancel();
/// let done = ctx.done();
/// cancel.cancel();
/// done.await;
/// assert!(ctx.is_done());
/// # });
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct Done {
    scope: Option<NodeRef>,
    slot: usize,
}

impl Done {
    pub(crate) fn new(scope: Option<NodeRef>) -> Done {
        Done { scope, slot: NO_SLOT }
    }
}

impl Future for Done {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(node) = &this.scope else { return Poll::Pending };
        // SAFETY: `Done` only holds scope nodes.
        let scope = unsafe { ScopeNode::from_node(node) };
        if scope.is_cancelled() {
            this.slot = NO_SLOT; // the cancel took the registration
            return Poll::Ready(());
        }
        if scope.deadline_passed() {
            scope.cancel(ContextError::DeadlineExceeded);
            this.slot = NO_SLOT;
            return Poll::Ready(());
        }
        if this.slot == NO_SLOT {
            match scope.register(Slot::Waker(cx.waker().clone())) {
                Ok(idx) => this.slot = idx,
                Err(_) => return Poll::Ready(()),
            }
        } else if scope.update_waker(this.slot, cx.waker()).is_err() {
            this.slot = NO_SLOT;
            return Poll::Ready(());
        }
        scope.arm_timer(node);
        Poll::Pending
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let (Some(node), true) = (&self.scope, self.slot != NO_SLOT) {
            // SAFETY: `Done` only holds scope nodes.
            drop(unsafe { ScopeNode::from_node(node) }.unregister(self.slot));
        }
    }
}

impl fmt::Debug for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Done").field("registered", &(self.slot != NO_SLOT)).finish()
    }
}

/// The handle of a callback registered with [`Context::after_cancel`](crate::Context::after_cancel)
/// (Go's `context.AfterFunc`). Dropping it leaves the callback registered.
///
/// # Examples
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use localsession_core::Context;
///
/// let (ctx, cancel) = Context::background().with_cancel();
/// let ran = Arc::new(AtomicBool::new(false));
/// let flag = ran.clone();
/// let handle = ctx.after_cancel(move || flag.store(true, Ordering::SeqCst));
/// cancel.cancel();
/// assert!(ran.load(Ordering::SeqCst));
/// assert!(!handle.stop()); // too late: it ran
/// ```
pub struct AfterCancel {
    scope: Option<NodeRef>,
    slot: usize,
}

impl AfterCancel {
    pub(crate) fn register(scope: Option<NodeRef>, f: Box<dyn FnOnce() + Send>) -> AfterCancel {
        let Some(node) = scope else {
            // Never cancelled: the callback can never run.
            drop(f);
            return AfterCancel { scope: None, slot: NO_SLOT };
        };
        // SAFETY: callers pass scope nodes only.
        let s = unsafe { ScopeNode::from_node(&node) };
        match s.register(Slot::Callback(f)) {
            Ok(idx) => {
                if s.deadline_passed() {
                    s.cancel(ContextError::DeadlineExceeded);
                } else {
                    s.arm_timer(&node);
                }
                AfterCancel { scope: Some(node), slot: idx }
            }
            Err(slot) => {
                if let Slot::Callback(f) = slot {
                    f();
                }
                AfterCancel { scope: Some(node), slot: NO_SLOT }
            }
        }
    }

    /// Unregisters the callback. Returns `true` if this stopped it from running, `false` if it
    /// has run (or is running) already.
    ///
    /// # Examples
    /// ```
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    /// use localsession_core::Context;
    ///
    /// let (ctx, cancel) = Context::background().with_cancel();
    /// let ran = Arc::new(AtomicBool::new(false));
    /// let flag = ran.clone();
    /// let handle = ctx.after_cancel(move || flag.store(true, Ordering::SeqCst));
    /// assert!(handle.stop()); // unregistered before the cancel
    /// cancel.cancel();
    /// assert!(!ran.load(Ordering::SeqCst));
    /// ```
    #[must_use = "tells whether the callback was stopped before it ran"]
    pub fn stop(self) -> bool {
        match (&self.scope, self.slot) {
            (None, _) => true,
            (Some(_), NO_SLOT) => false,
            // SAFETY: only scope nodes are held.
            (Some(node), slot) => unsafe { ScopeNode::from_node(node) }.unregister(slot).is_some(),
        }
    }
}

impl fmt::Debug for AfterCancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AfterCancel").field("registered", &(self.slot != NO_SLOT)).finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Expiry: what a clock's timer fires
// ---------------------------------------------------------------------------------------------

impl Expiry {
    /// Cancels the scope with [`ContextError::DeadlineExceeded`](crate::ContextError) (and every
    /// scope under it), waking its `done()` futures and running its `after_cancel` callbacks on
    /// the calling thread. Does nothing if the scope was cancelled already.
    ///
    /// # Examples
    /// ```
    /// # use std::sync::Mutex;
    /// # use core::time::Duration;
    /// # use localsession_core::{Clock, Context, Expiry, Instant};
    /// # struct Manual(Mutex<Vec<(Duration, Expiry)>>);
    /// # impl Clock for Manual {
    /// #     fn now(&self) -> Duration { Duration::ZERO }
    /// #     fn schedule(&self, at: Duration, expiry: Expiry) { self.0.lock().unwrap().push((at, expiry)); }
    /// # }
    /// # static CLOCK: Manual = Manual(Mutex::new(Vec::new()));
    /// // `CLOCK` reads 0 and queues the expiries it is handed, like the clock of the `Expiry` example.
    ///
    /// let deadline = Instant::from_clock_time(&CLOCK, Duration::from_secs(1));
    /// let (ctx, _cancel) = Context::background().with_deadline(deadline);
    /// let _waiter = ctx.after_cancel(|| {});
    /// let (_, expiry) = CLOCK.0.lock().unwrap().pop().unwrap();
    /// assert!(!ctx.is_done()); // the clock still reads 0
    /// expiry.fire();
    /// assert!(ctx.err().unwrap().is_deadline_exceeded());
    /// ```
    pub fn fire(self) {
        // SAFETY: `scope` is a live scope node (only `ScopeNode::arm_timer` makes an `Expiry`).
        let scope = unsafe { ScopeNode::from_node(&self.scope) };
        scope.cancel(ContextError::DeadlineExceeded);
    }

    /// Whether the scope is already cancelled, so firing would do nothing.
    ///
    /// # Examples
    /// ```
    /// # use std::sync::Mutex;
    /// # use core::time::Duration;
    /// # use localsession_core::{Clock, Context, Expiry, Instant};
    /// # struct Manual(Mutex<Vec<(Duration, Expiry)>>);
    /// # impl Clock for Manual {
    /// #     fn now(&self) -> Duration { Duration::ZERO }
    /// #     fn schedule(&self, at: Duration, expiry: Expiry) { self.0.lock().unwrap().push((at, expiry)); }
    /// # }
    /// # static CLOCK: Manual = Manual(Mutex::new(Vec::new()));
    /// // `CLOCK` reads 0 and queues the expiries it is handed, like the clock of the `Expiry` example.
    ///
    /// let deadline = Instant::from_clock_time(&CLOCK, Duration::from_secs(1));
    /// let (ctx, cancel) = Context::background().with_deadline(deadline);
    /// let _waiter = ctx.after_cancel(|| {});
    /// let (_, expiry) = CLOCK.0.lock().unwrap().pop().unwrap();
    /// assert!(!expiry.is_settled());
    /// cancel.cancel(); // cancelled before its deadline
    /// assert!(expiry.is_settled()); // a timer may drop it now
    /// ```
    #[must_use]
    pub fn is_settled(&self) -> bool {
        // SAFETY: as in `fire`.
        unsafe { ScopeNode::from_node(&self.scope) }.is_cancelled()
    }

    /// A future that resolves when the scope is done (cancelled, or fired): a timer task can
    /// race it against its sleep to release the scope early when it is cancelled before the
    /// deadline.
    ///
    /// # Examples
    /// ```
    /// # use std::sync::Mutex;
    /// # use core::time::Duration;
    /// # use localsession_core::{Clock, Context, Expiry, Instant};
    /// # struct Manual(Mutex<Vec<(Duration, Expiry)>>);
    /// # impl Clock for Manual {
    /// #     fn now(&self) -> Duration { Duration::ZERO }
    /// #     fn schedule(&self, at: Duration, expiry: Expiry) { self.0.lock().unwrap().push((at, expiry)); }
    /// # }
    /// # static CLOCK: Manual = Manual(Mutex::new(Vec::new()));
    /// // `CLOCK` reads 0 and queues the expiries it is handed, like the clock of the `Expiry` example.
    ///
    /// let deadline = Instant::from_clock_time(&CLOCK, Duration::from_secs(1));
    /// let (ctx, cancel) = Context::background().with_deadline(deadline);
    /// let _waiter = ctx.after_cancel(|| {});
    /// let (_, expiry) = CLOCK.0.lock().unwrap().pop().unwrap();
    /// let settled = expiry.settled();
    /// cancel.cancel();
    /// futures::executor::block_on(settled); // resolves before the deadline: stop the timer early
    /// assert!(expiry.is_settled());
    /// ```
    pub fn settled(&self) -> Done {
        Done::new(Some(self.scope.clone()))
    }

    /// The deadline this expiry is for.
    ///
    /// # Examples
    /// ```
    /// # use std::sync::Mutex;
    /// # use core::time::Duration;
    /// # use localsession_core::{Clock, Context, Expiry, Instant};
    /// # struct Manual(Mutex<Vec<(Duration, Expiry)>>);
    /// # impl Clock for Manual {
    /// #     fn now(&self) -> Duration { Duration::ZERO }
    /// #     fn schedule(&self, at: Duration, expiry: Expiry) { self.0.lock().unwrap().push((at, expiry)); }
    /// # }
    /// # static CLOCK: Manual = Manual(Mutex::new(Vec::new()));
    /// // `CLOCK` reads 0 and queues the expiries it is handed, like the clock of the `Expiry` example.
    ///
    /// let deadline = Instant::from_clock_time(&CLOCK, Duration::from_secs(1));
    /// let (ctx, _cancel) = Context::background().with_deadline(deadline);
    /// let _waiter = ctx.after_cancel(|| {});
    /// let (at, expiry) = CLOCK.0.lock().unwrap().pop().unwrap();
    /// assert_eq!(expiry.deadline(), Some(deadline));
    /// assert_eq!(at, deadline.since_origin());
    /// ```
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        // SAFETY: as in `fire`.
        unsafe { ScopeNode::from_node(&self.scope) }.deadline()
    }
}

impl fmt::Debug for Expiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Expiry").field("deadline", &self.deadline()).finish()
    }
}
