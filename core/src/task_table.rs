//! [`TaskTable`]: the sessions of tasks an executor only hears about through hooks.
//!
//! Some executors do not let you put a slot into their task struct, but tell you about each
//! task's life: tokio's task hooks (`on_task_spawn`, `on_before_task_poll`,
//! `on_after_task_poll`, `on_task_terminate`) are the case this table was built for. The table
//! keeps, per task id, the session the task runs with; the adapter installs it in the polling
//! thread's slot around every poll.
//!
//! The protocol is documented on [`TaskTable`] (public docs).
//!
//! Besides its session, an entry may hold one [`TaskAttachment`]: data of an adapter that must
//! live and die with the task's entry under the same protocol (the tokio adapter keeps the
//! tracing span a task was spawned in there). It shares the entry, so spawn and terminate
//! create and remove both at once — a second table would need its own tombstones to survive a
//! terminate that comes before the spawn.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::any::Any;
use core::fmt;
use core::hash::{BuildHasherDefault, Hasher};

use crossbeam_utils::CachePadded;
use hashbrown::HashMap;

use crate::primitive::Mutex;
use crate::session::AnySession;

/// Adapter data kept in a task's entry next to its session (see [`TaskTable::spawned_with`]).
/// Cloning it is one reference-count increment: the table clones it under a shard lock, where
/// no user code may run.
pub type TaskAttachment = Arc<dyn Any + Send + Sync>;

/// One task's place in the table.
enum Slot {
    /// A task the table saw spawn, the session it runs with, and its attachment.
    Live(Option<AnySession>, Option<TaskAttachment>),
    /// A task that terminated before its spawn was recorded.
    Ended,
}

struct Shard {
    slots: HashMap<u64, Slot, BuildHasherDefault<IdHasher>>,
    /// Tombstoned ids, oldest first.
    tombstones: VecDeque<u64>,
    /// Live entries (tombstones not counted), and those of them that hold a session: plain
    /// counters under the shard's lock, so the hooks' hot path pays no extra atomic
    /// read-modify-write for statistics; [`TaskTable::tasks`] sums them.
    tasks: usize,
    sessions: usize,
}

impl Shard {
    fn count_session_change(&mut self, had: bool, has: bool) {
        match (had, has) {
            (false, true) => self.sessions += 1,
            (true, false) => self.sessions -= 1,
            _ => {}
        }
    }
}

/// The sessions of hook-observed tasks, keyed by task id.
///
/// Some executors do not let you put a slot into their task struct but tell you about each
/// task's life through hooks (tokio's `on_task_spawn`, `on_before_task_poll`,
/// `on_after_task_poll`, `on_task_terminate`). The table keeps, per task id, the session the
/// task runs with; the adapter installs it in the polling thread's slot around every poll.
///
/// # Protocol
///
/// | event | runs | table operation |
/// |---|---|---|
/// | spawn | on the spawning thread, once | [`spawned`](TaskTable::spawned) creates the entry (or consumes a tombstone) |
/// | before a poll | on the polling thread | [`session`](TaskTable::session) clones the entry's session |
/// | the task binds during its poll | on the polling thread | [`rebind`](TaskTable::rebind) replaces the entry's session *at bind time* |
/// | after a poll | on the polling thread | nothing: the table is not touched |
/// | terminate | where the task ends, once | [`terminated`](TaskTable::terminated) removes the entry (or leaves a tombstone) |
///
/// Three rules make every interleaving the executor allows come out right:
///
/// 1. **Only spawn creates an entry and only terminate removes one.** [`rebind`](TaskTable::rebind)
///    changes an existing entry and never creates one, so a bind that happens after the task
///    ended (a late, stale caller) cannot resurrect it, and a task whose entry exists always
///    reaches terminate, which removes it: no entry outlives its task.
/// 2. **A poll's bindings reach the entry before the poll returns.** A task's polls are
///    serialized by the executor (tokio's `RUNNING` bit, with acquire/release on the task state),
///    so the next poll — on any worker — happens after the `rebind` and sees it. The after-poll
///    hook, which tokio may run late (after another worker already started the next poll), has
///    nothing to write and so cannot overwrite a newer binding with an older one.
/// 3. **Terminate before spawn leaves a tombstone.** On a runtime that is shutting down, tokio
///    can terminate a task before its spawn hook ran. Terminate of an unknown id records a
///    tombstone; the spawn that finds it drops its session instead of creating an entry.
///    Terminates of ids whose spawn never comes (tasks the hooks never saw spawn, such as
///    blocking tasks) would make tombstones pile up, so each shard keeps only the most recent
///    [`TOMBSTONES_PER_SHARD`](TaskTable::TOMBSTONES_PER_SHARD) of them.
///
/// No method runs user code while a shard is locked, and none drops a session: every
/// session that leaves the table is handed back to the caller, who decides where it is dropped
/// (a hook drops it under `catch_unwind`, never inside the lock). The loom model in
/// `tests/loom.rs` checks rules 1–3 under the orderings tokio allows.
///
/// # Examples
/// ```
/// use localsession_core::{SessionMap, TaskTable};
///
/// let table = TaskTable::new();
/// let request = SessionMap::new().with_value("tenant", "acme");
/// assert!(table.spawned(7, Some(request.into())).is_none()); // spawn hook
/// assert_eq!(table.session(7).unwrap().value_cloned::<&str, _>(&"tenant"), Some("acme")); // before a poll
/// let old = table.rebind(7, None); // the task unbound during its poll
/// assert!(old.is_some() && table.session(7).is_none());
/// assert!(table.terminated(7).is_none()); // terminate: nothing left to drop
/// assert_eq!(table.tasks(), 0);
/// ```
pub struct TaskTable {
    /// Each shard on its own cache line: two workers locking neighbouring shards must not
    /// bounce one line between them.
    shards: Box<[CachePadded<Mutex<Shard>>]>,
}

