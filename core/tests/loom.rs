//! Loom models of every atomic protocol in the core.
//!
//! Run with (as `.ci/run` does; the protocols are described in `docs/architecture.md`):
//! `RUSTFLAGS="--cfg localsession_loom --cfg crossbeam_loom" LOOM_MAX_PREEMPTIONS=3 \
//!  CARGO_TARGET_DIR=target/loom cargo test -p localsession-core --test loom --release`
//!
//! Under `--cfg localsession_loom` the crate's atomics, `UnsafeCell`s and locks are loom's
//! (`src/primitive.rs`) and crossbeam-epoch's are too (`crossbeam_loom`), so loom explores
//! every interleaving of the protocols below up to the preemption bound. Node reference counts
//! stay on `core` atomics: they follow `Arc`'s protocol (see `src/node.rs`).
#![cfg(localsession_loom)]
#![allow(missing_docs)]

use std::sync::atomic::AtomicUsize as StdAtomicUsize;

use loom::sync::Arc;
use loom::thread;

use localsession_core::{AnySession, Context, ContextError, ManagerOptions, SessionCtx, SessionMap, ShardedStore};

/// Runs a model (bounded to 2 preemptions unless `LOOM_MAX_PREEMPTIONS` says otherwise) and
/// prints how many interleavings loom explored.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    let iterations = std::sync::Arc::new(StdAtomicUsize::new(0));
    let counter = iterations.clone();
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    println!("loom explored {} interleavings", iterations.load(std::sync::atomic::Ordering::Relaxed));
}

/// `fork` and `with_value` racing with `disable`: once both are done, every derived session is
/// invalid — a fork registered concurrently is never missed by the cancel.
#[test]
fn fork_vs_disable() {
    model(|| {
        let root = SessionCtx::new(&Context::background());
        let r2 = root.clone();
        let t = thread::spawn(move || {
            let fork = r2.fork();
            let derived = r2.with_value(1u8, 1u8);
            (fork, derived)
        });
        assert!(root.disable());
        let (fork, derived) = t.join().unwrap();
        assert!(!fork.is_valid());
        assert!(!derived.is_valid());
        assert_eq!(fork.err(), Some(ContextError::Canceled));
    });
}

/// A reader that observes invalidity also observes the cause (Release/Acquire on `state`).
#[test]
fn is_valid_vs_disable_publishes_cause() {
    model(|| {
        let s = SessionCtx::new(&Context::background()).fork();
        let s2 = s.clone();
        let t = thread::spawn(move || {
            if !s2.is_valid() {
                assert_eq!(s2.err(), Some(ContextError::Canceled));
            }
        });
        s.disable();
        t.join().unwrap();
    });
}

/// Two cancels of the same scope: exactly one wins.
#[test]
fn concurrent_cancels_have_one_winner() {
    model(|| {
        let (ctx, cancel) = Context::background().with_cancel();
        let c2 = cancel.clone();
        let t = thread::spawn(move || c2.cancel());
        let mine = cancel.cancel();
        let theirs = t.join().unwrap();
        assert!(mine ^ theirs);
        assert!(ctx.is_done());
    });
}

/// Two cancels of a root with a child and a grandchild: whichever wins, once either cancel has
/// returned (`true` or `false`), the child and the grandchild are cancelled. Go's losing cancel
/// blocks on the mutex the winner holds while it cancels the children; here the loser waits for
/// the winner's `propagating` flag (`src/scope.rs`, `ScopeNode::wait_propagated`). Before, the
/// loser returned as soon as it saw the root cancelled, while the winner was still settling the
/// child.
#[test]
fn losing_cancel_returns_after_the_subtree() {
    model(|| {
        let (root, cancel) = Context::background().with_cancel();
        let (child, _c) = root.with_cancel();
        let (grandchild, _g) = child.with_cancel();
        let cancelled_below = move |child: &Context, grandchild: &Context| {
            assert_eq!(child.err(), Some(ContextError::Canceled), "a cancel returned before the child was cancelled");
            assert_eq!(grandchild.err(), Some(ContextError::Canceled), "a cancel returned before the grandchild was");
        };
        let c2 = cancel.clone();
        let (child2, grandchild2) = (child.clone(), grandchild.clone());
        let t = thread::spawn(move || {
            let won = c2.cancel();
            cancelled_below(&child2, &grandchild2);
            won
        });
        let mine = cancel.cancel();
        cancelled_below(&child, &grandchild);
        let theirs = t.join().unwrap();
        assert!(mine ^ theirs);
        assert_eq!(root.err(), Some(ContextError::Canceled));
    });
}

