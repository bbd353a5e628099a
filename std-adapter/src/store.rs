//! The thread-local [`ContextStore`]: one [`LocalSlot`] per OS thread.
//!
//! Reading is a thread-local access, one relaxed load of a "was anything ever bound" flag (the
//! fast path of tracing-core's `SCOPED_COUNT`: a process that never binds skips the
//! thread-local entirely), one acquire load of the manager generation, and a borrow of the
//! slot — no lock, no atomic read-modify-write, no clone.
//!
//! # Generations
//!
//! [`reset_default_manager`](crate::reset_default_manager) must make every earlier binding
//! disappear, on every thread, safely while other threads bind and read. Each slot remembers
//! the generation it was bound in; a reset bumps the global generation (one atomic add), and a
//! slot whose generation is stale reads as empty and is cleared the next time its thread
//! touches it. A bind that races with a reset lands in one generation or the other, never in a
//! torn state.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use localsession_core::{AnySession, BindError, Context, ContextError, ContextStore, LocalSlot, SessionCtx};

/// The generation of the default manager; bumped by `reset_default_manager`.
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Whether any thread ever bound a session (a process that never binds skips TLS on reads).
static EVER_BOUND: AtomicBool = AtomicBool::new(false);

struct ThreadSlot {
    slot: LocalSlot,
    generation: Cell<u64>,
    /// The running unit that keeps its own record of its binding (see [`BindSink`]).
    sink: Cell<Option<BindSink>>,
    /// 0 when the binding belongs to the thread; otherwise the task (see [`register_task_probe`])
    /// that bound it, on a runtime without hooks: only that task sees it.
    owner: Cell<u64>,
    /// Sessions an exchange displaced that must be dropped outside the thread-local access
    /// (what the unit's record held; a binding from before a reset). Parked here rather than
    /// returned through `try_with`: moving session handles by value out of the closure costs
    /// store-forwarding stalls on the hot path, and these are almost always empty.
    leftover_recorded: Cell<Option<AnySession>>,
    leftover_stale: Cell<Option<AnySession>>,
    /// What a scope closing over a reset would have restored (saved before the reset).
    leftover_outdated: Cell<Option<AnySession>>,
}

impl ThreadSlot {
    /// Whether the slot was bound in the current generation (no reset since). Acquire: pairs
    /// with the reset's bump, ordering it before anything the resetting thread did afterwards.
    #[inline]
    fn is_current(&self) -> bool {
        self.generation.get() == GENERATION.load(Ordering::Acquire)
    }

    /// Whether a read can take the slot as it is: current generation, and the binding belongs
    /// to the thread (no task tag to check against the running task).
    #[inline]
    fn readable_as_is(&self) -> bool {
        self.is_current() && self.owner.get() == 0
    }
}

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        // The thread ends with a session bound: it is released with the slot.
        crate::live::on_unbind(self.slot.is_set());
    }
}

thread_local! {
    static SLOT: ThreadSlot =
        const {
        ThreadSlot {
            slot: LocalSlot::new(),
            generation: Cell::new(0),
            sink: Cell::new(None),
            owner: Cell::new(0),
            leftover_recorded: Cell::new(None),
            leftover_stale: Cell::new(None),
            leftover_outdated: Cell::new(None),
        }
    };
}

/// Where the bindings of a running unit are recorded besides the thread's slot (see
/// [`ThreadStore::set_bind_sink`]).
///
/// `record(unit, session)` stores a clone of `session` (or `None`) as the unit's binding and
/// returns what the record held before, which the store drops after the slot was updated. It
/// runs inside every binding change of the thread, so it must be quick, must not panic, and
/// must not bind or unbind itself.
///
/// # Examples
/// ```
/// use localsession_core::AnySession;
/// use localsession_std::BindSink;
/// fn forget(_unit: u64, _session: Option<&AnySession>) -> Option<AnySession> { None }
/// let sink = BindSink { unit: 42, record: forget };
/// assert_eq!(sink.unit, 42);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct BindSink {
    /// The unit (for example a task id) passed back to `record`.
    pub unit: u64,
    /// Records the unit's new binding; returns the one it replaces.
    pub record: fn(u64, Option<&AnySession>) -> Option<AnySession>,
}

