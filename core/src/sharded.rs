//! [`ShardedStore`]: Go's `SessionManager` — sessions keyed by an executor-supplied id.
//!
//! For executors that can name the running unit with a `u64` (a task id, a green-thread id, a
//! CPU number) but have no slot of their own to put a session in. Sessions live in
//! `shard_number` hash maps, each behind its own lock (a spin lock; loom's under loom) and on its own cache line
//! (crossbeam-utils' `CachePadded`); id `i` lives in shard `i % shard_number`, as in Go.
//!
//! # Garbage collection
//!
//! Go needs a GC because goroutines end without telling anyone; here an executor that knows a
//! task ended calls [`ShardedStore::remove`], and [`ShardedStore::gc`] sweeps the sessions that
//! became invalid. A sweep locks one shard at a time, only to copy its entries (cloning a handle
//! runs no user code) and later to remove the invalid ones that are still bound; user code —
//! `is_valid` of a user [`Session`](crate::Session), and the drop of a removed session — runs
//! with no lock held. A panicking `is_valid` therefore leaves the store fully usable;
//! [`ShardedStore::gc_with`] lets a caller with `std` catch such a panic and keep the entry (the
//! std adapter's GC thread does).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use crossbeam_utils::CachePadded;
use hashbrown::HashMap;

use crate::config::{ConfigError, ManagerOptions};
use crate::primitive::Mutex;
use crate::session::AnySession;
use crate::store::{BindError, ContextStore};

type Shard = CachePadded<Mutex<HashMap<u64, AnySession>>>;

/// Go's `SessionManager`: sessions keyed by execution-unit id, in shards.
///
/// # Examples
/// ```
/// use localsession_core::{Context, ManagerOptions, SessionCtx, ShardedStore};
///
/// let store = ShardedStore::new(ManagerOptions { shard_number: 10, ..Default::default() }, || None).unwrap();
/// let s = SessionCtx::new(&Context::background());
/// store.bind(7, s.clone());
/// assert!(store.get(7).is_some());
/// s.disable();
/// assert_eq!(store.gc(), 1);
/// assert!(store.get(7).is_none());
/// ```
pub struct ShardedStore {
    shards: Box<[Shard]>,
    current_id: Box<dyn Fn() -> Option<u64> + Send + Sync>,
    options: ManagerOptions,
}

impl ShardedStore {
    /// A store with `options.shard_number` shards; `current_id` names the running unit when the
    /// store is used as a [`ContextStore`] (return `None` outside any unit).
    ///
    /// `gc_interval` and `implicit_transmit` are kept for the adapters (the std adapter runs a
    /// GC thread for a store with a `gc_interval`); the core never starts threads.
    ///
    /// # Errors
    /// [`ConfigError`] if the options are invalid (`shard_number` 0, GC interval below 1 s).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ManagerOptions, ShardedStore};
    /// let bad = ManagerOptions { shard_number: 0, ..Default::default() };
    /// assert!(ShardedStore::new(bad, || None).is_err());
    /// ```
    pub fn new(
        options: ManagerOptions,
        current_id: impl Fn() -> Option<u64> + Send + Sync + 'static,
    ) -> Result<ShardedStore, ConfigError> {
        options.validate()?;
        let shards = (0..options.shard_number).map(|_| CachePadded::new(Mutex::new(HashMap::new()))).collect();
        Ok(ShardedStore { shards, current_id: Box::new(current_id), options })
    }

    /// The options the store was made with.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ManagerOptions, ShardedStore};
    /// let s = ShardedStore::new(ManagerOptions::default(), || None).unwrap();
    /// assert_eq!(s.options().shard_number, 100);
    /// ```
    #[must_use]
    pub fn options(&self) -> &ManagerOptions {
        &self.options
    }

    fn shard(&self, id: u64) -> &Shard {
        // The length is at least 1 (validated), and the remainder is below it.
        &self.shards[(id % self.shards.len() as u64) as usize]
    }

