//! The upstream Go tests (DESIGN §7), ported to the std adapter: timeouts of `SessionCtx` and
//! `SessionMap` on the std clock and its timer thread, the GC counts of a 10-shard manager,
//! 1000 threads binding and reading under a 1 s GC, and Kitex's context backup/recovery.
//!
//! Global state: this file initializes the default manager (which registers the thread store
//! and the std clock); every test calls [`init`], which tolerates the other tests' call.
//! No timing is asserted: deadlines are checked lazily against a monotonic clock (exact), and
//! timer-driven events are awaited with generous caps.
#![allow(missing_docs)]

mod common;

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::{EVENTUALLY, block_on_within, wait_until};
use localsession_core::{DynKey, KeyQuery};
use localsession_std::{
    AnySession, Context, ContextError, InitError, Key, ManagerOptions, MetaInfo, Session, SessionCtx, SessionMap,
    ShardedManager, backup_ctx, bind, clear_ctx, current, default_manager_options, go, init_default_manager,
    recover_ctx_on_demands, thread_id, unbind,
};

fn init() {
    match init_default_manager(default_manager_options()) {
        Ok(()) | Err(InitError::AlreadyInitialized) => {}
        Err(e) => panic!("init_default_manager failed: {e}"),
    }
}

const TIMER_THREAD: &str = "localsession-timer";

/// Registers an `after_cancel` callback that reports the name of the thread it runs on.
fn report_cancel_thread(ctx: &Context) -> (localsession_core::AfterCancel, mpsc::Receiver<Option<String>>) {
    let (tx, rx) = mpsc::channel();
    let handle = ctx.after_cancel(move || {
        let _ = tx.send(std::thread::current().name().map(str::to_owned));
    });
    (handle, rx)
}

// ---------------------------------------------------------------------------------------------
// Timeouts (Go `NewSessionCtxWithTimeout` / `NewSessionMapWithTimeout`)
// ---------------------------------------------------------------------------------------------

#[test]
fn session_ctx_with_timeout_expires() {
    init();
    let timeout = Duration::from_millis(50);
    let created = Instant::now();
    let s = SessionCtx::with_timeout(&Context::background(), timeout).expect("the std clock is registered");
    let derived = s.with_value("k", 1u8);
    let forked = s.fork();
    // Valid at first — unless the machine stalled past the deadline, which only the elapsed
    // time can excuse.
    if !s.is_valid() {
        assert!(created.elapsed() >= timeout, "invalid before its deadline");
    }
    bind(derived.clone()).unwrap();

    std::thread::sleep(2 * timeout);
    assert!(!s.is_valid(), "invalid after the deadline");
    assert_eq!(s.err(), Some(ContextError::DeadlineExceeded));
    assert!(s.err().unwrap().is_deadline_exceeded());
    assert!(!derived.is_valid() && !forked.is_valid(), "the deadline reaches derived and forked sessions");
    assert_eq!(forked.err(), Some(ContextError::DeadlineExceeded));
    assert!(!s.disable(), "disabling an expired session reports it was invalid already");
    assert_eq!(s.err(), Some(ContextError::DeadlineExceeded), "a late disable does not change err()");
    // Go parity: the expired session stays bound, readable, and invalid.
    let cur = current().expect("still bound");
    assert!(!cur.is_valid());
    assert_eq!(cur.value_cloned::<u8, _>(&"k"), Some(1));
    unbind();

    block_on_within("done() of an expired session resolves", EVENTUALLY, s.done());
    block_on_within("done() of a derived expired session resolves", EVENTUALLY, derived.done());
}