/// The thread-local store: "the current session" of each OS thread.
///
/// Registered as the process-wide default store by
/// [`init_default_manager`](crate::init_default_manager) (and on first use of this crate's
/// binding functions if no store is registered), so `localsession_core::current()` sees it.
/// The tokio and async-std adapters install a task's session into this store around each poll.
///
/// # Examples
/// ```
/// use localsession_core::{Context, ContextStore, SessionCtx};
/// use localsession_std::THREAD_STORE;
///
/// let s = SessionCtx::new(&Context::background());
/// THREAD_STORE.replace(Some(s.into())).unwrap();
/// THREAD_STORE.with_current(&mut |cur| assert!(cur.is_some()));
/// THREAD_STORE.replace(None).unwrap();
/// ```
#[derive(Debug)]
pub struct ThreadStore(());

/// The one [`ThreadStore`].
///
/// # Examples
/// ```
/// use localsession_core::{bind, current, SessionMap};
/// use localsession_std::{default_manager_options, init_default_manager, THREAD_STORE};
///
/// init_default_manager(default_manager_options()).unwrap();
/// // The core's free functions now act on this thread's slot:
/// bind(SessionMap::new()).unwrap();
/// assert!(THREAD_STORE.with(|s| s.is_some()));
/// assert!(current().is_some());
/// ```
pub static THREAD_STORE: ThreadStore = ThreadStore(());