    /// Binds `session` to unit `id`, returning the previous one (Go `BindSession` with an id).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ManagerOptions, SessionMap, ShardedStore};
    /// let store = ShardedStore::new(ManagerOptions::default(), || None).unwrap();
    /// assert!(store.bind(1, SessionMap::new()).is_none());
    /// assert!(store.bind(1, SessionMap::new()).is_some());
    /// ```
    pub fn bind(&self, id: u64, session: impl Into<AnySession>) -> Option<AnySession> {
        let session = session.into();
        self.shard(id).lock().insert(id, session)
    }

    /// A clone of the session bound to unit `id` (Go `GetSession`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ManagerOptions, ShardedStore};
    /// let store = ShardedStore::new(ManagerOptions::default(), || None).unwrap();
    /// assert!(store.get(3).is_none());
    /// ```
    #[must_use]
    pub fn get(&self, id: u64) -> Option<AnySession> {
        self.shard(id).lock().get(&id).cloned()
    }

    /// Removes the session bound to unit `id` (Go `UnbindSession`; for executors: call it when
    /// a task ends).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ManagerOptions, SessionMap, ShardedStore};
    /// let store = ShardedStore::new(ManagerOptions::default(), || None).unwrap();
    /// store.bind(5, SessionMap::new());
    /// assert!(store.remove(5).is_some());
    /// assert!(store.remove(5).is_none());
    /// ```
    pub fn remove(&self, id: u64) -> Option<AnySession> {
        self.shard(id).lock().remove(&id)
    }

    /// Keeps only the bindings for which `keep(id, session)` is true. Like [`gc`](Self::gc),
    /// `keep` runs with no lock held.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ManagerOptions, SessionMap, ShardedStore};
    /// let store = ShardedStore::new(ManagerOptions::default(), || None).unwrap();
    /// for id in 0..10 { store.bind(id, SessionMap::new()); }
    /// assert_eq!(store.retain(|id, _| id % 2 == 0), 5);
    /// assert_eq!(store.len(), 5);
    /// ```
    pub fn retain(&self, keep: impl FnMut(u64, &AnySession) -> bool) -> usize {
        let (removed, to_drop) = self.retain_and_take(keep);
        // Sessions (and the copies taken to run `keep`) are dropped here, with no lock held.
        drop(to_drop);
        removed
    }

    /// [`retain`](Self::retain), handing back instead of dropping what it removed (and the
    /// copies it took to run `keep` on): how many bindings it removed, and the sessions for the
    /// caller to drop — one at a time under `catch_unwind`, say, so that a user `Drop` that
    /// panics neither stops the sweep nor, with a second one, aborts the process (the std
    /// adapter's GC thread does this).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ManagerOptions, SessionMap, ShardedStore};
    /// let store = ShardedStore::new(ManagerOptions::default(), || None).unwrap();
    /// for id in 0..4 { store.bind(id, SessionMap::new()); }
    /// let (removed, to_drop) = store.retain_and_take(|id, _| id < 1);
    /// assert_eq!((removed, store.len()), (3, 1));
    /// assert!(to_drop.len() >= 3);
    /// for session in to_drop { drop(session); }
    /// ```
    pub fn retain_and_take(&self, mut keep: impl FnMut(u64, &AnySession) -> bool) -> (usize, Vec<AnySession>) {
        let mut removed_total = 0;
        let mut to_drop = Vec::new();
        for shard in self.shards.iter() {
            let snapshot: Vec<(u64, AnySession)> = shard.lock().iter().map(|(id, s)| (*id, s.clone())).collect();
            let doomed: Vec<(u64, AnySession)> = snapshot.into_iter().filter(|(id, s)| !keep(*id, s)).collect();
            if doomed.is_empty() {
                continue;
            }
            {
                let mut map = shard.lock();
                for (id, s) in &doomed {
                    // Only if the same session is still bound (it may have been rebound since).
                    if map.get(id).is_some_and(|cur| cur.ptr_eq(s)) {
                        to_drop.extend(map.remove(id));
                        removed_total += 1;
                    }
                }
            }
            to_drop.extend(doomed.into_iter().map(|(_, s)| s));
        }
        (removed_total, to_drop)
    }