/// One thread cancels the root while another cancels the child (which has a grandchild). When
/// the root's cancel returns, the child and the grandchild are cancelled — also when the root's
/// cancel found the child settled by the other thread, whose propagation to the grandchild it
/// then waits for; when the child's cancel returns, the grandchild is cancelled.
#[test]
fn cancel_of_a_child_vs_cancel_of_the_root() {
    model(|| {
        let (root, cancel) = Context::background().with_cancel();
        let (child, child_cancel) = root.with_cancel();
        let (grandchild, _g) = child.with_cancel();
        let grandchild2 = grandchild.clone();
        let t = thread::spawn(move || {
            child_cancel.cancel();
            assert!(grandchild2.is_done(), "the child's cancel returned before the grandchild was cancelled");
        });
        assert!(cancel.cancel());
        assert!(child.is_done(), "the root's cancel returned before the child was cancelled");
        assert!(grandchild.is_done(), "the root's cancel returned before the grandchild was cancelled");
        t.join().unwrap();
        assert_eq!(grandchild.err(), Some(ContextError::Canceled));
    });
}

/// `done()` registration racing with cancel: the waiting thread always wakes (loom reports a
/// deadlock if the wake-up is lost).
#[test]
fn done_vs_cancel() {
    model(|| {
        let (ctx, cancel) = Context::background().with_cancel();
        let (child, _h) = ctx.with_cancel();
        let t = thread::spawn(move || {
            loom::future::block_on(child.done());
            assert!(child.is_done());
        });
        cancel.cancel();
        t.join().unwrap();
    });
}