impl ThreadStore {
    /// Calls `f` with this thread's session, borrowed (see [`with_current`](crate::with_current)).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{scope, THREAD_STORE};
    ///
    /// assert!(THREAD_STORE.with(|s| s.is_none()));
    /// let map = SessionMap::new().with_value("n", 1u8);
    /// let n = scope(map, || THREAD_STORE.with(|s| s.and_then(|s| s.value_cloned::<u8, _>(&"n"))));
    /// assert_eq!(n, Some(1));
    /// ```
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(Option<&AnySession>) -> R) -> R {
        // Relaxed: only a hint; a thread always sees its own binds, and another thread's binds
        // cannot be in this thread's slot.
        if !EVER_BOUND.load(Ordering::Relaxed) {
            return f(None);
        }
        let mut f = Some(f);
        // The common case: a slot of the current generation that belongs to the thread.
        let fast = SLOT
            .try_with(|t| if t.readable_as_is() { Some(t.slot.with(f.take().expect("called once"))) } else { None });
        match fast {
            Ok(Some(r)) => r,
            Ok(None) => self.with_checked(f.take().expect("not called on the slow path")),
            // The thread is being torn down: nothing is bound any more.
            Err(_) => (f.take().expect("not consumed on error"))(None),
        }
    }

    /// [`with`](ThreadStore::with) for a stale slot (a reset happened since it was bound) or a
    /// binding tagged with a task.
    #[cold]
    fn with_checked<R>(&self, f: impl FnOnce(Option<&AnySession>) -> R) -> R {
        let mut f = Some(f);
        let out = SLOT.try_with(|t| {
            // Acquire: as in `with`.
            let generation = GENERATION.load(Ordering::Acquire);
            let (mut stale, mut recorded) = (None, None);
            if t.generation.get() != generation && t.slot.with(survives_resets) {
                // The shared workers' session is no request's: a reset does not end it.
                t.generation.set(generation);
            } else if t.generation.get() != generation {
                // Dropped after the read, outside the thread-local access (its drop may use the
                // store).
                stale = t.slot.replace(None);
                t.generation.set(generation);
                crate::live::on_unbind(stale.is_some());
                // The running unit's record must not keep what the reset ended either: its next
                // poll would install it again.
                if stale.is_some()
                    && let Some(sink) = own_sink(t)
                {
                    recorded = (sink.record)(sink.unit, None);
                }
            }
            let f = f.take().expect("called once");
            let owner = t.owner.get();
            if owner != 0 && owner != running_task() {
                // Bound by another task of a runtime without hooks: not this unit's session.
                return (f(None), (stale, recorded));
            }
            (t.slot.with(f), (stale, recorded))
        });
        match out {
            Ok((r, stale)) => {
                drop(stale);
                r
            }
            // The thread is being torn down: nothing is bound any more.
            Err(_) => (f.take().expect("not consumed on error"))(None),
        }
    }

    /// A clone of this thread's session (what [`current`](crate::current) returns), as
    /// `self.with(|s| s.cloned())`. The common case — a slot of the current generation that
    /// belongs to the thread — clones straight out of the slot ([`LocalSlot::cloned`]: no
    /// reader frame, nothing moved through the thread-local access but the result); a stale or
    /// task-owned slot takes the checked path of [`with`](ThreadStore::with).
    #[inline]
    pub(crate) fn cloned(&self) -> Option<AnySession> {
        // Relaxed: as in `with`.
        if !EVER_BOUND.load(Ordering::Relaxed) {
            return None;
        }
        let fast = SLOT.try_with(|t| if t.readable_as_is() { Ok(t.slot.cloned()) } else { Err(()) });
        match fast {
            Ok(Ok(session)) => session,
            Ok(Err(())) => self.with_checked(|s| s.cloned()),
            // The thread is being torn down: nothing is bound any more.
            Err(_) => None,
        }
    }

    /// Binds `session` (or clears with `None`) on this thread; returns the previous binding.
    /// Returns `Err` only during thread teardown, with the session.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::THREAD_STORE;
    ///
    /// let map = SessionMap::new();
    /// assert!(THREAD_STORE.swap(Some(map.clone().into())).unwrap().is_none());
    /// let previous = THREAD_STORE.swap(None).unwrap().unwrap();
    /// assert!(previous.as_map().unwrap().ptr_eq(&map));
    /// ```
    #[inline]
    pub fn swap(&self, session: Option<AnySession>) -> Result<Option<AnySession>, BindError> {
        let mut session = session;
        if self.swap_in_place(&mut session) {
            Ok(session)
        } else {
            Err(BindError::new(session, "the thread is being torn down (thread-local storage is gone)"))
        }
    }

    /// Exchanges this thread's binding with `*session` in place (what `WithSession` does around
    /// each poll). Returns `false` — leaving `*session` untouched — during thread teardown.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, THREAD_STORE};
    ///
    /// let mut session = Some(SessionMap::new().into());
    /// assert!(THREAD_STORE.swap_in_place(&mut session));
    /// assert!(session.is_none() && current().is_some());
    /// assert!(THREAD_STORE.swap_in_place(&mut session)); // and back
    /// assert!(session.is_some() && current().is_none());
    /// ```
    #[inline]
    pub fn swap_in_place(&self, session: &mut Option<AnySession>) -> bool {
        self.exchange(session, Owner::Sticky).is_some()
    }

    /// [`ContextStore::enter_scope`] on this thread: installs `*session` for a scope and returns
    /// the token that [`exit_scope_in_place`](ThreadStore::exit_scope_in_place) needs (`None`
    /// during thread teardown). The scope's session is visible to whatever runs on the thread
    /// during the scope; the token keeps the tag of the binding it replaced.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, THREAD_STORE};
    /// let mut s = Some(SessionMap::new().into());
    /// let token = THREAD_STORE.enter_scope_in_place(&mut s).unwrap();
    /// assert!(current().is_some());
    /// THREAD_STORE.exit_scope_in_place(&mut s, token);
    /// assert!(current().is_none() && s.is_some());
    /// ```
    #[inline]
    pub fn enter_scope_in_place(&self, session: &mut Option<AnySession>) -> Option<u64> {
        self.exchange(session, Owner::Scope)
    }

    /// Closes a scope opened by [`enter_scope_in_place`](ThreadStore::enter_scope_in_place).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, THREAD_STORE};
    /// let mut s = Some(SessionMap::new().into());
    /// let token = THREAD_STORE.enter_scope_in_place(&mut s).unwrap();
    /// THREAD_STORE.exit_scope_in_place(&mut s, token);
    /// assert!(current().is_none());
    /// ```
    #[inline]
    pub fn exit_scope_in_place(&self, session: &mut Option<AnySession>, token: u64) {
        self.exchange(session, Owner::Restore(token));
    }

    /// Exchanges the slot with `*session`, records the change in the unit's sink, and sets the
    /// binding's owner tag by `rule`. Returns the previous owner tag (`None` during teardown).
    #[inline]
    fn exchange(&self, session: &mut Option<AnySession>, rule: Owner) -> Option<u64> {
        mark_bound(session);
        let (owner, parked) = SLOT.try_with(|t| exchange_in(t, session, rule)).ok()?;
        if parked {
            // Dropped here, outside the thread-local access (a drop may use the store).
            drop_leftovers();
        }
        Some(owner)
    }

    /// For executors whose hooks install a task around each poll (the tokio adapter's implicit
    /// mode): in one thread-local access, suspends the running unit's [`BindSink`], installs
    /// `*session` as in [`enter_scope_in_place`](ThreadStore::enter_scope_in_place) (`*session`
    /// then holds what the slot held), and makes `sink` record the unit's later bindings.
    /// Returns the scope to pass to [`exit_unit`](ThreadStore::exit_unit) and a binding from
    /// before a [`reset_default_manager`](crate::reset_default_manager), which the caller drops
    /// where a panicking `Drop` is harmless; `None` during thread teardown (nothing changed).
    ///
    /// `read_at` is [`ContextStore::generation`] loaded *before* `*session` was read from the
    /// unit's record: if a reset ran in between, the session is from before it, and it reads as
    /// empty from the unit's first read on (and leaves the record at its first read or bind).
    /// Only bindings of the unit itself reach `sink`: a task of another executor that runs
    /// inside the unit's poll (a plain `LocalSet` task driven from `block_in_place`, say) and
    /// binds is tagged with its own task, as on a runtime without hooks, when a
    /// [task probe](crate::register_task_probe) names it.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{AnySession, ContextStore, SessionMap};
    /// use localsession_std::{bind, current, BindSink, THREAD_STORE};
    ///
    /// fn record(_unit: u64, _s: Option<&AnySession>) -> Option<AnySession> { None }
    /// let read_at = THREAD_STORE.generation(); // before reading the task's record
    /// let mut task_session = Some(SessionMap::new().with_value("task", 1u8).into());
    /// let (scope, stale) = THREAD_STORE.enter_unit(&mut task_session, read_at, BindSink { unit: 7, record }).unwrap();
    /// assert!(stale.is_none() && task_session.is_none()); // the thread had nothing bound
    /// assert!(current().is_some()); // the poll runs with the task's session
    /// let stale = THREAD_STORE.exit_unit(&mut task_session, scope);
    /// assert!(stale.is_none() && task_session.is_some() && current().is_none());
    /// ```
    pub fn enter_unit(
        &self,
        session: &mut Option<AnySession>,
        read_at: u64,
        sink: BindSink,
    ) -> Option<(UnitScope, Option<AnySession>)> {
        mark_bound(session);
        let (scope, parked) = SLOT
            .try_with(|t| {
                let outer_sink = t.sink.replace(None);
                let (token, parked) = exchange_in(t, session, Owner::Scope);
                // The generation the slot is now in (the exchange brought it up to date).
                let generation = t.generation.get();
                if generation != read_at && !t.slot.with(survives_resets) {
                    // A reset ran after the unit's session was read from its record: the
                    // session is from before it. Stamped with that older generation, it reads
                    // as empty and leaves the slot (and, through the sink, the record) at the
                    // unit's first read or bind, or at `exit_unit`.
                    t.generation.set(read_at);
                }
                t.sink.set(Some(sink));
                (UnitScope { token, outer_sink, generation }, parked)
            })
            .ok()?;
        // No sink was set during the exchange: nothing was recorded, only a stale binding (a
        // scope opens: nothing is restored, so nothing outdated).
        let stale = if parked { take_leftovers().1 } else { None };
        Some((scope, stale))
    }

    /// Closes a unit's scope opened by [`enter_unit`](ThreadStore::enter_unit): stops its sink,
    /// exchanges the slot with `*session` (what the thread held before), and restores the outer
    /// unit's sink (nested polls). Returns a binding from before a reset, for the caller to drop.
    ///
    /// # Examples
    /// See [`enter_unit`](ThreadStore::enter_unit).
    pub fn exit_unit(&self, session: &mut Option<AnySession>, scope: UnitScope) -> Option<AnySession> {
        // Acquire: as in `with`. A reset during the unit: what the thread held before it is
        // from the old generation and is not restored (as `EnterGuard` and `WithSession` do).
        let outdated = if GENERATION.load(Ordering::Acquire) == scope.generation || survives_resets(session.as_ref()) {
            None
        } else {
            session.take()
        };
        let parked = SLOT
            .try_with(|t| {
                t.sink.set(None);
                let (_, parked) = exchange_in(t, session, Owner::Restore(scope.token));
                t.sink.set(scope.outer_sink);
                parked
            })
            .ok()?;
        if !parked && outdated.is_none() {
            // The common case: nothing from before a reset on either side.
            return None;
        }
        let (stale, late_outdated) = if parked {
            let (_, stale, late_outdated) = take_leftovers();
            (stale, late_outdated)
        } else {
            (None, None)
        };
        // A reset between the generation check above and the exchange: the exchange did not
        // restore what the thread held before the unit either.
        let outdated = outdated.or(late_outdated);
        if outdated.is_none() {
            return stale;
        }
        // At most one of the two is set besides `outdated`: a parked (stale) slot leaves
        // `*session` empty. Both go back to the caller to drop.
        if session.is_none() {
            *session = stale;
        } else {
            debug_assert!(stale.is_none(), "a parked slot leaves the exchanged session empty");
        }
        outdated
    }

    /// Makes every later change of this thread's binding (by [`bind`](crate::bind),
    /// [`unbind`](crate::unbind), an [`enter`](crate::enter) guard, a `WithSession` poll, ...)
    /// also reach `sink` — or stops that with `None` — and returns the sink that was set.
    ///
    /// For executors that keep each task's binding in a record of their own and install it in
    /// the polling thread around each poll (the tokio adapter's implicit mode): set the task's
    /// sink after installing its session in the before-poll hook, and clear it (restoring the
    /// one returned, for nested polls) before swapping the session back out in the after-poll
    /// hook. The task's bindings then reach its record *when they are made*, so the next poll,
    /// on whichever thread, sees them — whatever order the after-poll hook runs in.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Mutex;
    /// use localsession_core::{AnySession, SessionMap};
    /// use localsession_std::{bind, unbind, BindSink, THREAD_STORE};
    ///
    /// static RECORD: Mutex<Option<AnySession>> = Mutex::new(None);
    /// fn record(_unit: u64, s: Option<&AnySession>) -> Option<AnySession> {
    ///     std::mem::replace(&mut *RECORD.lock().unwrap(), s.cloned())
    /// }
    ///
    /// let outer = THREAD_STORE.set_bind_sink(Some(BindSink { unit: 1, record }));
    /// bind(SessionMap::new().with_value("k", 1u8)).unwrap();
    /// assert!(RECORD.lock().unwrap().is_some()); // the record saw the bind
    /// THREAD_STORE.set_bind_sink(outer);
    /// unbind(); // no sink any more: the record keeps the task's binding
    /// assert!(RECORD.lock().unwrap().is_some());
    /// ```
    pub fn set_bind_sink(&self, sink: Option<BindSink>) -> Option<BindSink> {
        SLOT.try_with(|t| t.sink.replace(sink)).ok().flatten()
    }
}

