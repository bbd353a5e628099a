//! [`ShardedManager`]: a [`ShardedStore`] (Go's `SessionManager`) with its GC thread.
//!
//! Go starts a GC goroutine per manager and never stops it. Here the thread sleeps on a
//! condition variable for `gc_interval` between sweeps and stops as soon as the manager is
//! [closed](ShardedManager::close) or dropped. A user session whose `is_valid` panics is kept
//! (the sweep catches the panic and goes on with the other sessions).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use localsession_core::config::{ConfigError, ManagerOptions};
use localsession_core::{AnySession, ShardedStore};

/// A [`ShardedStore`] plus a GC thread when the options ask for a `gc_interval`.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use localsession_core::{Context, ManagerOptions, SessionCtx};
/// use localsession_std::ShardedManager;
///
/// let opts = ManagerOptions { shard_number: 4, gc_interval: Some(Duration::from_secs(1)), ..Default::default() };
/// let manager = ShardedManager::new(opts, || None).unwrap();
/// let s = SessionCtx::new(&Context::background());
/// manager.store().bind(1, s.clone());
/// s.disable();
/// // The GC thread removes it within a second; `gc()` does it now.
/// assert_eq!(manager.store().gc(), 1);
/// manager.close();
/// ```
#[derive(Debug)]
pub struct ShardedManager {
    store: Arc<ShardedStore>,
    gc: Option<GcThread>,
}

#[derive(Debug)]
struct GcThread {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: JoinHandle<()>,
    sweeps: Arc<AtomicU64>,
}

impl ShardedManager {
    /// A store with `options.shard_number` shards, `current_id` naming the running unit, and a
    /// GC thread sweeping invalid sessions every `options.gc_interval` (none if `None`).
    ///
    /// # Errors
    /// [`ConfigError`] for invalid options.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ContextStore, ManagerOptions, SessionMap};
    /// use localsession_std::{thread_id, ShardedManager};
    ///
    /// let opts = ManagerOptions { gc_interval: None, ..Default::default() };
    /// let manager = ShardedManager::new(opts, || Some(thread_id())).unwrap();
    /// manager.store().replace(Some(SessionMap::new().into())).unwrap(); // keyed by this thread's id
    /// assert!(manager.store().get(thread_id()).is_some());
    /// assert_eq!(manager.gc_sweeps(), 0); // no `gc_interval`: no GC thread
    /// ```
    pub fn new(
        options: ManagerOptions,
        current_id: impl Fn() -> Option<u64> + Send + Sync + 'static,
    ) -> Result<ShardedManager, ConfigError> {
        let store = Arc::new(ShardedStore::new(options, current_id)?);
        let gc = options.gc_interval.map(|interval| GcThread::start(Arc::clone(&store), interval));
        Ok(ShardedManager { store, gc })
    }

    /// A manager with the default manager's options (after `init_default_manager`; Go's
    /// defaults otherwise), keyed by [`thread_id`].
    ///
    /// # Errors
    /// [`ConfigError`] for invalid options.
    ///
    /// # Examples
    /// ```
    /// let m = localsession_std::ShardedManager::from_default_options().unwrap();
    /// assert_eq!(m.store().options().shard_number, 100);
    /// ```
    pub fn from_default_options() -> Result<ShardedManager, ConfigError> {
        let opts = crate::manager_options().unwrap_or_default();
        ShardedManager::new(opts, || Some(thread_id()))
    }

    /// The store (shareable: register it, or hand it to an executor).
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use localsession_core::{ManagerOptions, SessionMap};
    /// use localsession_std::ShardedManager;
    ///
    /// let manager = ShardedManager::new(ManagerOptions::default(), || None).unwrap();
    /// let store = Arc::clone(manager.store()); // e.g. for an executor's task-exit hook
    /// store.bind(1, SessionMap::new());
    /// assert_eq!(manager.store().len(), 1);
    /// assert!(store.remove(1).is_some());
    /// ```
    #[must_use]
    pub fn store(&self) -> &Arc<ShardedStore> {
        &self.store
    }