#[test]
fn session_ctx_timeout_fires_done_and_after_cancel_from_the_timer_thread() {
    init();
    let timeout = Duration::from_millis(200);
    let created = Instant::now();
    let s = SessionCtx::with_timeout(&Context::background(), timeout).unwrap();
    let (_kept, fired) = report_cancel_thread(s.context());
    let (stopped, never) = report_cancel_thread(s.context());
    let registered_in_time = created.elapsed() < timeout;
    let stop_succeeded = stopped.stop();
    // A waiter parked before the deadline is woken by the timer, not by polling.
    let waiter = {
        let s = s.clone();
        std::thread::spawn(move || futures::executor::block_on(s.done()))
    };

    let thread = fired.recv_timeout(EVENTUALLY).expect("after_cancel fires once the deadline passes");
    if registered_in_time {
        assert_eq!(thread.as_deref(), Some(TIMER_THREAD), "a deadline fires callbacks on the timer thread");
    }
    assert!(!s.is_valid());
    assert_eq!(s.err(), Some(ContextError::DeadlineExceeded));
    wait_until("the done() waiter is woken", EVENTUALLY, || waiter.is_finished());
    waiter.join().unwrap();
    if stop_succeeded {
        assert!(never.try_recv().is_err(), "a stopped callback never runs");
    }
    // Registering after expiry runs the callback at once, on the registering thread.
    let (_late, late) = report_cancel_thread(s.context());
    assert_eq!(late.try_recv().unwrap(), std::thread::current().name().map(str::to_owned));
}

#[test]
fn a_panicking_after_cancel_callback_does_not_stop_the_timer_thread() {
    init();
    let panicked_on_timer = Arc::new(AtomicBool::new(false));
    let first = SessionCtx::with_timeout(&Context::background(), Duration::from_millis(100)).unwrap();
    let flag = Arc::clone(&panicked_on_timer);
    // If the machine stalls past the deadline, the callback runs (and panics) right here.
    let _first = std::panic::catch_unwind(AssertUnwindSafe(|| {
        first.context().after_cancel(move || {
            let on_timer = std::thread::current().name() == Some(TIMER_THREAD);
            flag.store(on_timer, Ordering::SeqCst);
            panic!("after_cancel callback panics on purpose");
        })
    }));
    let second = SessionCtx::with_timeout(&Context::background(), Duration::from_millis(300)).unwrap();
    let (_second, fired) = report_cancel_thread(second.context());
    fired.recv_timeout(EVENTUALLY).expect("a later deadline still fires");
    if panicked_on_timer.load(Ordering::SeqCst) {
        // The timer thread caught the panic and went on; a new deadline proves it is alive.
        let third = SessionCtx::with_timeout(&Context::background(), Duration::from_millis(100)).unwrap();
        let (_third, fired) = report_cancel_thread(third.context());
        fired.recv_timeout(EVENTUALLY).expect("the timer thread survives a panicking callback");
    }
}

#[test]
fn session_map_with_timeout_expires() {
    init();
    let timeout = Duration::from_millis(50);
    let created = Instant::now();
    let m = SessionMap::with_timeout(timeout).expect("the std clock is registered");
    m.insert("a", "b");
    let holder = m.clone();
    let (_cb, fired) = report_cancel_thread(&m.export());
    let registered_in_time = created.elapsed() < timeout;
    if !m.is_valid() {
        assert!(created.elapsed() >= timeout, "invalid before its deadline");
    }

    std::thread::sleep(2 * timeout);
    assert!(!m.is_valid() && !holder.is_valid(), "every holder sees the expiry");
    assert_eq!(m.err(), Some(ContextError::DeadlineExceeded));
    assert_eq!(holder.value::<&str, _>(&"a").as_deref(), Some(&"b"), "values stay readable");
    assert!(m.export().is_done());
    block_on_within("done() of an expired map resolves", EVENTUALLY, m.done());
    let thread = fired.recv_timeout(EVENTUALLY).expect("after_cancel fires once the deadline passes");
    if registered_in_time {
        assert_eq!(thread.as_deref(), Some(TIMER_THREAD));
    }
}

#[test]
fn session_map_timeout_wakes_a_parked_done_waiter() {
    init();
    let m = SessionMap::with_timeout(Duration::from_millis(100)).unwrap();
    let waiter = {
        let m = m.clone();
        std::thread::spawn(move || {
            futures::executor::block_on(m.done());
            m.err()
        })
    };
    wait_until("the done() waiter is woken by the timer", EVENTUALLY, || waiter.is_finished());
    assert_eq!(waiter.join().unwrap(), Some(ContextError::DeadlineExceeded));
}