impl ContextStore for ThreadStore {
    #[inline]
    fn with_current(&self, f: &mut dyn FnMut(Option<&AnySession>)) {
        self.with(f);
    }

    fn replace(&self, session: Option<AnySession>) -> Result<Option<AnySession>, BindError> {
        ThreadStore::swap(self, session)
    }

    #[inline]
    fn swap(&self, session: &mut Option<AnySession>) -> bool {
        self.swap_in_place(session)
    }

    #[inline]
    fn enter_scope(&self, session: &mut Option<AnySession>) -> Option<u64> {
        self.enter_scope_in_place(session)
    }

    #[inline]
    fn exit_scope(&self, session: &mut Option<AnySession>, token: u64) {
        self.exit_scope_in_place(session, token);
    }

    #[inline]
    fn generation(&self) -> u64 {
        // Acquire: as in `with`.
        GENERATION.load(Ordering::Acquire)
    }

    /// The shared workers' marker ([`shared_worker_session`]) is no request's session: no reset
    /// ends it.
    fn survives_reset(&self, session: &AnySession) -> bool {
        survives_resets(Some(session))
    }
}

/// The scope of a unit opened by [`ThreadStore::enter_unit`]. `!Send`: it belongs to the
/// thread that opened it.
///
/// # Examples
/// See [`ThreadStore::enter_unit`].
#[derive(Debug)]
#[must_use = "close the unit's scope with ThreadStore::exit_unit"]
pub struct UnitScope {
    token: u64,
    outer_sink: Option<BindSink>,
    /// The generation the unit's scope was opened in.
    generation: u64,
}