impl TaskTable {
    /// Tombstones kept per shard (see rule 3 in the [type docs](TaskTable)).
    pub const TOMBSTONES_PER_SHARD: usize = 64;
    const SHARDS: usize = 16;

    /// An empty table.
    ///
    /// # Examples
    /// ```
    /// let table = localsession_core::TaskTable::new();
    /// assert_eq!((table.tasks(), table.sessions()), (0, 0));
    /// ```
    #[must_use]
    pub fn new() -> TaskTable {
        let shards = (0..Self::SHARDS)
            .map(|_| {
                CachePadded::new(Mutex::new(Shard {
                    slots: HashMap::with_hasher(BuildHasherDefault::default()),
                    tombstones: VecDeque::new(),
                    tasks: 0,
                    sessions: 0,
                }))
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        TaskTable { shards }
    }

    fn shard(&self, id: u64) -> &Mutex<Shard> {
        // Task ids are sequential: a multiplicative mix spreads neighbours over the shards.
        &self.shards[(mix(id) >> 60) as usize % Self::SHARDS]
    }

    /// Records a spawned task and the session it inherits (spawn hook). Returns a session the
    /// caller must drop: `session` itself if the task already terminated (a tombstone was
    /// found), or the session of an earlier entry under the same id (an id reused without a
    /// terminate; not expected from tokio).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{SessionMap, TaskTable};
    /// let table = TaskTable::new();
    /// // Terminate before spawn (a runtime shutting down): the spawn hands the session back.
    /// assert!(table.terminated(3).is_none());
    /// assert!(table.spawned(3, Some(SessionMap::new().into())).is_some());
    /// assert_eq!(table.tasks(), 0);
    /// ```
    #[must_use = "the returned session must be dropped outside any lock or hook-sensitive code"]
    pub fn spawned(&self, id: u64, session: Option<AnySession>) -> Option<AnySession> {
        let (session, attachment) = self.spawned_with(id, session, None);
        // `None` went in; an attachment can only come back from a reused id (not expected).
        drop(attachment);
        session
    }

    /// [`spawned`](TaskTable::spawned) with an attachment kept in the entry next to the
    /// session until [`terminated_with`](TaskTable::terminated_with). Returns what the caller
    /// must drop (outside any lock): `session` and `attachment` themselves if the task already
    /// terminated, or those of an earlier entry under the same id.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use localsession_core::{SessionMap, TaskTable};
    /// let table = TaskTable::new();
    /// let (s, a) = table.spawned_with(4, Some(SessionMap::new().into()), Some(Arc::new("span")));
    /// assert!(s.is_none() && a.is_none());
    /// let (_, attachment) = table.entry(4);
    /// assert_eq!(attachment.unwrap().downcast_ref::<&str>(), Some(&"span"));
    /// let (s, a) = table.terminated_with(4);
    /// assert!(s.is_some() && a.is_some());
    /// ```
    #[must_use = "the returned values must be dropped outside any lock or hook-sensitive code"]
    pub fn spawned_with(
        &self,
        id: u64,
        session: Option<AnySession>,
        attachment: Option<TaskAttachment>,
    ) -> (Option<AnySession>, Option<TaskAttachment>) {
        let mut guard = self.shard(id).lock();
        let shard = &mut *guard;
        let has = session.is_some();
        match shard.slots.get_mut(&id) {
            Some(Slot::Ended) => {
                shard.slots.remove(&id);
                shard.tombstones.retain(|t| *t != id);
                (session, attachment)
            }
            Some(Slot::Live(old, old_attachment)) => {
                let old = core::mem::replace(old, session);
                let old_attachment = core::mem::replace(old_attachment, attachment);
                shard.count_session_change(old.is_some(), has);
                (old, old_attachment)
            }
            None => {
                shard.slots.insert(id, Slot::Live(session, attachment));
                shard.tasks += 1;
                shard.count_session_change(false, has);
                (None, None)
            }
        }
    }

    /// A clone of the session of task `id` (before-poll hook); `None` if it has none, or the
    /// table does not know it.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{SessionMap, TaskTable};
    /// let table = TaskTable::new();
    /// let _ = table.spawned(1, Some(SessionMap::new().with_value("k", 1u8).into()));
    /// assert_eq!(table.session(1).unwrap().value_cloned::<u8, _>(&"k"), Some(1));
    /// assert!(table.session(2).is_none());
    /// ```
    #[must_use]
    pub fn session(&self, id: u64) -> Option<AnySession> {
        match self.shard(id).lock().slots.get(&id) {
            Some(Slot::Live(session, _)) => session.clone(),
            _ => None,
        }
    }

    /// Clones of the session and the attachment of task `id`, under one lock (before-poll
    /// hook); `(None, None)` for a task the table does not know.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use localsession_core::TaskTable;
    /// let table = TaskTable::new();
    /// let _ = table.spawned_with(1, None, Some(Arc::new(7u32)));
    /// let (session, attachment) = table.entry(1);
    /// assert!(session.is_none());
    /// assert_eq!(attachment.unwrap().downcast_ref::<u32>(), Some(&7));
    /// assert!(table.entry(2).1.is_none());
    /// ```
    #[must_use]
    pub fn entry(&self, id: u64) -> (Option<AnySession>, Option<TaskAttachment>) {
        match self.shard(id).lock().slots.get(&id) {
            Some(Slot::Live(session, attachment)) => (session.clone(), attachment.clone()),
            _ => (None, None),
        }
    }

    /// Replaces the session of a live task with a clone of `session` (the task bound or
    /// unbound during its poll) and returns the previous one for the caller to drop. Does
    /// nothing for a task the table does not know or that ended: only spawn creates entries.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{SessionMap, TaskTable};
    /// let table = TaskTable::new();
    /// let _ = table.spawned(1, None);
    /// let mine = SessionMap::new().with_value("k", 2u8).into();
    /// assert!(table.rebind(1, Some(&mine)).is_none());
    /// assert_eq!(table.session(1).unwrap().value_cloned::<u8, _>(&"k"), Some(2));
    /// assert!(table.rebind(9, Some(&mine)).is_none()); // unknown task: nothing is created
    /// assert_eq!(table.tasks(), 1);
    /// ```
    #[must_use = "the returned session must be dropped outside any lock or hook-sensitive code"]
    pub fn rebind(&self, id: u64, session: Option<&AnySession>) -> Option<AnySession> {
        let mut guard = self.shard(id).lock();
        let shard = &mut *guard;
        let Some(Slot::Live(current, _)) = shard.slots.get_mut(&id) else { return None };
        match (&*current, session) {
            // Rebinding the same session (a scope restoring it): nothing changes.
            (Some(a), Some(b)) if a.ptr_eq(b) => None,
            (None, None) => None,
            _ => {
                let old = core::mem::replace(current, session.cloned());
                shard.count_session_change(old.is_some(), session.is_some());
                old
            }
        }
    }

    /// Removes the entry of a terminated task and returns its session for the caller to drop;
    /// records a tombstone if the task's spawn was not seen (yet). An attachment of the entry
    /// is dropped here, after the lock is released: tables with attachments use
    /// [`terminated_with`](TaskTable::terminated_with).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{SessionMap, TaskTable};
    /// let table = TaskTable::new();
    /// let _ = table.spawned(5, Some(SessionMap::new().into()));
    /// assert!(table.terminated(5).is_some());
    /// assert_eq!((table.tasks(), table.sessions()), (0, 0));
    /// ```
    #[must_use = "the returned session must be dropped outside any lock or hook-sensitive code"]
    pub fn terminated(&self, id: u64) -> Option<AnySession> {
        self.terminated_with(id).0
    }

    /// [`terminated`](TaskTable::terminated), returning the entry's attachment too, for the
    /// caller to drop.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use localsession_core::TaskTable;
    /// let table = TaskTable::new();
    /// let _ = table.spawned_with(5, None, Some(Arc::new(())));
    /// let (session, attachment) = table.terminated_with(5);
    /// assert!(session.is_none() && attachment.is_some());
    /// assert_eq!(table.tasks(), 0);
    /// ```
    #[must_use = "the returned values must be dropped outside any lock or hook-sensitive code"]
    pub fn terminated_with(&self, id: u64) -> (Option<AnySession>, Option<TaskAttachment>) {
        let mut guard = self.shard(id).lock();
        let shard = &mut *guard;
        match shard.slots.remove(&id) {
            Some(Slot::Live(session, attachment)) => {
                shard.tasks -= 1;
                shard.count_session_change(session.is_some(), false);
                (session, attachment)
            }
            Some(Slot::Ended) => {
                // Terminated twice without a spawn: keep the one tombstone.
                shard.slots.insert(id, Slot::Ended);
                (None, None)
            }
            None => {
                if shard.tombstones.len() == Self::TOMBSTONES_PER_SHARD
                    && let Some(oldest) = shard.tombstones.pop_front()
                {
                    shard.slots.remove(&oldest);
                }
                shard.tombstones.push_back(id);
                shard.slots.insert(id, Slot::Ended);
                (None, None)
            }
        }
    }

    /// Clears the session of every live task whose session `keep` rejects (for example an
    /// ended request's session that an idle pooled-connection task still holds), and returns
    /// the cleared sessions for the caller to drop. `keep` runs outside the shard locks (it may
    /// be user code: [`AnySession::is_valid`] of a custom session); a task that rebound in the
    /// meantime keeps its new session.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{SessionMap, TaskTable};
    /// let table = TaskTable::new();
    /// let ended = SessionMap::new();
    /// let _ = table.spawned(1, Some(ended.clone().into()));
    /// let _ = table.spawned(2, Some(SessionMap::new().into()));
    /// ended.disable();
    /// let cleared = table.sweep(|s| s.is_valid());
    /// assert_eq!(cleared.len(), 1);
    /// assert_eq!((table.tasks(), table.sessions()), (2, 1));
    /// ```
    #[must_use = "the cleared sessions must be dropped outside any lock or hook-sensitive code"]
    pub fn sweep(&self, mut keep: impl FnMut(&AnySession) -> bool) -> Vec<AnySession> {
        let mut cleared = Vec::new();
        for shard in self.shards.iter() {
            let snapshot: Vec<(u64, AnySession)> = shard
                .lock()
                .slots
                .iter()
                .filter_map(|(id, slot)| match slot {
                    Slot::Live(Some(s), _) => Some((*id, s.clone())),
                    _ => None,
                })
                .collect();
            // `keep` runs unlocked; the snapshot's clones are dropped here, in the caller's
            // context (never a hook), as they go out of scope.
            let doomed: Vec<(u64, AnySession)> = snapshot.into_iter().filter(|(_, s)| !keep(s)).collect();
            if doomed.is_empty() {
                continue;
            }
            let mut guard = shard.lock();
            let locked = &mut *guard;
            for (id, seen) in &doomed {
                if let Some(Slot::Live(current, _)) = locked.slots.get_mut(id)
                    && current.as_ref().is_some_and(|c| c.ptr_eq(seen))
                    && let Some(old) = current.take()
                {
                    cleared.push(old);
                    locked.sessions -= 1;
                }
            }
            drop(guard);
        }
        cleared
    }

    /// Live tasks in the table.
    ///
    /// # Examples
    /// ```
    /// let table = localsession_core::TaskTable::new();
    /// let _ = table.spawned(1, None);
    /// assert_eq!(table.tasks(), 1);
    /// ```
    #[must_use]
    pub fn tasks(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().tasks).sum()
    }

    /// Live tasks in the table that hold a session.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{SessionMap, TaskTable};
    /// let table = TaskTable::new();
    /// let _ = table.spawned(1, None);
    /// let _ = table.spawned(2, Some(SessionMap::new().into()));
    /// assert_eq!(table.sessions(), 1);
    /// ```
    #[must_use]
    pub fn sessions(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().sessions).sum()
    }
}

impl Default for TaskTable {
    fn default() -> Self {
        TaskTable::new()
    }
}

impl fmt::Debug for TaskTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskTable").field("tasks", &self.tasks()).field("sessions", &self.sessions()).finish()
    }
}

fn mix(id: u64) -> u64 {
    id.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Hashes a `u64` id with one multiplication (ids are unique and sequential).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = mix(self.0 ^ u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = mix(n);
    }
}
