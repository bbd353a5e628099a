//! What the criterion benchmark (`sessions.rs`) and the instruction-count program
//! (`examples/ops.rs`) share, included by both with `#[path]` so that both measure the same
//! code: the floors — the least a technique costs with none of localsession's work, measured next
//! to ours so that a target can be compared with what the technique allows — the OpenTelemetry
//! context of P9's session, and P4's session of a given depth.

use std::sync::atomic::Ordering;

use localsession_core::{Context, Key, SessionCtx};

/// Typed keys to bind above the key under test (P3, P4).
pub(crate) static FILLER: [Key<u64>; 64] = [const { Key::new("filler") }; 64];

/// A session context of `depth` typed bindings with `key` bound first (deepest, value 7) and
/// [`FILLER`] keys above it: P4's `get` at depth.
pub(crate) fn session_of_depth(key: &'static Key<u64>, depth: usize) -> SessionCtx {
    let mut s = SessionCtx::new(&Context::background()).with(key, 7);
    for filler in FILLER.iter().take(depth - 1) {
        s = s.with(filler, 1);
    }
    s
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

impl Default for EpochFloor {
    fn default() -> Self {
        EpochFloor::new()
    }
}

impl Drop for EpochFloor {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader or writer is left; the last node is ours to free.
        drop(unsafe { self.0.load(Ordering::Relaxed, crossbeam_epoch::unprotected()).into_owned() });
    }
}

/// The OpenTelemetry context P9's session carries: a remote, sampled span context, as a request
/// that arrived with a `traceparent` header has.
#[cfg(tokio_unstable)]
pub(crate) fn p9_remote_context() -> opentelemetry::Context {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    let remote = SpanContext::new(
        TraceId::from_bytes([1; 16]),
        SpanId::from_bytes([2; 8]),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(remote)
}

/// The least an implicit mode built on tokio's task hooks can do, as a floor under P6 implicit.
/// The hooks pass only the task's id, so: the spawn hook stores a clone of the spawner's session
/// (the one the polling thread runs with, else the thread's `localsession_std` binding) in a
/// table keyed by id (16 cache-padded spin-locked shards, as `TaskTable`), the before-poll hook
/// makes the entry's session the thread's, the after-poll hook puts the thread's previous one
/// back, and the terminate hook removes the entry. Nothing else: no recording of a task's own
/// binds, no flow suppression, no protection against panics in hooks, no bridges, no
/// generations — so it is not a usable implicit mode, only the cost of the technique. Measured
/// like implicit mode: the measuring task and every child inherit through the table.
///
/// Two variants of the per-poll step: *cloning* (the before-poll hook clones the entry's
/// session, the after-poll hook drops the clone: what localsession does) and *borrowing* (the
/// before-poll hook copies the entry's handle without touching its reference count, the
/// after-poll hook forgets the copy: no reference-count traffic per poll).
#[cfg(tokio_unstable)]
pub(crate) mod floor_hooks {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::hash::{BuildHasherDefault, Hash, Hasher};
    use std::mem::ManuallyDrop;
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
        /// The session of the task being polled here (cloning variant).
        static CURRENT: RefCell<Option<AnySession>> = const { RefCell::new(None) };
        static SAVED: RefCell<Vec<Option<AnySession>>> = const { RefCell::new(Vec::new()) };
        /// A copy of the handle of the polled task's entry (borrowing variant).
        static BORROWED: RefCell<Option<ManuallyDrop<AnySession>>> = const { RefCell::new(None) };
        static SAVED_BORROWED: RefCell<Vec<Option<ManuallyDrop<AnySession>>>> = const { RefCell::new(Vec::new()) };
    }

    fn shard(meta: &TaskMeta<'_>) -> (u64, &'static Shard) {
        let mut h = IdHasher::default();
        meta.id().hash(&mut h);
        (h.0, &TABLE[(h.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize])
    }

    /// The spawner's session: the polled task's, else the thread's binding (the first spawn,
    /// from `block_on` inside `localsession_std::scope`).
    fn spawner_session() -> Option<AnySession> {
        CURRENT
            .with(|c| c.borrow().clone())
            .or_else(|| BORROWED.with(|b| b.borrow().as_deref().cloned()))
            .or_else(localsession_std::current)
    }

    pub(crate) fn install(b: &mut Builder, borrowed: bool) {
        b.on_task_spawn(|m| {
            let (id, shard) = shard(m);
            let session = spawner_session();
            shard.lock().insert(id, session);
        });
        if borrowed {
            b.on_before_task_poll(|m| {
                let (id, shard) = shard(m);
                // SAFETY: a bitwise copy of the entry's handle, never dropped (`ManuallyDrop`)
                // and only cloned by the spawn hook during this task's poll, while the entry
                // (removed by the terminate hook, which in this benchmark runs only at the end
                // of a task's last poll, after its last spawn) still owns the reference.
                let copy = shard
                    .lock()
                    .get(&id)
                    .and_then(|s| s.as_ref().map(|s| ManuallyDrop::new(unsafe { std::ptr::read(s) })));
                let previous = BORROWED.with(|c| c.replace(copy));
                SAVED_BORROWED.with(|s| s.borrow_mut().push(previous));
            })
            .on_after_task_poll(|_| {
                let previous = SAVED_BORROWED.with(|s| s.borrow_mut().pop()).flatten();
                BORROWED.with(|c| c.replace(previous));
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