/// Drops the sessions the last exchange parked: out of line, so that the exchange itself
/// carries no drop code (and the register saves it needs).
#[cold]
#[inline(never)]
fn drop_leftovers() {
    drop(take_leftovers());
}

/// Takes the sessions the last exchange parked (see `ThreadSlot::leftover_recorded`).
#[cold]
fn take_leftovers() -> (Option<AnySession>, Option<AnySession>, Option<AnySession>) {
    SLOT.try_with(|t| (t.leftover_recorded.take(), t.leftover_stale.take(), t.leftover_outdated.take()))
        .unwrap_or((None, None, None))
}

#[inline]
fn mark_bound(session: &Option<AnySession>) {
    if session.is_some() && !EVER_BOUND.load(Ordering::Relaxed) {
        EVER_BOUND.store(true, Ordering::Relaxed);
    }
}

/// Exchanges `t`'s slot with `*session`, records the change in the unit's sink, and sets the
/// binding's owner tag by `rule`. Returns the previous owner tag and whether sessions were
/// parked for [`take_leftovers`].
///
/// The common case — no sink set (every `WithSession` poll, and a hooked task's own poll
/// swap, which suspends its sink first) and a slot of the current generation — is the inline
/// fast path: a swap and the owner tag. Everything else takes [`exchange_slow`]; keeping
/// its calls (sink, parking, task probe) out of line spares every exchange the register
/// saves they need (a third of an exchange's instructions).
#[inline]
fn exchange_in(t: &ThreadSlot, session: &mut Option<AnySession>, rule: Owner) -> (u64, bool) {
    if !t.is_current() || t.sink.get().is_some() {
        return exchange_slow(t, session, rule);
    }
    crate::live::on_bind(session.is_some());
    t.slot.swap(session);
    crate::live::on_unbind(session.is_some());
    let owner = match rule {
        // No sink manages the unit: a sticky binding belongs to the running task.
        Owner::Sticky => running_task(),
        Owner::Scope => 0,
        Owner::Restore(token) => token,
    };
    (t.owner.replace(owner), false)
}