    /// How many GC sweeps have run so far.
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// use localsession_core::{ManagerOptions, SessionMap};
    /// use localsession_std::ShardedManager;
    ///
    /// let opts = ManagerOptions { gc_interval: Some(Duration::from_secs(1)), ..Default::default() };
    /// let manager = ShardedManager::new(opts, || None).unwrap();
    /// let session = SessionMap::new();
    /// manager.store().bind(1, session.clone());
    /// session.disable();
    /// while manager.gc_sweeps() == 0 {
    ///     std::thread::sleep(Duration::from_millis(20));
    /// }
    /// assert!(manager.store().is_empty()); // swept by the GC thread
    /// ```
    #[must_use]
    pub fn gc_sweeps(&self) -> u64 {
        self.gc.as_ref().map_or(0, |g| g.sweeps.load(Ordering::Relaxed))
    }

    /// Stops the GC thread and waits for it (also done on drop).
    ///
    /// # Examples
    /// ```
    /// use std::time::{Duration, Instant};
    /// use localsession_core::ManagerOptions;
    /// use localsession_std::ShardedManager;
    ///
    /// let manager = ShardedManager::new(ManagerOptions::default(), || None).unwrap(); // GC every 10 min
    /// let started = Instant::now();
    /// manager.close(); // wakes the GC thread and joins it: no 10-minute wait
    /// assert!(started.elapsed() < Duration::from_secs(5));
    /// ```
    pub fn close(mut self) {
        self.stop_gc();
    }

    fn stop_gc(&mut self) {
        if let Some(gc) = self.gc.take() {
            {
                let (stopped, wake) = &*gc.stop;
                *stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
                wake.notify_all();
            }
            // The GC thread catches user panics, so it does not panic itself.
            let _ = gc.handle.join();
        }
    }
}

impl Drop for ShardedManager {
    fn drop(&mut self) {
        self.stop_gc();
    }
}

impl GcThread {
    fn start(store: Arc<ShardedStore>, interval: Duration) -> GcThread {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let sweeps = Arc::new(AtomicU64::new(0));
        let (stop2, sweeps2) = (Arc::clone(&stop), Arc::clone(&sweeps));
        let handle = std::thread::Builder::new()
            .name("localsession-gc".into())
            .spawn(move || {
                let (stopped, wake) = &*stop2;
                let mut guard = stopped.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    let (g, _) = wake
                        .wait_timeout_while(guard, interval, |stopped| !*stopped)
                        .unwrap_or_else(PoisonError::into_inner);
                    if *g {
                        return;
                    }
                    drop(g);
                    sweep_caught(&store);
                    sweeps2.fetch_add(1, Ordering::Relaxed);
                    guard = stopped.lock().unwrap_or_else(PoisonError::into_inner);
                }
            })
            .expect("failed to start the localsession GC thread");
        GcThread { stop, handle, sweeps }
    }
}

/// One GC sweep in which no user code can stop the thread: `is_valid` is caught (the session is
/// kept), and each removed session is dropped on its own under `catch_unwind` — a `Drop` that
/// panics is reported by the panic hook and the sweep goes on (it used to end the GC thread for
/// good, and two such drops in one shard aborted the process).
fn sweep_caught(store: &ShardedStore) {
    let (_, to_drop) = store.retain_and_take(|_, s| is_valid_or_keep(s));
    for session in to_drop {
        let _ = catch_unwind(AssertUnwindSafe(move || drop(session)));
    }
}

/// `is_valid`, keeping the session if it panics.
fn is_valid_or_keep(s: &AnySession) -> bool {
    catch_unwind(AssertUnwindSafe(|| s.is_valid())).unwrap_or(true)
}

/// A process-unique `u64` for the calling thread (for [`ShardedStore`]s keyed by thread).
///
/// # Examples
/// ```
/// let a = localsession_std::thread_id();
/// let b = std::thread::spawn(localsession_std::thread_id).join().unwrap();
/// assert_ne!(a, b);
/// assert_eq!(a, localsession_std::thread_id());
/// ```
#[must_use]
pub fn thread_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    ID.with(|id| *id)
}