// ---------------------------------------------------------------------------------------------
// GC counts: 10 shards, 1000 sessions, the odd ones disabled
// ---------------------------------------------------------------------------------------------

static INDEX: Key<u64> = Key::new("index");

fn gc_counts(make: impl Fn(u64) -> AnySession) {
    let opts = ManagerOptions { shard_number: 10, gc_interval: None, implicit_transmit: false };
    let manager = ShardedManager::new(opts, || None).unwrap();
    assert_eq!(manager.gc_sweeps(), 0, "no GC thread without a gc_interval");
    let store = manager.store();
    let sessions: Vec<AnySession> = (0..1000).map(&make).collect();
    for (id, s) in (0u64..).zip(&sessions) {
        assert!(store.bind(id, s.clone()).is_none());
    }
    assert_eq!(store.len(), 1000);
    assert_eq!(store.shard_lens(), vec![100; 10], "id % 10 spreads 1000 ids evenly");

    for s in sessions.iter().skip(1).step_by(2) {
        assert!(s.disable());
    }
    // Disabling does not remove anything by itself.
    assert_eq!(store.shard_lens(), vec![100; 10]);
    assert_eq!(store.gc(), 500);
    assert_eq!(store.len(), 500);
    // Odd ids live in odd shards (id % 10 keeps the parity), which are now empty.
    assert_eq!(store.shard_lens(), [100, 0].repeat(5));
    for id in 0..1000u64 {
        let got = store.get(id);
        if id % 2 == 0 {
            let got = got.unwrap_or_else(|| panic!("valid session {id} was collected"));
            assert!(got.ptr_eq(&sessions[id as usize]));
            assert_eq!(got.get_cloned(&INDEX), Some(id));
        } else {
            assert!(got.is_none(), "invalid session {id} survived the GC");
        }
    }
    assert_eq!(store.gc(), 0, "a second sweep finds nothing");
}

#[test]
fn gc_counts_with_session_ctx() {
    gc_counts(|i| SessionCtx::new(&Context::background()).with(&INDEX, i).into());
}

#[test]
fn gc_counts_with_session_map() {
    gc_counts(|i| SessionMap::new().with(&INDEX, i).into());
}

// ---------------------------------------------------------------------------------------------
// 1000 threads bind + get under a 1 s GC
// ---------------------------------------------------------------------------------------------

#[test]
fn thousand_threads_bind_and_get_under_a_one_second_gc() {
    const THREADS: u64 = 1000;
    // At most this many threads alive at once (CI containers may cap the number of tasks).
    const BATCH: u64 = 100;
    // Each batch reads for at least this long: ten batches span ~1.5 s, past the first sweep.
    const BATCH_READS_FOR: Duration = Duration::from_millis(150);
    let opts = ManagerOptions { shard_number: 10, gc_interval: Some(Duration::from_secs(1)), implicit_transmit: false };
    let manager = Arc::new(ShardedManager::new(opts, || Some(thread_id())).unwrap());
    let start = Instant::now();
    let reads = Arc::new(AtomicUsize::new(0));

    for batch in 0..THREADS / BATCH {
        let last_batch = batch == THREADS / BATCH - 1;
        let read_until = Instant::now() + BATCH_READS_FOR;
        let handles: Vec<_> = (0..BATCH)
            .map(|j| {
                let i = batch * BATCH + j;
                let manager = Arc::clone(&manager);
                let reads = Arc::clone(&reads);
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let store = manager.store();
                        let id = thread_id();
                        let s = SessionCtx::new(&Context::background()).with(&INDEX, i);
                        assert!(store.bind(id, s.clone()).is_none(), "thread ids are unique");
                        // Sweeps run while batches read their valid sessions and the disabled
                        // sessions of earlier batches wait in the same shards. The last batch
                        // reads until at least one sweep has run.
                        loop {
                            let got =
                                store.get(id).unwrap_or_else(|| panic!("thread {i}: its valid session was collected"));
                            assert!(got.as_ctx().is_some_and(|c| c.ptr_eq(&s)), "thread {i} read another session");
                            assert_eq!(got.get_cloned(&INDEX), Some(i));
                            reads.fetch_add(1, Ordering::Relaxed);
                            let now = Instant::now();
                            if now >= read_until && (!last_batch || manager.gc_sweeps() >= 1) {
                                break;
                            }
                            assert!(now < start + EVENTUALLY, "thread {i}: no GC sweep within {EVENTUALLY:?}");
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        assert!(s.disable());
                    })
                    .expect("spawn a reader thread")
            })
            .collect();
        for h in handles {
            h.join().expect("a reader thread failed");
        }
    }
    assert!(manager.gc_sweeps() >= 1, "at least one sweep ran while threads were reading");
    assert!(reads.load(Ordering::Relaxed) >= THREADS as usize);
    // Every session is invalid now; the GC thread removes the rest at its next sweep.
    wait_until("the GC thread empties the store", EVENTUALLY, || manager.store().is_empty());
    assert_eq!(manager.store().gc(), 0);

    // close() stops the GC thread and returns.
    let manager = Arc::into_inner(manager).expect("the reader threads released their handles");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        manager.close();
        let _ = tx.send(());
    });
    rx.recv_timeout(EVENTUALLY).expect("close() stops the GC thread");
}

