//! The floors of the benchmark suite: the least a technique costs with none of localsession's
//! work, measured next to ours so that a target can be compared with what the technique allows.
//! Included (`#[path]`) by the criterion benchmark (`sessions.rs`) and by the instruction-count
//! program (`examples/ops.rs`), so that both measure the same code.

use std::sync::atomic::Ordering;

impl Default for EpochFloor {
    fn default() -> Self {
        EpochFloor::new()
    }
}

/// The least a read and a write cost in the shape `SessionMap` must keep (an atomic root, epoch
/// reclamation, one allocation per write), with none of a map's work: a write pins, allocates one
/// node holding the key and the value, swaps it in with one read-modify-write of the root and
/// defers freeing the node it replaced; a read pins, loads the root and reads the node. One
/// binding, not a map: the floor under P5's insert and read (the peer does a lock, a SipHash and
/// a hash-table probe instead).
pub(crate) struct EpochFloor(crossbeam_epoch::Atomic<(u64, u64)>);

impl EpochFloor {
    pub(crate) fn new() -> EpochFloor {
        EpochFloor(crossbeam_epoch::Atomic::new((0, 0)))
    }
    pub(crate) fn insert(&self, k: u64, v: u64) {
        let guard = crossbeam_epoch::pin();
        let old = self.0.swap(crossbeam_epoch::Owned::new((k, v)), Ordering::AcqRel, &guard);
        // SAFETY: `old` is unlinked by the swap; readers pinned before it may still hold it, and
        // it is freed only after they have all unpinned.
        unsafe { guard.defer_destroy(old) };
    }
    pub(crate) fn read(&self, k: u64) -> u64 {
        let guard = crossbeam_epoch::pin();
        // SAFETY: never null (made with a node, only ever swapped for another); alive while pinned.
        let (key, value) = unsafe { *self.0.load(Ordering::Acquire, &guard).deref() };
        if key == k { value } else { 0 }
    }
}

impl Drop for EpochFloor {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader or writer is left; the last node is ours to free.
        drop(unsafe { self.0.load(Ordering::Relaxed, crossbeam_epoch::unprotected()).into_owned() });
    }
}

/// The least an implicit mode built on tokio's task hooks can do, as a floor under P6 implicit.
/// The hooks pass only the task's id, so: the spawn hook stores a clone of the spawner's session
/// in a table keyed by id (16 cache-padded spin-locked shards, as `TaskTable`), the before-poll
/// hook clones it into a thread-local, the after-poll hook puts the thread's previous value back
/// (dropping the clone) and the terminate hook removes the entry. Nothing else: no recording of
/// a task's own binds, no flow suppression, no protection against panics in hooks, no bridges,
/// no generations — so it is not a usable implicit mode, only the cost of the technique.
#[cfg(tokio_unstable)]
pub(crate) mod floor_hooks {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::hash::{BuildHasherDefault, Hash, Hasher};
    use std::sync::LazyLock;

    use crossbeam_utils::CachePadded;
    use localsession_core::AnySession;
    use tokio::runtime::{Builder, TaskMeta};

    #[derive(Default)]
    struct IdHasher(u64);
    impl Hasher for IdHasher {
        fn finish(&self) -> u64 {
            self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 << 8) | u64::from(*b);
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = n;
        }
    }

    type Shard = CachePadded<spin::Mutex<HashMap<u64, Option<AnySession>, BuildHasherDefault<IdHasher>>>>;
    static TABLE: LazyLock<[Shard; 16]> =
        LazyLock::new(|| std::array::from_fn(|_| CachePadded::new(spin::Mutex::new(HashMap::default()))));

    thread_local! {
        static CURRENT: RefCell<Option<AnySession>> = const { RefCell::new(None) };
        static SAVED: RefCell<Vec<Option<AnySession>>> = const { RefCell::new(Vec::new()) };
        static BORROWED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        static SAVED_BORROWED: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    }

    fn shard(meta: &TaskMeta<'_>) -> (u64, &'static Shard) {
        let mut h = IdHasher::default();
        meta.id().hash(&mut h);
        (h.0, &TABLE[(h.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize])
    }

    /// `borrowed`: the before-poll hook only notes where the entry's session is (what a
    /// worker slot that *borrows* the entry's session would do) instead of cloning it, and the
    /// after-poll hook has nothing to drop: the floor of that design. The noted address is never
    /// dereferenced (nothing in the benchmark reads the session), so no lifetime is asserted.
    pub(crate) fn install(b: &mut Builder, borrowed: bool) {
        b.on_task_spawn(|m| {
            let (id, shard) = shard(m);
            // The spawner's session: the measuring task's, installed by its `WithSession`.
            let session = localsession_std::current();
            shard.lock().insert(id, session);
        });
        if borrowed {
            b.on_before_task_poll(|m| {
                let (id, shard) = shard(m);
                let at = shard.lock().get(&id).and_then(|s| s.as_ref().map(|s| std::ptr::from_ref(s) as usize));
                let previous = BORROWED.with(|c| c.replace(at.unwrap_or(0)));
                SAVED_BORROWED.with(|s| s.borrow_mut().push(previous));
            })
            .on_after_task_poll(|_| {
                let previous = SAVED_BORROWED.with(|s| s.borrow_mut().pop()).unwrap_or(0);
                BORROWED.with(|c| c.set(previous));
            });
        } else {
            b.on_before_task_poll(|m| {
                let (id, shard) = shard(m);
                let session = shard.lock().get(&id).cloned().flatten();
                let previous = CURRENT.with(|c| c.replace(session));
                SAVED.with(|s| s.borrow_mut().push(previous));
            })
            .on_after_task_poll(|_| {
                let previous = SAVED.with(|s| s.borrow_mut().pop()).flatten();
                drop(CURRENT.with(|c| c.replace(previous)));
            });
        }
        b.on_task_terminate(|m| {
            let (id, shard) = shard(m);
            let removed = shard.lock().remove(&id);
            drop(removed);
        });
    }
}