/// `after_cancel` racing with cancel and with `stop`: the callback runs exactly once, or never
/// and then `stop` says it stopped it.
#[test]
fn after_cancel_vs_cancel_vs_stop() {
    model(|| {
        let (ctx, cancel) = Context::background().with_cancel();
        let ran = std::sync::Arc::new(StdAtomicUsize::new(0));
        let r = ran.clone();
        let handle = ctx.after_cancel(move || {
            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let t = thread::spawn(move || cancel.cancel());
        let stopped = handle.stop();
        t.join().unwrap();
        let runs = ran.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(runs, usize::from(!stopped));
    });
}

/// A child scope dropped while its parent is cancelled: the parent either cancels it or skips
/// it, and the child's detach never touches a list the cancel took.
#[test]
fn child_drop_vs_parent_cancel() {
    model(|| {
        let (root, cancel) = Context::background().with_cancel();
        let (child, child_cancel) = root.with_cancel();
        let (keep, _h) = root.with_cancel();
        let t = thread::spawn(move || {
            drop(child);
            drop(child_cancel);
        });
        cancel.cancel();
        t.join().unwrap();
        assert!(keep.is_done());
    });
}

/// Concurrent writers on one `SessionMap`, with a concurrent reader and compaction (the
/// threshold is 2 writes under loom): no update is lost, the reader sees either nothing or the
/// written value, and old chains are reclaimed through the epoch.
#[test]
fn map_concurrent_writers() {
    model(|| {
        let map = SessionMap::new();
        map.insert(0u8, 0u32);
        let m1 = map.clone();
        let w1 = thread::spawn(move || m1.insert(1u8, 10u32));
        map.insert(2u8, 20u32);
        let seen = map.read(&1u8, |v: Option<&u32>| v.copied());
        assert!(seen.is_none() || seen == Some(10));
        w1.join().unwrap();
        assert_eq!(map.value::<u32, _>(&0u8).as_deref(), Some(&0));
        assert_eq!(map.value::<u32, _>(&1u8).as_deref(), Some(&10));
        assert_eq!(map.value::<u32, _>(&2u8).as_deref(), Some(&20));
    });
}

/// Old chains freed a few nodes per write (`SessionMap::free_graves`'s dying list) while two
/// writers race and a reader holds a borrow. Before the threads start, the epoch is flushed so
/// that two compactions' graves ripen inside the model; then both writers race to move them to
/// the dying list and free a node each (one per write under loom), contending for its
/// `try_lock`, while a compaction may add a grave. A value is never dropped while a reader
/// borrows it, and every value is dropped exactly once by the time the map is gone.
#[test]
fn map_dying_list_vs_writers_and_reader() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static CREATED: StdAtomicUsize = StdAtomicUsize::new(0);
    static DROPPED: StdAtomicUsize = StdAtomicUsize::new(0);
    struct Tracked(AtomicBool);
    impl Tracked {
        fn new() -> Tracked {
            CREATED.fetch_add(1, Ordering::Relaxed);
            Tracked(AtomicBool::new(true))
        }
    }
    impl Drop for Tracked {
        fn drop(&mut self) {
            assert!(self.0.swap(false, Ordering::Relaxed), "dropped twice");
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
    model(|| {
        CREATED.store(0, Ordering::Relaxed);
        DROPPED.store(0, Ordering::Relaxed);
        let map = SessionMap::new();
        // Two compactions (after writes 2 and 6: the threshold is max(2, 2 x live keys) under
        // loom), then enough epoch flushes for both graves to ripen: the threads' writes find
        // them, move them to the dying list and free one node each.
        for i in 0..6u8 {
            map.insert(i % 2, Tracked::new());
        }
        localsession_core::loom_collect();
        let m = map.clone();
        let writer = thread::spawn(move || m.insert(0u8, Tracked::new()));
        map.read(&1u8, |v: Option<&Tracked>| assert!(v.is_some_and(|t| t.0.load(Ordering::Relaxed))));
        map.insert(1u8, Tracked::new());
        writer.join().unwrap();
        drop(map);
        assert_eq!(DROPPED.load(Ordering::Relaxed), CREATED.load(Ordering::Relaxed));
    });
}

/// `remove` racing with `insert` of the same key: the result is one of the two orders.
#[test]
fn map_remove_vs_insert() {
    model(|| {
        let map = SessionMap::new();
        map.insert(0u8, 0u32);
        let m = map.clone();
        let t = thread::spawn(move || m.remove(&0u8));
        map.insert(0u8, 1u32);
        let removed = t.join().unwrap();
        assert!(removed);
        // Either the insert came last (value 1) or the remove did (absent).
        let v = map.value::<u32, _>(&0u8).map(|v| *v);
        assert!(v == Some(1) || v.is_none());
    });
}

/// Snapshots taken while writers and compaction run stay consistent.
#[test]
fn map_export_vs_writer() {
    model(|| {
        let map = SessionMap::new();
        map.insert(1u8, 1u32);
        let m = map.clone();
        let w = thread::spawn(move || {
            m.insert(1u8, 2u32);
            m.insert(2u8, 2u32);
        });
        let snap = map.export();
        let v1 = *snap.value::<u32, _>(&1u8).unwrap();
        let v2 = snap.value::<u32, _>(&2u8).copied();
        // Writes are ordered: seeing key 2 implies seeing the second value of key 1.
        assert!(v2.is_none() || v1 == 2);
        w.join().unwrap();
        assert_eq!(snap.value::<u32, _>(&1u8), Some(&v1));
    });
}

/// `ShardedStore` bind/remove racing with a GC sweep: a session rebound after the sweep's
/// snapshot is never removed by it, and invalid ones are.
#[test]
fn sharded_bind_vs_gc() {
    model(|| {
        let store =
            Arc::new(ShardedStore::new(ManagerOptions { shard_number: 1, ..Default::default() }, || None).unwrap());
        let dead = SessionCtx::new(&Context::background());
        dead.disable();
        store.bind(1, dead.clone());
        store.bind(2, dead);
        let fresh: AnySession = SessionCtx::new(&Context::background()).into();
        let s = store.clone();
        let f = fresh.clone();
        let binder = thread::spawn(move || {
            s.bind(1, f);
            s.remove(2);
        });
        store.gc();
        binder.join().unwrap();
        assert!(store.get(1).is_some_and(|s| s.ptr_eq(&fresh)), "a valid rebinding was swept");
        assert!(store.get(2).is_none());
    });
}

/// The implicit-mode hook protocol on a [`TaskTable`](localsession_core::TaskTable), with the
/// orderings tokio allows: worker A polls the task, which binds a new session, and goes idle
/// (the `RUNNING` bit released); worker B then polls it — while A's after-poll hook may still
/// be pending — and the task completes there (terminate). B's before-poll must read the
/// binding A's poll made, and the table must end empty, whenever A's after-poll runs.
#[test]
fn task_table_late_after_poll() {
    use localsession_core::TaskTable;
    use loom::sync::atomic::{AtomicBool, Ordering};
    model(|| {
        let table = Arc::new(TaskTable::new());
        let first = SessionMap::new().with_value("n", 0u8);
        drop(table.spawned(1, Some(first.into()))); // spawn hook
        let idle = Arc::new(AtomicBool::new(false));
        let (ta, ia) = (table.clone(), idle.clone());
        let a = thread::spawn(move || {
            let installed = ta.session(1); // before-poll
            let mine: AnySession = SessionMap::new().with_value("n", 1u8).into();
            drop(ta.rebind(1, Some(&mine))); // the task binds during its poll
            // Release: the task state's transition to idle orders the poll before the next one.
            ia.store(true, Ordering::Release);
            // After-poll (late or not): restores the worker's slot; the table is not touched.
            drop(installed);
            drop(mine);
        });
        let next_poll = |table: &TaskTable| {
            let seen = table.session(1).and_then(|s| s.value_cloned::<u8, _>(&"n"));
            assert_eq!(seen, Some(1), "the next poll must see the binding the previous poll made");
            drop(table.terminated(1)); // the task completes in this poll
        };
        let (tb, ib) = (table.clone(), idle.clone());
        let b = thread::spawn(move || {
            // Acquire: the next poll starts only once the task is idle again; if it is not
            // yet, the next poll happens later (below), after worker A finished.
            let ran = ib.load(Ordering::Acquire);
            if ran {
                next_poll(&tb);
            }
            ran
        });
        a.join().unwrap();
        if !b.join().unwrap() {
            next_poll(&table);
        }
        assert_eq!((table.tasks(), table.sessions()), (0, 0));
    });
}

/// Terminate before spawn (a runtime shutting down): whichever runs first, no entry remains.
#[test]
fn task_table_terminate_vs_spawn() {
    use localsession_core::TaskTable;
    model(|| {
        let table = Arc::new(TaskTable::new());
        let t = table.clone();
        let terminate = thread::spawn(move || drop(t.terminated(7)));
        let handed_back = table.spawned(7, Some(SessionMap::new().into()));
        terminate.join().unwrap();
        assert_eq!((table.tasks(), table.sessions()), (0, 0));
        drop(handed_back);
    });
}

/// A stale bind (a caller that still believes it runs the task) racing the task's terminate
/// never resurrects the entry; a sweep racing a rebind never clears the new binding.
#[test]
fn task_table_late_rebind_and_sweep() {
    use localsession_core::TaskTable;
    model(|| {
        let table = Arc::new(TaskTable::new());
        let ended = SessionMap::new();
        drop(table.spawned(1, Some(ended.clone().into())));
        drop(table.spawned(2, Some(ended.clone().into())));
        ended.disable();
        let t = table.clone();
        let late = thread::spawn(move || {
            let s: AnySession = SessionMap::new().into();
            drop(t.rebind(1, Some(&s)));
            drop(t.rebind(2, Some(&s)));
        });
        drop(table.terminated(1));
        drop(table.sweep(|s| s.is_valid()));
        late.join().unwrap();
        assert_eq!(table.tasks(), 1, "task 1 ended: a late rebind must not bring it back");
        // Task 2 holds the new, valid session whatever the order of the sweep and the rebind.
        assert!(table.session(2).is_some_and(|s| s.is_valid()));
        drop(table.terminated(2));
        assert_eq!((table.tasks(), table.sessions()), (0, 0));
    });
}

/// `reset_default_manager` racing a before-poll hook (the tokio adapter's implicit mode; the
/// std store's generation is modelled by an atomic): the reset clears every entry (its reset
/// hook), then bumps the generation; the hook loads the generation (`read_at`), reads the
/// entry, and installs what it read stamped with the generation its exchange sees — or with
/// `read_at` if that is older (`ThreadStore::enter_unit`). Whatever the interleaving, a session
/// from before the reset is never installed as current in the new generation: it is either not
/// read (cleared first) or stamped with the old generation (reads as empty).
#[test]
fn task_table_reset_vs_before_poll() {
    use localsession_core::TaskTable;
    use loom::sync::atomic::{AtomicU64, Ordering};
    model(|| {
        let table = Arc::new(TaskTable::new());
        let generation = Arc::new(AtomicU64::new(0));
        let before_reset: AnySession = SessionMap::new().with_value("n", 0u8).into();
        drop(table.spawned(1, Some(before_reset.clone())));
        let (t, g) = (table.clone(), generation.clone());
        let reset = thread::spawn(move || {
            drop(t.sweep(|_| false)); // the tokio adapter's reset hook
            g.fetch_add(1, Ordering::AcqRel); // bump_generation
        });
        // The before-poll hook.
        let read_at = generation.load(Ordering::Acquire);
        let installed = table.session(1);
        let exchanged_in = generation.load(Ordering::Acquire); // the exchange's own load
        let stamp = if exchanged_in == read_at { exchanged_in } else { read_at };
        reset.join().unwrap();
        let now = generation.load(Ordering::Acquire);
        if let Some(s) = &installed {
            assert!(s.ptr_eq(&before_reset));
            assert!(stamp < now, "a pre-reset session was installed as current after the reset");
        }
        assert_eq!(table.sessions(), 0, "the reset cleared the entry");
        drop(table.terminated(1));
    });
}

/// `reset_default_manager` racing a scope that closes inside a hooked task's poll and restores
/// a pre-reset session into the task's record (the std store's `exchange_slow` records through
/// the task's sink; the generation is modelled by an atomic). The reset clears every record,
/// bumps the generation, and clears again (its hooks run before and after the bump); the
/// exchange loads the generation, records, and takes its record back if the generation moved
/// meanwhile. Whatever the interleaving, the record ends empty: a session the exchange recorded
/// against the old generation never outlives the reset in the table (the task's next poll would
/// install it as current). Before, the hooks ran only before the bump and the exchange did not
/// check again: a record landing between the clear and the bump survived.
#[test]
fn task_table_reset_vs_scope_restore_record() {
    use localsession_core::TaskTable;
    use loom::sync::atomic::{AtomicU64, Ordering};
    model(|| {
        let table = Arc::new(TaskTable::new());
        let generation = Arc::new(AtomicU64::new(0));
        let before_reset: AnySession = SessionMap::new().with_value("n", 0u8).into();
        drop(table.spawned(1, None));
        let (t, g) = (table.clone(), generation.clone());
        let reset = thread::spawn(move || {
            drop(t.sweep(|_| false)); // the reset hooks, first pass
            g.fetch_add(1, Ordering::AcqRel); // bump_generation
            drop(t.sweep(|_| false)); // second pass
        });
        // The closing scope's exchange (its generation check saw no reset yet).
        let read = generation.load(Ordering::Acquire);
        drop(table.rebind(1, Some(&before_reset)));
        if generation.load(Ordering::Acquire) != read {
            drop(table.rebind(1, None)); // taken back
        }
        reset.join().unwrap();
        if read == 0 {
            assert!(table.session(1).is_none(), "a pre-reset session survived the reset in the task's record");
        }
        drop(table.terminated(1));
    });
}

/// A cancel racing a deadline that passes while the cancel runs, observed by `err()`: once
/// `err()` is `Some`, it never changes. The cancel decides its cause under the scope's lock,
/// re-reading the clock there, and a lazy `err()` (a passed deadline, not settled) decides
/// under the same lock. (The clock is a plain atomic: loom explores the order of the two
/// threads' lock sections around it.) Before, a cancel that read the clock before the deadline
/// settled `Canceled` after an `err()` had reported `DeadlineExceeded`.
#[test]
fn err_never_changes_when_a_cancel_races_the_deadline() {
    use core::time::Duration;
    use localsession_core::{Clock, Instant};
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Manual(AtomicU64);
    impl Clock for Manual {
        fn now(&self) -> Duration {
            Duration::from_millis(self.0.load(Ordering::SeqCst))
        }
    }
    static CLOCK: Manual = Manual(AtomicU64::new(0));

    model(|| {
        CLOCK.0.store(0, Ordering::SeqCst);
        let (ctx, cancel) =
            Context::background().with_deadline(Instant::from_clock_time(&CLOCK, Duration::from_millis(5)));
        let reader = ctx.clone();
        let observer = thread::spawn(move || {
            CLOCK.0.store(10, Ordering::SeqCst); // the deadline passes
            let first = reader.err();
            (first, reader)
        });
        let _ = cancel.cancel();
        let (first, reader) = observer.join().unwrap();
        let later = reader.err();
        assert!(first.is_some(), "the deadline had passed");
        assert_eq!(first, later, "err() changed once it was Some");
        assert_eq!(ctx.err(), later);
    });
}