/// [`exchange_in`] with a sink to record in or a stale slot to clear.
#[cold]
#[inline(never)]
fn exchange_slow(t: &ThreadSlot, session: &mut Option<AnySession>, rule: Owner) -> (u64, bool) {
    let generation = GENERATION.load(Ordering::Acquire);
    let stale = t.generation.get() != generation;
    t.generation.set(generation);
    let mut parked = false;
    // A scope that closes over a reset: the slot was last set when the scope opened, before
    // the reset, and so was what the scope saved to restore. It is not restored (the slot is
    // left empty, and a sink records nothing for it). The closing guard's own generation check
    // cannot catch this alone: a reset may land between that check and this exchange, and the
    // exchange re-stamps the slot with the new generation (it restored a pre-reset binding,
    // visible after the reset had returned).
    if stale
        && matches!(rule, Owner::Restore(_))
        && !survives_resets(session.as_ref())
        && let Some(old) = session.take()
    {
        park(&t.leftover_outdated, old);
        parked = true;
    }
    // The sink records the bindings of the unit it was set for, not of another unit that runs
    // inside that unit's poll without hooks of its own (a plain task of a `LocalSet` or of a
    // runtime without hooks, driven from `block_in_place`): those are tagged with their task,
    // as on a runtime without hooks, and never reach the hooked unit's record.
    let sink = own_sink(t);
    // While the unit's sink is set the record equals the slot whenever the slot belongs to the
    // unit (every such change passes here), so a swap that installs what the slot already
    // holds — a scope or a `WithSession` poll restoring the unit's own session — needs no
    // record. A scope of the unit that closes over another task's binding (that task bound
    // inside the unit's poll, then the unit opened a scope) brings that binding back tagged
    // with its task: the unit reads nothing, and its record gets nothing — never the other
    // task's session. (What the unit had before that task bound is not kept: the one case in
    // which a unit loses its own binding, for a task of another executor that binds inside it.)
    let restores_foreign = matches!(rule, Owner::Restore(token) if token != 0);
    if let Some(sink) = sink
        && !(!restores_foreign && t.owner.get() == 0 && t.slot.with(|cur| same(cur, session.as_ref())))
    {
        if let Some(old) = (sink.record)(sink.unit, if restores_foreign { None } else { session.as_ref() }) {
            park(&t.leftover_recorded, old);
            parked = true;
        }
        // A reset that bumped the generation since this exchange read it may have cleared the
        // unit's record before this record landed (its hooks clear records before and again
        // after the bump): take it back. Either the reset's second clear comes after this
        // record in the shard's lock order and clears it, or it came first — then the bump,
        // before it, happens-before this load, which sees it.
        if GENERATION.load(Ordering::Acquire) != generation
            && !survives_resets(session.as_ref())
            && let Some(undone) = (sink.record)(sink.unit, None)
        {
            park(&t.leftover_outdated, undone);
            parked = true;
        }
    }
    crate::live::on_bind(session.is_some());
    t.slot.swap(session);
    crate::live::on_unbind(session.is_some());
    let owner = match rule {
        // A unit with a sink (a hooked task) is swapped out by its hooks: the binding needs no
        // tag. Otherwise a binding made inside a task belongs to that task.
        Owner::Sticky if sink.is_some() => 0,
        Owner::Sticky => running_task(),
        Owner::Scope => 0,
        Owner::Restore(token) => token,
    };
    if stale
        && !survives_resets(session.as_ref())
        && let Some(old) = session.take()
    {
        // A binding from before a reset is not handed back.
        park(&t.leftover_stale, old);
        parked = true;
    }
    (t.owner.replace(owner), parked)
}