    /// Removes every invalid session (Go's GC sweep); returns how many were removed.
    ///
    /// # Panics
    /// If a user session's `is_valid` panics, the panic propagates and the shards after it are
    /// not swept this time; the store stays consistent and usable (no lock is held). Use
    /// [`gc_with`](Self::gc_with) to catch such panics.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, ManagerOptions, SessionCtx, SessionMap, ShardedStore};
    /// let store = ShardedStore::new(ManagerOptions::default(), || None).unwrap();
    /// let finished = SessionCtx::new(&Context::background());
    /// store.bind(1, finished.clone());
    /// store.bind(2, SessionMap::new());
    /// finished.disable();
    /// assert_eq!(store.gc(), 1);
    /// assert!(store.get(1).is_none() && store.get(2).is_some());
    /// ```
    ///
    /// See also [`ShardedStore`].
    pub fn gc(&self) -> usize {
        self.retain(|_, s| s.is_valid())
    }

    /// Like [`gc`](Self::gc), with the validity check supplied by the caller — e.g. one that
    /// catches a panicking user `is_valid` and keeps the entry.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ManagerOptions, SessionMap, ShardedStore};
    /// let store = ShardedStore::new(ManagerOptions::default(), || None).unwrap();
    /// store.bind(1, SessionMap::new());
    /// assert_eq!(store.gc_with(|_| false), 1);
    /// ```
    pub fn gc_with(&self, mut is_valid: impl FnMut(&AnySession) -> bool) -> usize {
        self.retain(|_, s| is_valid(s))
    }

    /// Bound sessions in all shards.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ManagerOptions, ShardedStore};
    /// assert_eq!(ShardedStore::new(ManagerOptions::default(), || None).unwrap().len(), 0);
    /// ```
    #[must_use]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no session is bound.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ManagerOptions, ShardedStore};
    /// assert!(ShardedStore::new(ManagerOptions::default(), || None).unwrap().is_empty());
    /// ```
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bound sessions per shard (for tests and metrics).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ManagerOptions, SessionMap, ShardedStore};
    /// let store = ShardedStore::new(ManagerOptions { shard_number: 2, ..Default::default() }, || None).unwrap();
    /// store.bind(0, SessionMap::new());
    /// assert_eq!(store.shard_lens(), vec![1, 0]);
    /// ```
    #[must_use]
    pub fn shard_lens(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.lock().len()).collect()
    }
}

impl ContextStore for ShardedStore {
    fn with_current(&self, f: &mut dyn FnMut(Option<&AnySession>)) {
        let cur = (self.current_id)().and_then(|id| self.get(id));
        f(cur.as_ref());
    }

    fn replace(&self, session: Option<AnySession>) -> Result<Option<AnySession>, BindError> {
        let Some(id) = (self.current_id)() else {
            return Err(BindError::new(session, "the sharded store's id function reports no running unit"));
        };
        Ok(self.exchange(id, session))
    }

    /// Asks the id function *before* moving anything: if it panics (it is the embedder's
    /// code), `*session` is still the caller's and the unit's binding is untouched. (The
    /// default `swap` moves the session into `replace` first, so such a panic lost it.)
    fn swap(&self, session: &mut Option<AnySession>) -> bool {
        let Some(id) = (self.current_id)() else { return false };
        *session = self.exchange(id, session.take());
        true
    }
}

impl ShardedStore {
    /// Binds `session` to unit `id` (or unbinds it for `None`); returns the previous binding.
    fn exchange(&self, id: u64, session: Option<AnySession>) -> Option<AnySession> {
        match session {
            Some(s) => self.bind(id, s),
            None => self.remove(id),
        }
    }
}

impl fmt::Debug for ShardedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedStore").field("options", &self.options).field("len", &self.len()).finish()
    }
}
