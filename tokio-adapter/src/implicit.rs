//! Implicit inheritance (requires `--cfg tokio_unstable`): a plain `tokio::spawn` — also from
//! library code you do not control — inherits the spawner's session.
//!
//! Go had to drop its `EnableImplicitlyTransmitAsync` (it relied on pprof labels); tokio's task
//! hooks make it possible here. [`enable_implicit_sessions`] (or [`ImplicitSessions`], which
//! also chains hooks of your own) installs four hooks on a runtime builder. Each task's session
//! lives in a [`TaskTable`] keyed by task id, whose docs state the protocol's three
//! rules; this is how the hooks follow them.
//!
//! | hook | runs on, when | does |
//! |---|---|---|
//! | `on_task_spawn` | the spawning thread, after the task is bound to the runtime, before it is scheduled | creates the task's entry with the spawner's [`flow_session`](localsession_std::flow_session) |
//! | `on_before_task_poll` | the polling worker, before the poll | clones the entry's session into the worker's slot, keeping what the slot held in a per-thread frame stack, and points the thread's [`BindSink`] at the entry |
//! | (the task binds) | inside the poll | the sink replaces the entry's session *at bind time* ([`TaskTable::rebind`]) |
//! | `on_after_task_poll` | the polling worker, after the task went idle again — possibly after another worker already started its next poll | restores the outer sink and the slot's previous content; never touches the table |
//! | `on_task_terminate` | where the task ends: inside its final poll, or where it is cancelled | removes the entry (or leaves a tombstone) |
//!
//! Why no interleaving loses or resurrects an entry, or serves a stale session:
//! - A task's bindings reach its entry while the poll runs, and tokio orders a task's polls (its
//!   `RUNNING` bit, acquire/release), so the next poll's before-poll hook — on any worker —
//!   reads the latest binding. The after-poll hook writes nothing to the table, so running it
//!   late cannot overwrite a newer binding or re-insert an ended task.
//! - Entries are created only by the spawn hook and removed only by the terminate hook, which
//!   tokio runs exactly once per spawned task; a terminate that comes first (spawn on a runtime
//!   that is shutting down) leaves a tombstone that the spawn consumes.
//! - Polls nest on one thread (`block_in_place` plus an inner runtime's `block_on`): each
//!   before-poll pushes a frame (the slot's previous session and the outer sink) and each
//!   after-poll pops it, so the outer task gets its own session and sink back.
//! - The sink records only the bindings of the task it was set for: a task of an executor
//!   without these hooks that runs inside the poll (a plain `LocalSet` task, or a task of a
//!   runtime built without them, driven from `block_in_place`) and binds is tagged with its own
//!   task id, as on a runtime without hooks, and never reaches the hooked task's entry (it did
//!   before: such a bind became the hooked task's session for the rest of its life, and its
//!   children's).
//! - [`reset_default_manager`](localsession_std::reset_default_manager) clears every entry
//!   (a reset hook, before it bumps the generation), and the before-poll hook reads the
//!   generation before the entry, so a session read before a concurrent reset is installed as
//!   outdated (it reads as empty). An after-poll hook does not restore what the thread held
//!   before the poll if a reset ran during it. No pre-reset session comes back.
//!
//! # Hooks run no user code
//! tokio does not catch panics in its poll hooks (a panic there aborts the process or kills a
//! worker), so nothing the hooks do may run user code or panic:
//! - Sessions are cloned in the hooks, never dropped while a clone held elsewhere could make the
//!   drop the last one — except where a task's entry leaves the table. There the session is
//!   dropped inside `catch_unwind`: a value whose `Drop` panics is reported on stderr by the
//!   panic hook and counted ([`hook_drop_panics`]); the process, the runtime and every
//!   `JoinHandle` live on.
//! - In the final poll, the terminate hook takes the task's session out of the worker's slot
//!   too, so the after-poll hook has nothing left to drop.
//! - Thread-local access uses `try_with`: hooks that run during thread teardown do nothing.
//! - Hooks of your own ([`ImplicitSessions`]) are user code run inside ours: each is called
//!   inside `catch_unwind`, this crate's half of the hook completes (the task's session is
//!   uninstalled after a poll, its entry released at termination), and then the panic is
//!   resumed, so tokio sees it as it would without this crate (it catches a terminate hook's
//!   panic, and a poll hook's leaves `block_on` on a current-thread runtime, whose thread lives
//!   on with its own session).
//! - A task's own `bind` drops the session it replaces in the task's context (inside the
//!   poll): a panicking `Drop` there is an ordinary task panic that the `JoinHandle` reports —
//!   unless the late after-poll hook of the task's previous poll, on another worker, still
//!   holds a clone: then that hook's drop is the last one, caught and counted.
//!
//! # Bridges (features `tracing`, `opentelemetry`)
//! With [`localsession_std::set_carry_spans`] on, the spawn hook also captures the spawning
//! thread's current span (`Span::current()`: the spawner's, since the hook runs on its thread)
//! and keeps it in the task's entry, as the entry's attachment ([`TaskTable::spawned_with`]):
//! created and removed with the entry, so the protocol above covers it — a terminate that comes
//! before the spawn leaves a tombstone and the spawn hands the span back. Around each poll the
//! before-poll hook enters that span by id (through the span's subscriber; the poll's frame
//! holds a reference to the entry's copy, taken under the shard lock with the session, so the
//! span outlives a terminate that removes the entry during the poll), and with
//! [`localsession_std::set_carry_otel_context`] on, attaches the OpenTelemetry context of the
//! task's session *as it is at that poll* ([`localsession_std::OTEL_CONTEXT`]; a task that
//! rebinds gets the new session's context from its next poll on). The guard of both lives in the
//! poll's frame (`ContextGuard` is `!Send`; a tracing `Entered` cannot cross hooks), and the
//! after-poll hook drops it — detach, then exit — before it swaps the session out. A span tree
//! then looks as if every spawn had been written `.in_current_span()`.
//!
//! Capturing and entering a span runs subscriber code (`current_span`, `clone_span`, `enter`,
//! `exit`, `try_close`), and
//! dropping a context may drop the last reference of a span of OpenTelemetry's SDK (which ends
//! and exports it): every such step runs under `catch_unwind`, and a panic is counted in
//! [`hook_drop_panics`]. With both switches off the hooks do one relaxed load each more than
//! without the bridges (benchmark P9 in `docs/performance.md`).
//!
//! # Tasks that outlive their request
//! A task spawned inside a request inherits the request's session. Long-lived tasks (pooled
//! connections, `Buffer` workers) should be spawned with the flow suppressed
//! ([`localsession_std::without_flow`]); for the ones you do not control,
//! [`sweep_ended_sessions`] (or [`ImplicitSessions::sweep_every`], Go's GC interval) clears
//! the sessions that have ended (disabled, expired) out of the entries of tasks still alive.
//!
//! A *shared worker* — a task that serves every later caller, such as the worker
//! `tower::buffer::Buffer::new` spawns — must not inherit even while the request that spawned
//! it is in flight: its session is valid then, only someone else's, and a client layer inside
//! the worker would send it on every other request's call. The spawn hook knows
//! `Buffer::new`'s spawn site (from `TaskMeta::spawned_at`) and gives such a task, spawned
//! inside a session, one that is ended from the start instead; name other sites with
//! [`ImplicitSessions::shared_workers_spawned_at`].
//!
//! # What the hooks do not cover
//! - `spawn_blocking`: tokio fires no spawn hook for blocking tasks; use
//!   [`spawn_blocking`](crate::spawn_blocking).
//! - `LocalSet::spawn_local` / `task::spawn_local`: no hook fires; use
//!   [`spawn_local`](crate::spawn_local).
//! - The runtime's `block_on` future is not a task: it sees the session of the thread calling
//!   `block_on`.
//! - Tasks cancelled by the runtime's shutdown have their future dropped outside a poll,
//!   before the terminate hook: that drop sees whatever the dropping thread has bound (the
//!   caller of the runtime's `drop`/`shutdown_*`, or nothing on a worker), not the task's
//!   session. A future whose `Drop` needs its session: spawn it with
//!   [`spawn_with`](crate::spawn_with) or wrap it with
//!   [`FutureExt::with_session`](crate::FutureExt::with_session), which install the session
//!   around the drop too.
//!
//! # Examples
//! A `bind` inside a task sticks to that task, and what it spawns afterwards inherits it:
//! ```
//! # #[cfg(tokio_unstable)] {
//! use localsession_core::SessionMap;
//! use localsession_std::{bind, current};
//!
//! let mut builder = tokio::runtime::Builder::new_current_thread();
//! let rt = localsession_tokio::enable_implicit_sessions(builder.enable_all()).build().unwrap();
//! let seen = rt.block_on(async {
//!     let task = tokio::spawn(async {
//!         bind(SessionMap::new().with_value("k", 1u8)).unwrap();
//!         tokio::spawn(async { current().unwrap().value_cloned::<u8, _>(&"k") }).await.unwrap()
//!     });
//!     let seen = task.await.unwrap();
//!     assert!(current().is_none()); // the task's binding did not leak into `block_on`
//!     seen
//! });
//! assert_eq!(seen, Some(1));
//! assert_eq!(localsession_tokio::implicit_task_sessions(), 0); // entries released with their tasks
//! # }
//! ```