/// A user session whose `is_valid` panics once `armed`.
#[derive(Clone)]
struct Grumpy {
    armed: Arc<AtomicBool>,
}

impl Session for Grumpy {
    fn is_valid(&self) -> bool {
        assert!(!self.armed.load(Ordering::SeqCst), "grumpy session: is_valid panics on purpose");
        true
    }
    fn get_with(&self, _key: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) {
        f(None);
    }
    fn with_value_dyn(&self, _key: DynKey, _value: Arc<dyn Any + Send + Sync>) -> AnySession {
        AnySession::custom(self.clone())
    }
}

#[test]
fn the_gc_thread_survives_a_panicking_user_session_and_keeps_it() {
    let opts = ManagerOptions { shard_number: 2, gc_interval: Some(Duration::from_secs(1)), implicit_transmit: false };
    let manager = ShardedManager::new(opts, || None).unwrap();
    let armed = Arc::new(AtomicBool::new(true));
    let store = manager.store();
    // Shard 0 holds the grumpy session before an invalid one; shard 1 holds another invalid one.
    store.bind(0, AnySession::custom(Grumpy { armed: Arc::clone(&armed) }));
    let dead = SessionCtx::new(&Context::background());
    dead.disable();
    store.bind(2, dead.clone());
    store.bind(1, dead);
    wait_until("the GC thread sweeps past the panicking session", EVENTUALLY, || store.len() == 1);
    assert!(store.get(0).is_some(), "the session whose is_valid panicked is kept");
    let sweeps = manager.gc_sweeps();
    assert!(sweeps >= 1);
    // The GC thread is still alive and sweeping.
    wait_until("another sweep", EVENTUALLY, || manager.gc_sweeps() > sweeps);
    armed.store(false, Ordering::SeqCst);
    assert_eq!(store.len(), 1);
    manager.close();
}

// ---------------------------------------------------------------------------------------------
// Backup recovery (Kitex `WithContextBackup`)
// ---------------------------------------------------------------------------------------------

fn request_context() -> Context {
    let ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
    let ctx = MetaInfo::with_persistent(&ctx, "trace", "t-1");
    MetaInfo::with_transient(&ctx, "hop", "1")
}

/// A client deep in the handler, called with a context that lost the request's metainfo.
#[inline(never)]
fn client_call(cur: &Context) -> Context {
    middleware(cur)
}
#[inline(never)]
fn middleware(cur: &Context) -> Context {
    rpc_stub(cur)
}
#[inline(never)]
fn rpc_stub(cur: &Context) -> Context {
    recover_ctx_on_demands(cur, |_prev, cur| (cur.clone(), true))
}