/// Parks `session` in `cell`. A cell still holding a session (its taker was skipped during a
/// reentrant exchange) gets the newer one; the older is dropped here, which is still outside
/// any borrow of the slot.
#[cold]
fn park(cell: &Cell<Option<AnySession>>, session: AnySession) {
    drop(cell.replace(Some(session)));
}

/// How an exchange sets the slot's owner tag.
#[derive(Clone, Copy)]
enum Owner {
    /// A sticky `bind`/`unbind`: the running task's, unless a sink manages the unit.
    Sticky,
    /// A scope opens: visible to whatever runs on the thread during it.
    Scope,
    /// A scope closes: the tag from before it.
    Restore(u64),
}

/// The shared workers' session (see [`shared_worker_session`]).
static SHARED_WORKER: OnceLock<AnySession> = OnceLock::new();

/// The session of a *shared worker*: a unit that serves every later caller (the worker of a
/// `tower::buffer::Buffer`, say), which must carry no request's identity and must not fall back
/// to "no session" either. It is ended from the start — [`is_valid`](AnySession::is_valid) is
/// `false` and [`err`](AnySession::err) names the cause — so a client layer in such a unit
/// refuses to send instead of sending one request's identity (or none, silently), and the
/// bridges enter nothing for it. One process-wide value; unlike any other binding, a
/// [`reset_default_manager`](crate::reset_default_manager) does not end it (it is no request's
/// session): a thread that holds it still holds it after a reset. The tokio adapter's implicit
/// mode gives it to tasks spawned at known shared-worker sites.
///
/// # Examples
/// ```
/// use localsession_std::{bind, current, is_shared_worker_session, shared_worker_session, unbind};
/// let marker = shared_worker_session();
/// assert!(!marker.is_valid());
/// assert!(marker.err().unwrap().to_string().contains("shared worker"));
/// bind(marker.clone()).unwrap();
/// assert!(current().is_some_and(|s| is_shared_worker_session(&s)));
/// unbind();
/// ```
#[must_use]
pub fn shared_worker_session() -> AnySession {
    SHARED_WORKER
        .get_or_init(|| {
            let (ctx, cancel) = Context::background().with_cancel();
            cancel.cancel_with_cause(ContextError::cause(SharedWorker));
            SessionCtx::new(&ctx).into()
        })
        .clone()
}

/// Whether `session` is [`shared_worker_session`] (compared by identity).
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_std::{is_shared_worker_session, shared_worker_session};
/// assert!(is_shared_worker_session(&shared_worker_session()));
/// assert!(!is_shared_worker_session(&SessionMap::new().into()));
/// ```
#[must_use]
pub fn is_shared_worker_session(session: &AnySession) -> bool {
    SHARED_WORKER.get().is_some_and(|marker| marker.ptr_eq(session))
}

/// Whether a binding outlives `reset_default_manager` (the one rule every stale-slot path of
/// this store and [`ContextStore::survives_reset`] follow): only the shared workers' marker.
#[inline]
fn survives_resets(session: Option<&AnySession>) -> bool {
    session.is_some_and(is_shared_worker_session)
}

/// The cause in [`shared_worker_session`].
#[derive(Debug)]
struct SharedWorker;

impl std::fmt::Display for SharedWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "this task is a shared worker (spawned where it serves every later caller, such as the \
             worker of a tower::buffer::Buffer built inside a request), so it carries no request's \
             session",
        )
    }
}

impl std::error::Error for SharedWorker {}

static TASK_PROBE: OnceLock<fn() -> u64> = OnceLock::new();