use std::cell::RefCell;
use std::fmt;
use std::panic::{AssertUnwindSafe, Location, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use localsession_core::{AnySession, ContextStore, TaskAttachment, TaskTable};
use localsession_std::{
    BindSink, BridgeGuard, Bridges, THREAD_STORE, UnitScope, is_shared_worker_session, shared_worker_session,
};

use crate::probe::raw_id;
use tokio::runtime::{Builder, TaskMeta};

/// Every hooked task's session (ids are unique process-wide, so one table serves every runtime).
static TABLE: LazyLock<TaskTable> = LazyLock::new(TaskTable::new);

/// Panics caught while dropping a session inside a hook.
static HOOK_DROP_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Decides, from where `tokio::spawn` was called, whether the task is a shared worker (see
/// [`ImplicitSessions::shared_workers_spawned_at`]).
type SpawnFilter = Arc<dyn Fn(&'static Location<'static>) -> bool + Send + Sync>;

/// The spawn sites known to start shared workers: `tower::buffer::Buffer::new` (it spawns its
/// worker with `tokio::spawn` from tower's `src/buffer/service.rs`; the worker then runs every
/// later caller's requests through the inner service).
fn is_known_shared_worker(location: &Location<'_>) -> bool {
    let file = location.file();
    // Every spawn made inside a session asks: one short comparison decides almost all of them.
    file.ends_with("service.rs")
        && (file.ends_with("/src/buffer/service.rs") || file.ends_with("\\src\\buffer\\service.rs"))
        && file.contains("tower")
}

/// A poll in progress on this thread.
struct Frame {
    id: u64,
    /// What the worker's slot held before the poll.
    previous: Option<AnySession>,
    /// The thread store's scope (the displaced binding's tag, the outer poll's sink).
    scope: UnitScope,
    /// The task's bridges, entered for the poll (span bridge, OpenTelemetry context bridge).
    bridges: Entered,
}

thread_local! {
    static FRAMES: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
}

/// Drops a session (or a span, an entered bridge) that left the table, where its `Drop` (user
/// code) must not unwind into tokio.
#[inline]
fn drop_caught<T>(value: Option<T>) {
    // Most calls get `None` (nothing left the table or the slot): decided here, inline.
    if let Some(value) = value {
        drop_caught_some(value);
    }
}

#[inline(never)]
fn drop_caught_some<T>(value: T) {
    if catch_unwind(AssertUnwindSafe(move || drop(value))).is_err() {
        HOOK_DROP_PANICS.fetch_add(1, Ordering::Relaxed);
    }
}

/// The sink that records a task's bindings in its entry.
fn record(id: u64, session: Option<&AnySession>) -> Option<AnySession> {
    TABLE.rebind(id, session)
}

fn on_spawn(meta: &TaskMeta<'_>, shared_workers: Option<&SpawnFilter>) {
    // Runs on the spawning thread: its slot holds the spawner's session (a task's, installed by
    // `on_before_poll`, or whatever the calling thread bound), and tracing's current span is
    // the spawner's.
    let id = raw_id(meta.id());
    let mut inherited = catch_unwind(localsession_std::flow_session).unwrap_or(None);
    // A shared worker spawned inside a request (a `Buffer` built lazily in a handler) would
    // serve every later request with this one's identity, also while this one is still in
    // flight (an ended-session check cannot see that): it gets the shared workers' session,
    // ended from the start, and none of the spawner's span.
    let shared_worker = inherited.is_some() && is_shared_worker(meta.spawned_at(), shared_workers);
    if shared_worker {
        drop_caught(inherited.replace(shared_worker_session()));
    }
    // The span bridge (two relaxed loads when both bridges are off): the span lives in the
    // task's entry, created and removed with it.
    let attachment: Option<TaskAttachment> = if !shared_worker && Bridges::switched_on() {
        let span = catch_unwind(Bridges::current_span).unwrap_or_default();
        if span.is_empty() { None } else { Some(Arc::new(span)) }
    } else {
        None
    };
    let (session, attachment) = TABLE.spawned_with(id, inherited, attachment);
    drop_caught(session);
    drop_caught(attachment);
}

/// Whether a task spawned at `location` is a shared worker: a known site, or one `filter` (user
/// code: caught; a panic counts as "shared", the side that cannot leak an identity) names.
fn is_shared_worker(location: &'static Location<'static>, filter: Option<&SpawnFilter>) -> bool {
    is_known_shared_worker(location)
        || filter.is_some_and(|f| {
            catch_unwind(AssertUnwindSafe(|| f(location))).unwrap_or_else(|_| {
                HOOK_DROP_PANICS.fetch_add(1, Ordering::Relaxed);
                true
            })
        })
}

fn on_before_poll(meta: &TaskMeta<'_>) {
    let id = raw_id(meta.id());
    // Before the entry is read: a reset that runs in between clears the entry (its hook) and
    // then bumps the generation, so a session read before that is installed as outdated.
    let read_at = THREAD_STORE.generation();
    let (mut session, attachment) = TABLE.entry(id);
    // The context bridge reads the task's session as it is now (the task may have rebound).
    // With both bridges off and no span kept, there is nothing to enter; nor for a task whose
    // session has ended (its request is over: a leftover task must not log or trace later
    // work under that request's span, trace or baggage). A user session's `is_valid` and
    // values are user code: caught, and a panic enters nothing.
    let context = if attachment.is_some() || Bridges::switched_on() {
        catch_unwind(AssertUnwindSafe(|| {
            let session = session.as_ref();
            session.is_none_or(AnySession::is_valid).then(|| Bridges::session_context(session))
        }))
        .unwrap_or(None)
    } else {
        None
    };
    // One thread-local access: the outer poll's sink (nested polls) is suspended, the task's
    // session installed, and its bindings recorded in its entry from now on.
    let Some((scope, stale)) = THREAD_STORE.enter_unit(&mut session, read_at, BindSink { unit: id, record }) else {
        // Thread teardown: nothing can be installed; the clones are not the last references.
        drop_caught(session);
        drop_caught(attachment);
        return;
    };
    // A binding from before a `reset_default_manager`: not restored, dropped here, caught.
    drop_caught(stale);
    let bridges = match context {
        Some(context) => enter_bridges(attachment, context),
        None => Entered::default(),
    };
    let frame = Frame { id, previous: session, scope, bridges };
    if let Err(frame) = push_frame(frame) {
        // The frame stack is gone (teardown) or busy: undo, so that the slot is not left
        // holding the task's session.
        frame.bridges.leave();
        let mut previous = frame.previous;
        drop_caught(THREAD_STORE.exit_unit(&mut previous, frame.scope));
        drop_caught(previous);
    }
}

/// Enters the task's span (kept in its entry) and attaches its session's OpenTelemetry
/// context, for the poll. The span is entered by id through the entry's shared copy (no clone
/// of the span). Entering runs subscriber code (`enter`): caught.
fn enter_bridges(attachment: Option<TaskAttachment>, context: Bridges) -> Entered {
    let shared = attachment.and_then(|a| a.downcast::<Bridges>().ok());
    if shared.is_none() && context.is_empty() {
        return Entered::default();
    }
    // The guard keeps `shared` (one reference-count increment, taken under the shard lock with
    // the session), so the span stays alive until the after-poll hook exits it — also when the
    // terminate hook, inside the task's final poll, removes the entry first.
    let entered = catch_unwind(AssertUnwindSafe(move || {
        let span = shared.map(Bridges::enter_shared);
        // Checked above: the task's session has not ended.
        let context = if context.is_empty() { None } else { Some(context.into_guard_unchecked()) };
        Entered { context, span }
    }));
    entered.unwrap_or_else(|_| {
        HOOK_DROP_PANICS.fetch_add(1, Ordering::Relaxed);
        Entered::default()
    })
}

/// The bridges a poll entered: dropped context first, then span (the reverse of entering).
#[derive(Default)]
struct Entered {
    context: Option<BridgeGuard<'static>>,
    span: Option<BridgeGuard<'static>>,
}

impl Entered {
    /// Leaves the bridges where a panicking subscriber or `Drop` must not unwind into tokio.
    fn leave(self) {
        let Entered { context, span } = self;
        drop_caught(context);
        drop_caught(span);
    }
}

#[inline]
fn push_frame(frame: Frame) -> Result<(), Frame> {
    // The frame stays in `frame` unless pushed (thread teardown, or the stack borrowed): no
    // other state to match on, so the frame is moved once into the stack (it is 112 bytes).
    let mut frame = Some(frame);
    let _ = FRAMES.try_with(|frames| {
        if let Ok(mut frames) = frames.try_borrow_mut()
            && let Some(frame) = frame.take()
        {
            frames.push(frame);
        }
    });
    frame.map_or(Ok(()), Err)
}

/// Pops the frame of task `id` (the innermost one; frames are strictly nested per thread).
#[inline]
fn pop_frame(id: u64) -> Option<Frame> {
    FRAMES
        .try_with(|frames| {
            let mut frames = frames.try_borrow_mut().ok()?;
            if frames.last()?.id == id { frames.pop() } else { None }
        })
        .ok()
        .flatten()
}

fn on_after_poll(meta: &TaskMeta<'_>) {
    let id = raw_id(meta.id());
    let Some(frame) = pop_frame(id) else { return };
    // Detach the context and exit the span before the session is swapped out (the reverse of
    // the before-poll hook). Subscriber code and possibly a last span reference: caught.
    frame.bridges.leave();
    let mut installed = frame.previous;
    let stale = THREAD_STORE.exit_unit(&mut installed, frame.scope);
    // Usually a clone whose entry still holds the session; the last reference only if the task
    // ended on another worker before this (late) hook ran.
    drop_caught(installed);
    drop_caught(stale);
}

fn on_terminate(meta: &TaskMeta<'_>) {
    let id = raw_id(meta.id());
    let (session, attachment) = TABLE.terminated_with(id);
    // A frame of the final poll holds its own reference to the span; the after-poll hook
    // exits and releases it.
    drop_caught(attachment);
    // Inside the task's final poll on this thread: take its session out of the slot now, so
    // that the after-poll hook has nothing to drop. The slot gets the pre-poll content back
    // when that hook runs.
    let polling_it = FRAMES
        .try_with(|frames| frames.try_borrow().is_ok_and(|f| f.last().is_some_and(|top| top.id == id)))
        .unwrap_or(false);
    let mut in_slot = None;
    if polling_it {
        THREAD_STORE.set_bind_sink(None);
        // A scope-style exchange (no tag, no task probe): the after-poll hook's exit restores
        // the frame's token.
        let _ = THREAD_STORE.enter_scope_in_place(&mut in_slot);
    }
    drop_caught(session);
    drop_caught(in_slot);
}

type Hook = Arc<dyn Fn(&TaskMeta<'_>) + Send + Sync>;

/// Implicit sessions for a tokio runtime builder, composed with task hooks of your own.
///
/// tokio keeps one hook of each kind per builder, so installing implicit sessions replaces the
/// `on_task_spawn`, `on_before_task_poll`, `on_after_task_poll` and `on_task_terminate` hooks
/// set before. Give yours here instead: they run after this crate's spawn and before-poll hooks
/// (so they see the task's session) and before its after-poll and terminate hooks.
///
/// # Examples
/// ```
/// # #[cfg(tokio_unstable)] {
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use localsession_core::SessionMap;
/// use localsession_std::{current, scope};
/// use localsession_tokio::ImplicitSessions;
///
/// let polls_with_session = Arc::new(AtomicUsize::new(0));
/// let counter = polls_with_session.clone();
/// let mut builder = tokio::runtime::Builder::new_current_thread();
/// ImplicitSessions::new()
///     .on_before_task_poll(move |_| {
///         if current().is_some() {
///             counter.fetch_add(1, Ordering::Relaxed);
///         }
///     })
///     .install(builder.enable_all());
/// let rt = builder.build().unwrap();
/// rt.block_on(async {
///     scope(SessionMap::new(), || tokio::spawn(async {})).await.unwrap();
/// });
/// assert!(polls_with_session.load(Ordering::Relaxed) >= 1);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct ImplicitSessions {
    spawn: Option<Hook>,
    before_poll: Option<Hook>,
    after_poll: Option<Hook>,
    terminate: Option<Hook>,
    sweep_every: Option<Duration>,
    shared_workers: Option<SpawnFilter>,
}

impl ImplicitSessions {
    /// Implicit sessions with no hooks of your own and no periodic sweep.
    ///
    /// # Examples
    /// ```
    /// # #[cfg(tokio_unstable)] {
    /// let mut builder = tokio::runtime::Builder::new_multi_thread();
    /// localsession_tokio::ImplicitSessions::new().install(builder.worker_threads(2).enable_all());
    /// let rt = builder.build().unwrap();
    /// # }
    /// ```
    #[must_use]
    pub fn new() -> ImplicitSessions {
        ImplicitSessions::default()
    }

    /// Your `on_task_spawn` hook, run after this crate's. If it panics, `tokio::spawn` panics
    /// as it would without this crate; the task, already registered with the runtime, ends at
    /// the runtime's shutdown, and this crate's terminate hook releases its entry then.
    ///
    /// # Examples
    /// ```
    /// # #[cfg(tokio_unstable)] {
    /// let hooks = localsession_tokio::ImplicitSessions::new().on_task_spawn(|meta| {
    ///     let _ = meta.id();
    /// });
    /// # }
    /// ```
    #[must_use]
    pub fn on_task_spawn(mut self, f: impl Fn(&TaskMeta<'_>) + Send + Sync + 'static) -> Self {
        self.spawn = Some(Arc::new(f));
        self
    }

    /// Your `on_before_task_poll` hook, run after this crate's (the task's session is current).
    /// If it panics, this crate uninstalls the task's session before the panic goes on, so the
    /// thread it leaves (a current-thread runtime's `block_on` caller) keeps its own session.
    ///
    /// # Examples
    /// ```
    /// # #[cfg(tokio_unstable)] {
    /// let hooks = localsession_tokio::ImplicitSessions::new().on_before_task_poll(|_| {});
    /// # }
    /// ```
    #[must_use]
    pub fn on_before_task_poll(mut self, f: impl Fn(&TaskMeta<'_>) + Send + Sync + 'static) -> Self {
        self.before_poll = Some(Arc::new(f));
        self
    }

    /// Your `on_after_task_poll` hook, run before this crate's (the task's session is current,
    /// except after the task's final poll: tokio ran the terminate hook inside that poll, and it
    /// took the session out).
    /// If it panics, this crate's hook still runs, then the panic goes on.
    ///
    /// # Examples
    /// ```
    /// # #[cfg(tokio_unstable)] {
    /// let hooks = localsession_tokio::ImplicitSessions::new().on_after_task_poll(|_| {});
    /// # }
    /// ```
    #[must_use]
    pub fn on_after_task_poll(mut self, f: impl Fn(&TaskMeta<'_>) + Send + Sync + 'static) -> Self {
        self.after_poll = Some(Arc::new(f));
        self
    }

    /// Your `on_task_terminate` hook, run before this crate's. If it panics, this crate's hook
    /// still runs (the task's entry is released), then the panic goes on (tokio catches it).
    ///
    /// # Examples
    /// ```
    /// # #[cfg(tokio_unstable)] {
    /// let hooks = localsession_tokio::ImplicitSessions::new().on_task_terminate(|_| {});
    /// # }
    /// ```
    #[must_use]
    pub fn on_task_terminate(mut self, f: impl Fn(&TaskMeta<'_>) + Send + Sync + 'static) -> Self {
        self.terminate = Some(Arc::new(f));
        self
    }

    /// Names more spawn sites whose tasks are *shared workers*, besides the one known here
    /// (`tower::buffer::Buffer::new`'s worker). `is_shared` gets the location `tokio::spawn` was
    /// called from (`TaskMeta::spawned_at`: the innermost caller that is not `#[track_caller]`).
    ///
    /// A shared worker serves every later caller, so it must not carry the session of the
    /// request that happened to spawn it — not after that request ends (an ended-session check
    /// catches that), and not while it is still in flight (nothing else can: the worker then
    /// holds a valid session that is simply someone else's). A task spawned at such a site
    /// inside a session gets, instead of that session, one that is *ended from the start*
    /// (`err()` names the cause): a [`ClientBackup`](crate::tower::ClientBackup) inside the
    /// worker refuses every call with `EndedSession` rather than sending the first request's
    /// identity, the bridges enter nothing, and sweeps and resets keep it (so the worker never
    /// falls back to "no session", which would send no identity silently). Spawned outside any
    /// session, such a task gets none, as before. `is_shared` runs on every spawn made inside
    /// a session (cache what it computes if it is not cheap); if it panics the task counts as a
    /// shared worker, and the panic as one of [`hook_drop_panics`].
    ///
    /// # Examples
    /// ```
    /// # #[cfg(tokio_unstable)] {
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, scope};
    /// use localsession_tokio::ImplicitSessions;
    ///
    /// #[inline(never)]
    /// fn spawn_pool_refresher() -> tokio::task::JoinHandle<bool> {
    ///     tokio::spawn(async { current().is_some_and(|s| !s.is_valid()) })
    /// }
    /// let refresher_line = line!() - 2;
    ///
    /// let mut builder = tokio::runtime::Builder::new_current_thread();
    /// ImplicitSessions::new()
    ///     .shared_workers_spawned_at(move |at| at.file() == file!() && at.line() == refresher_line)
    ///     .install(builder.enable_all());
    /// let rt = builder.build().unwrap();
    /// rt.block_on(async {
    ///     let request = SessionMap::new().with_value("tenant", "acme");
    ///     // Inside the request: the refresher gets an ended session, not the request's.
    ///     assert!(scope(request, spawn_pool_refresher).await.unwrap());
    /// });
    /// # }
    /// ```
    #[must_use]
    pub fn shared_workers_spawned_at(
        mut self,
        is_shared: impl Fn(&'static Location<'static>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.shared_workers = Some(Arc::new(is_shared));
        self
    }

    /// Sweeps ended sessions out of live tasks' entries every `interval` (Go's GC interval) on
    /// a background thread, which stops once the runtime built with these hooks is dropped.
    ///
    /// # Examples
    /// ```
    /// # #[cfg(tokio_unstable)] {
    /// use std::time::Duration;
    /// let mut builder = tokio::runtime::Builder::new_current_thread();
    /// localsession_tokio::ImplicitSessions::new().sweep_every(Duration::from_secs(60)).install(&mut builder);
    /// drop(builder.build().unwrap()); // the sweeper stops at its next wake-up
    /// # }
    /// ```
    #[must_use]
    pub fn sweep_every(mut self, interval: Duration) -> Self {
        self.sweep_every = Some(interval);
        self
    }

    /// Installs the hooks on `builder` (replacing task hooks set on it before).
    ///
    /// # Examples
    /// ```
    /// # #[cfg(tokio_unstable)] {
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, scope};
    /// let mut builder = tokio::runtime::Builder::new_current_thread();
    /// localsession_tokio::ImplicitSessions::new().install(&mut builder);
    /// let rt = builder.build().unwrap();
    /// let seen = rt.block_on(async { scope(SessionMap::new(), || tokio::spawn(async { current().is_some() })).await });
    /// assert!(seen.unwrap());
    /// # }
    /// ```
    pub fn install(self, builder: &mut Builder) -> &mut Builder {
        crate::probe::register();
        localsession_std::register_reset_hook(clear_on_reset);
        // The hooks own `alive`; the sweeper holds a `Weak` and stops when the runtime (and with
        // it the hooks) is dropped.
        let alive = Arc::new(());
        if let Some(interval) = self.sweep_every {
            let weak = Arc::downgrade(&alive);
            let _ = std::thread::Builder::new()
                .name("localsession-implicit-sweep".into())
                .spawn(move || sweeper(&weak, interval));
        }
        let ImplicitSessions { spawn, before_poll, after_poll, terminate, shared_workers, .. } = self;
        let keep = alive.clone();
        builder
            .on_task_spawn(move |meta| {
                let _ = &keep;
                on_spawn(meta, shared_workers.as_ref());
                if let Some(f) = &spawn {
                    f(meta);
                }
            })
            // The user's hooks run inside ours (so that they see the task's session) and may
            // panic. tokio does not catch a poll hook's panic (it leaves `block_on` on a
            // current-thread runtime, whose thread lives on) and catches a terminate hook's:
            // either way our half must still run, or the thread keeps the task's session
            // installed, or the task's entry stays in the table for good. So the user's hook is
            // caught, ours completes, and the panic is resumed for tokio to handle as it would.
            .on_before_task_poll(move |meta| {
                on_before_poll(meta);
                if let Some(panic) = call_caught(before_poll.as_ref(), meta) {
                    on_after_poll(meta);
                    resume_unwind(panic);
                }
            })
            .on_after_task_poll(move |meta| {
                let panic = call_caught(after_poll.as_ref(), meta);
                on_after_poll(meta);
                if let Some(panic) = panic {
                    resume_unwind(panic);
                }
            })
            .on_task_terminate(move |meta| {
                let _ = &alive;
                let panic = call_caught(terminate.as_ref(), meta);
                on_terminate(meta);
                if let Some(panic) = panic {
                    resume_unwind(panic);
                }
            })
    }
}

impl fmt::Debug for ImplicitSessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImplicitSessions")
            .field("on_task_spawn", &self.spawn.is_some())
            .field("on_before_task_poll", &self.before_poll.is_some())
            .field("on_after_task_poll", &self.after_poll.is_some())
            .field("on_task_terminate", &self.terminate.is_some())
            .field("sweep_every", &self.sweep_every)
            .field("shared_workers_spawned_at", &self.shared_workers.is_some())
            .finish()
    }
}

/// Calls a user's hook (if any) inside `catch_unwind`; returns its panic, for the caller to
/// resume once this crate's half of the hook has run.
fn call_caught(hook: Option<&Hook>, meta: &TaskMeta<'_>) -> Option<Box<dyn std::any::Any + Send>> {
    catch_unwind(AssertUnwindSafe(|| hook.map(|f| f(meta)))).err()
}

fn sweeper(alive: &Weak<()>, interval: Duration) {
    loop {
        std::thread::park_timeout(interval);
        if alive.strong_count() == 0 {
            return;
        }
        sweep_ended_sessions();
    }
}

/// Installs the implicit-inheritance hooks on a tokio runtime builder (see the module docs);
/// `ImplicitSessions::new().install(builder)`. Replaces task hooks set on `builder` before: to
/// keep your own, use [`ImplicitSessions`].
///
/// # Examples
/// ```
/// # #[cfg(tokio_unstable)] {
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{current, scope};
///
/// let mut builder = tokio::runtime::Builder::new_multi_thread();
/// builder.worker_threads(2).enable_all();
/// let rt = localsession_tokio::enable_implicit_sessions(&mut builder).build().unwrap();
///
/// let s = SessionCtx::new(&Context::background()).with_value("k", 1u8);
/// let v = rt.block_on(async move {
///     // A plain tokio::spawn, grandchild included, inherits the session.
///     let h = scope(s, || tokio::spawn(async {
///         tokio::spawn(async { current().unwrap().value_cloned::<u8, _>(&"k") }).await.unwrap()
///     }));
///     h.await.unwrap()
/// });
/// assert_eq!(v, Some(1));
/// # }
/// ```
pub fn enable_implicit_sessions(builder: &mut Builder) -> &mut Builder {
    ImplicitSessions::new().install(builder)
}

/// Clears ended sessions (no longer [valid](AnySession::is_valid): disabled, expired, or their
/// context cancelled) out of the entries of tasks that are still alive, and returns how many
/// were cleared. Those tasks run without a session from their next poll on. Custom sessions'
/// `is_valid` runs here, on the calling thread; one that panics counts as valid.
///
/// # Examples
/// ```
/// # #[cfg(tokio_unstable)] {
/// use localsession_core::SessionMap;
/// use localsession_std::{current, scope};
/// let mut builder = tokio::runtime::Builder::new_current_thread();
/// let rt = localsession_tokio::enable_implicit_sessions(builder.enable_all()).build().unwrap();
/// rt.block_on(async {
///     let request = SessionMap::new();
///     let (tx, rx) = tokio::sync::oneshot::channel::<()>();
///     // A long-lived task spawned inside the request: it inherits the request's session.
///     let worker = scope(request.clone(), || tokio::spawn(async move {
///         rx.await.unwrap();
///         current().is_none()
///     }));
///     tokio::task::yield_now().await;
///     request.disable(); // the request ends
///     assert_eq!(localsession_tokio::sweep_ended_sessions(), 1);
///     tx.send(()).unwrap();
///     assert!(worker.await.unwrap()); // the worker no longer carries the request's session
/// });
/// # }
/// ```
pub fn sweep_ended_sessions() -> usize {
    // The shared workers' session is ended by design: kept (see `shared_workers_spawned_at`).
    let cleared =
        TABLE.sweep(|s| catch_unwind(AssertUnwindSafe(|| s.is_valid())).unwrap_or(true) || is_shared_worker_session(s));
    let n = cleared.len();
    for session in cleared {
        drop_caught(Some(session));
    }
    n
}

/// `reset_default_manager`'s hook: every task's session is from before the reset, so every
/// entry is cleared (an idle task would otherwise get its session back at its next poll). Runs
/// in the resetting caller's context, not in a hook; drops are caught all the same, so that a
/// panicking `Drop` cannot stop the reset half-way.
fn clear_on_reset() {
    // The shared workers' session is no request's: kept, so that those workers stay marked.
    for session in TABLE.sweep(is_shared_worker_session) {
        drop_caught(Some(session));
    }
}

/// Tasks that currently hold a session in the implicit table (for leak tests and metrics).
///
/// # Examples
/// ```
/// # #[cfg(tokio_unstable)] {
/// assert_eq!(localsession_tokio::implicit_task_sessions(), 0);
/// # }
/// ```
#[must_use]
pub fn implicit_task_sessions() -> usize {
    TABLE.sessions()
}

/// Tasks the implicit table knows (spawned through hooked runtimes and not yet terminated),
/// with or without a session.
///
/// # Examples
/// ```
/// # #[cfg(tokio_unstable)] {
/// assert_eq!(localsession_tokio::implicit_tasks(), 0);
/// # }
/// ```
#[must_use]
pub fn implicit_tasks() -> usize {
    TABLE.tasks()
}

/// Session drops inside hooks whose `Drop` panicked, panics of tracing subscribers or
/// OpenTelemetry values while the bridges entered or left a poll, and panics of a
/// [`shared_workers_spawned_at`](ImplicitSessions::shared_workers_spawned_at) predicate (caught,
/// so the runtime lived on).
///
/// # Examples
/// ```
/// # #[cfg(tokio_unstable)] {
/// assert_eq!(localsession_tokio::hook_drop_panics(), 0);
/// # }
/// ```
#[must_use]
pub fn hook_drop_panics() -> usize {
    HOOK_DROP_PANICS.load(Ordering::Relaxed)
}