#[test]
fn backup_is_recovered_deep_in_the_stack_and_in_go_children() {
    init();
    backup_ctx(&request_context());
    let recovered = client_call(&Context::background());
    let meta = MetaInfo::of(&recovered);
    assert_eq!(meta.persistent("tenant"), Some("acme"));
    assert_eq!(meta.persistent("trace"), Some("t-1"));
    assert_eq!(meta.count_persistent(), 2);
    assert_eq!(meta.transient("hop"), None, "transient values never merge");
    assert_eq!(meta.count_transient(), 0);

    // A child thread started with go() carries the backup.
    let child = go(|| {
        let ctx = client_call(&Context::background());
        MetaInfo::of(&ctx).persistent("tenant").map(str::to_owned)
    });
    assert_eq!(child.join().unwrap().as_deref(), Some("acme"));
    clear_ctx();
    assert!(current().is_none(), "clear_ctx unbinds the backup");
}

#[test]
fn the_current_context_wins_and_keeps_its_own_values() {
    init();
    backup_ctx(&request_context());
    let cur = MetaInfo::with_persistent(&Context::background().with_value("own", 5u8), "tenant", "other");
    let cur = MetaInfo::with_transient(&cur, "mine", "x");
    let out = client_call(&cur);
    let meta = MetaInfo::of(&out);
    assert_eq!(meta.persistent("tenant"), Some("other"), "the current context wins for keys it has");
    assert_eq!(meta.persistent("trace"), Some("t-1"), "keys it lacks come from the backup");
    assert_eq!(meta.transient("mine"), Some("x"), "its own transient values stay");
    assert_eq!(meta.transient("hop"), None);
    assert_eq!(out.value::<u8, _>(&"own"), Some(&5), "its plain values stay");

    // Nothing to add: the handler's context comes back as is.
    let full =
        MetaInfo::with_persistent(&MetaInfo::with_persistent(&Context::background(), "tenant", "a"), "trace", "b");
    assert!(client_call(&full).ptr_eq(&full));
    clear_ctx();
}

#[test]
fn a_handler_declining_the_backup_gets_its_context_back() {
    init();
    backup_ctx(&request_context());
    let cur = Context::background();
    let mut saw_prev = None;
    let theirs = Context::background().with_value("handler", 1u8);
    let expected = theirs.clone();
    let out = recover_ctx_on_demands(&cur, |prev, _cur| {
        saw_prev = MetaInfo::of(prev).persistent("tenant").map(str::to_owned);
        (theirs, false)
    });
    assert_eq!(saw_prev.as_deref(), Some("acme"), "the handler is given the backed-up context");
    // Go drops the handler's context here; this port returns it.
    assert!(out.ptr_eq(&expected), "backup=false returns the handler's context as is");
    assert_eq!(MetaInfo::of(&out).persistent("tenant"), None, "and merges nothing");
    clear_ctx();
}

#[test]
fn without_a_backup_cur_is_returned_and_the_handler_is_not_called() {
    init();
    let cur = MetaInfo::with_persistent(&Context::background(), "k", "v");
    let called = AtomicBool::new(false);
    let handler = |_: &Context, c: &Context| {
        called.store(true, Ordering::SeqCst);
        (c.with_value("changed", true), true)
    };
    assert!(current().is_none());
    let out = recover_ctx_on_demands(&cur, handler);
    assert!(out.ptr_eq(&cur), "no backup: cur comes back unchanged");
    assert!(!called.load(Ordering::SeqCst), "no backup: the handler is not called");

    // After clear_ctx: the same.
    backup_ctx(&request_context());
    clear_ctx();
    let out = recover_ctx_on_demands(&cur, handler);
    assert!(out.ptr_eq(&cur));
    assert!(!called.load(Ordering::SeqCst), "after clear_ctx the handler is not called");

    // A backup whose session was disabled is not a valid backup either.
    backup_ctx(&request_context());
    current().expect("backup bound").disable();
    let out = recover_ctx_on_demands(&cur, handler);
    assert!(out.ptr_eq(&cur));
    assert!(!called.load(Ordering::SeqCst), "an invalid backup is not consulted");
    clear_ctx();

    // A thread that never backed anything up recovers nothing, even while this one has a backup.
    backup_ctx(&request_context());
    let other = std::thread::spawn(move || {
        let cur = Context::background();
        recover_ctx_on_demands(&cur, |_, c| (c.clone(), true)).ptr_eq(&cur)
    });
    assert!(other.join().unwrap(), "backups are per thread");
    clear_ctx();
}
