//! Implicit inheritance (requires `--cfg tokio_unstable`): a plain `tokio::spawn` — also from
//! library code you do not control — inherits the spawner's session.
//!
//! Go had to drop its `EnableImplicitlyTransmitAsync` (it relied on pprof labels); tokio's task
//! hooks make it possible here. [`enable_implicit_sessions`] installs four hooks on a runtime
//! builder:
//!
//! | hook | runs on | does |
//! |---|---|---|
//! | `on_task_spawn` | the spawning thread | records the spawner's current session under the new task's id |
//! | `on_before_task_poll` | the polling worker | installs a clone of the task's session in the worker's slot, stashing what was there |
//! | `on_after_task_poll` | the polling worker | swaps the stash back; if the task bound (or unbound) a session during the poll, that becomes its session |
//! | `on_task_terminate` | where the task ends | releases the task's entry |
//!
//! Tasks without a session cost two thread-local swaps per poll, and no map access at all while
//! no task has a session. Entries are released when their task terminates, so the table does
//! not grow with the number of tasks ever spawned.
//!
//! Two orderings of tokio 1.54 shape this: `on_task_terminate` runs *inside* the final poll,
//! before `on_after_task_poll` (so the after-poll hook must not re-insert a task that just
//! ended), and `on_after_task_poll` runs after the task is already idle again, so another
//! worker may poll it before the hook ran. The entry therefore stays in the table during a
//! poll; the cost of that race is only that a `bind` made inside such an overlapping poll may
//! be overwritten by the other worker's after-poll (last writer wins).
//!
//! # What the hooks do not cover
//! - `spawn_blocking`: tokio fires no spawn hook for blocking tasks; use
//!   [`spawn_blocking`](crate::spawn_blocking).
//! - `LocalSet::spawn_local` / `task::spawn_local`: no hook fires; use
//!   [`spawn_local`](crate::spawn_local).
//! - The runtime's `block_on` future is not a task: it sees the session of the thread calling
//!   `block_on`.
//! - A task's future is dropped (on completion or abort) outside a poll, without its session.
//! - The hooks replace any `on_task_spawn`/`on_*_task_poll`/`on_task_terminate` hooks set
//!   before on the same builder (tokio keeps one of each).
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
//!         bind(SessionMap::new().with_value("k", 1u8));
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

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicUsize, Ordering};

use localsession_core::AnySession;
use localsession_std::THREAD_STORE;
use tokio::runtime::{Builder, TaskMeta};
use tokio::task::Id;

const SHARDS: usize = 16;

/// Sessions of tasks that have one, keyed by task id (ids are unique process-wide).
struct TaskSessions {
    /// Spin locks: the critical sections are one hash-map operation that runs no user code
    /// (session drops happen after unlocking), so one compare-and-swap to lock and a plain store
    /// to unlock beat a parking mutex's two read-modify-writes.
    shards: [spin::Mutex<TaskMap>; SHARDS],
    /// Entries in all shards; lets sessionless workloads skip the map entirely.
    len: AtomicUsize,
}

type TaskMap = HashMap<Id, AnySession, BuildHasherDefault<FxMix>>;

static TASKS: TaskSessions = TaskSessions {
    shards: [const { spin::Mutex::new(HashMap::with_hasher(BuildHasherDefault::new())) }; SHARDS],
    len: AtomicUsize::new(0),
};

/// The poll in progress on this thread.
struct Polling {
    id: Id,
    /// The identity of the session installed for the poll (the table's entry).
    installed: Option<(usize, usize)>,
    /// What the worker's slot held before.
    previous: Option<AnySession>,
    /// The task terminated during the poll.
    terminated: bool,
}

thread_local! {
    static POLLING: Cell<Option<Polling>> = const { Cell::new(None) };
}

impl TaskSessions {
    fn shard(&self, id: Id) -> &spin::Mutex<TaskMap> {
        use std::hash::{Hash, Hasher};
        // Task ids are sequential: spread them over the shards with a multiplicative mix.
        let mut mix = FxMix(0);
        id.hash(&mut mix);
        &self.shards[(mix.finish() >> 60) as usize % SHARDS]
    }

    fn insert(&self, id: Id, session: AnySession) {
        let old = self.shard(id).lock().insert(id, session);
        if old.is_none() {
            // Relaxed: a hint for the fast path; the map itself is behind the lock.
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        drop(old);
    }

    fn get(&self, id: Id) -> Option<AnySession> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.shard(id).lock().get(&id).cloned()
    }

    fn remove(&self, id: Id) -> Option<AnySession> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let removed = self.shard(id).lock().remove(&id);
        if removed.is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }
}

/// A tiny multiplicative hasher for task ids (sequential `u64`s).
#[derive(Default)]
struct FxMix(u64);

impl std::hash::Hasher for FxMix {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

fn on_spawn(meta: &TaskMeta<'_>) {
    // Runs on the spawning thread: its slot holds the spawner's session (a task's, installed
    // by `on_before_poll`, or whatever the calling thread bound).
    if let Some(session) = localsession_std::flow_session() {
        TASKS.insert(meta.id(), session);
    }
}

fn on_before_poll(meta: &TaskMeta<'_>) {
    let id = meta.id();
    // The entry stays in the table during the poll (the worker gets a clone): tokio runs
    // `on_after_poll` only after the task is idle again, so another worker may already poll it
    // (woken by a timer or a child) before this worker's `on_after_poll` ran — it must still
    // find the session.
    // Install (a clone of) the task's session — or none: a worker must not lend the previous
    // task's, nor the `block_on` caller's — keeping what was there for `on_after_poll`.
    let mut previous = TASKS.get(id);
    let installed = previous.as_ref().map(AnySession::identity);
    if !THREAD_STORE.swap_in_place(&mut previous) {
        previous = None;
    }
    POLLING.with(|p| {
        let older = p.replace(Some(Polling { id, installed, previous, terminated: false }));
        debug_assert!(older.is_none(), "task polls do not nest on one thread");
        drop(older);
    });
}

fn on_after_poll(meta: &TaskMeta<'_>) {
    let Some(mut polling) = POLLING.with(|p| p.take()) else { return };
    let mut after = polling.previous.take();
    if !THREAD_STORE.swap_in_place(&mut after) {
        after = None;
    }
    if polling.terminated || polling.id != meta.id() {
        // The task ended during this poll (tokio fires `on_task_terminate` before
        // `on_after_task_poll`): its entry is gone and must stay gone.
        return;
    }
    let changed = after.as_ref().map(AnySession::identity) != polling.installed;
    if changed {
        // The task bound (or unbound) a session during the poll: that is its session now.
        match after {
            Some(session) => TASKS.insert(meta.id(), session),
            None => drop(TASKS.remove(meta.id())),
        }
    }
}

fn on_terminate(meta: &TaskMeta<'_>) {
    let id = meta.id();
    // If this thread is polling the task right now, `on_after_poll` must not put it back.
    POLLING.with(|p| {
        if let Some(polling) = p.take() {
            let ending = polling.id == id;
            p.set(Some(Polling { terminated: polling.terminated || ending, ..polling }));
        }
    });
    // Tasks the hooks never saw spawn (runtime internals, `spawn_blocking`) have no entry.
    drop(TASKS.remove(id));
}

/// Installs the implicit-inheritance hooks on a tokio runtime builder (see the module docs).
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
    builder
        .on_task_spawn(on_spawn)
        .on_before_task_poll(on_before_poll)
        .on_after_task_poll(on_after_poll)
        .on_task_terminate(on_terminate)
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
    TASKS.len.load(Ordering::Relaxed)
}