/// Registers the function that tells which task of an executor runs on the calling thread
/// (a non-zero id, unique process-wide) or 0 outside any task. The first registration wins;
/// returns whether this one did (a second registration of the same function also counts).
///
/// With a probe registered, a sticky [`bind`](crate::bind)/[`unbind`](crate::unbind) made
/// inside a task that no hook or [`BindSink`] manages — a plain task on a tokio runtime built
/// without the implicit hooks — is *contained*: it is tagged with that task, and
/// [`current`](crate::current) on the same thread returns `None` to every other task, to the
/// runtime's `block_on` future and to the thread after the runtime is gone. Such a binding is
/// the task's only until another task on that worker binds, or the task moves to another
/// worker: for a session that lasts the task's life, spawn it with one
/// (`localsession_tokio::spawn_with`, `FutureExt::with_session`) or use implicit mode.
/// `localsession_tokio::init` and the tokio adapter's spawn helpers register tokio's probe.
///
/// # Examples
/// ```
/// fn no_tasks_here() -> u64 { 0 }
/// // A thread outside any task: bindings stay the thread's.
/// let _ = localsession_std::register_task_probe(no_tasks_here);
/// ```
pub fn register_task_probe(probe: fn() -> u64) -> bool {
    let registered = *TASK_PROBE.get_or_init(|| probe);
    core::ptr::fn_addr_eq(registered, probe)
}

/// The task running on this thread (0: none, or no probe registered).
#[inline]
fn running_task() -> u64 {
    TASK_PROBE.get().map_or(0, |probe| probe())
}

/// The thread's bind sink if it belongs to the unit running now: the probe names no task (no
/// probe, or outside any task) or names the sink's unit. `None` when a different task runs
/// inside the sink's unit (see `exchange_slow`).
#[inline]
fn own_sink(t: &ThreadSlot) -> Option<BindSink> {
    let sink = t.sink.get()?;
    let running = running_task();
    (running == 0 || running == sink.unit).then_some(sink)
}

fn same(a: Option<&AnySession>, b: Option<&AnySession>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.ptr_eq(b),
        (None, None) => true,
        _ => false,
    }
}

/// What [`reset_default_manager`](crate::reset_default_manager) runs before it invalidates the
/// bindings (see [`register_reset_hook`]).
static RESET_HOOKS: std::sync::Mutex<Vec<fn()>> = std::sync::Mutex::new(Vec::new());

/// Registers `hook` to run in every [`reset_default_manager`](crate::reset_default_manager),
/// on the resetting thread, twice: before the bindings made so far are invalidated, and again
/// right after (so a hook must be idempotent); returns whether it was new (registering the
/// same function twice runs it once per pass).
///
/// For executors that keep sessions outside the thread slots — the tokio adapter's implicit
/// mode keeps each task's session in a table and clears it here, so that an idle task does
/// not get its pre-reset session back at its next poll. The second pass clears what a unit
/// recorded in between (a scope closing while the reset ran, restoring a pre-reset session).
/// Hooks run in registration order, under no lock of this crate; a hook must not call
/// `reset_default_manager` itself.
///
/// # Examples
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use localsession_std::{register_reset_hook, reset_default_manager, ManagerOptions};
///
/// static RESETS: AtomicUsize = AtomicUsize::new(0);
/// fn count() { RESETS.fetch_add(1, Ordering::Relaxed); }
/// assert!(register_reset_hook(count));
/// assert!(!register_reset_hook(count)); // once
/// reset_default_manager(ManagerOptions::default()).unwrap();
/// assert_eq!(RESETS.load(Ordering::Relaxed), 2); // before and after the invalidation
/// ```
pub fn register_reset_hook(hook: fn()) -> bool {
    let mut hooks = RESET_HOOKS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if hooks.iter().any(|h| core::ptr::fn_addr_eq(*h, hook)) {
        return false;
    }
    hooks.push(hook);
    true
}

/// Runs the [reset hooks](register_reset_hook), outside their list's lock.
pub(crate) fn run_reset_hooks() {
    let hooks = RESET_HOOKS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    for hook in hooks {
        hook();
    }
}

/// Invalidates every binding made before, on every thread (see the module docs).
pub(crate) fn bump_generation() {
    // Release: bindings made after the reset (with the new generation) are ordered after it.
    GENERATION.fetch_add(1, Ordering::AcqRel);
}
