//! Adversarial tests of deadlines, timers and clocks (std timer thread, tokio clock, mixed
//! clocks), and of the std adapter's thread helpers (`go`, `Builder`, `ScopeExt`, live count).
//!
//! Nothing here asserts timing: every check is about order and causality (a deadline is never
//! observed as fired before its clock reached it; a child never outlives its parent's deadline;
//! callbacks run exactly once; values are released). Waits are bounded and fail with a message.
//! Tests that depend on process-wide state (the live-session counter, the std timer queue's
//! length) run their body in a child process (this binary, `--exact <name>`).
#![allow(missing_docs)]

mod common;
use common::in_child_process;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use localsession_core::{Clock, Context, ContextError, Instant, SessionCtx, SessionMap};
use localsession_std::{
    Builder, STD_CLOCK, ScopeExt, bind, current, go, go_session, in_current_session, scope, unbind, with_session,
};
use localsession_tokio::TOKIO_CLOCK;

/// Hang detector for anything timer-driven (the deadlines themselves are a few ms).
const CAP: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A value whose drops are counted.
#[derive(Debug)]
struct Probe(Arc<AtomicUsize>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[track_caller]
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < CAP * 2, "timed out after {:?} waiting until {what}", CAP * 2);
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Blocks on `fut` on a helper thread (no runtime); `None` if it did not resolve within `cap`
/// (the helper thread is then left blocked).
fn block_on_within<F>(cap: Duration, fut: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(futures::executor::block_on(fut));
    });
    rx.recv_timeout(cap).ok()
}

fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    let mut cx = TaskContext::from_waker(Waker::noop());
    Pin::new(f).poll(&mut cx)
}

fn std_deadline_in(ms: u64) -> Instant {
    STD_CLOCK.after(Duration::from_millis(ms))
}

// ---------------------------------------------------------------------------------------------
// tokio clock: the runtime that armed the timer goes away
// ---------------------------------------------------------------------------------------------

/// A deadline whose first waiter was on a tokio runtime that then shut down (a server's runtime
/// at shutdown, a `#[tokio::test]` runtime, a per-component runtime) must still fire for the
/// waiters that come after: `done()` on a plain thread and `after_cancel` callbacks. The clock
/// arms the deadline once per scope; if the tokio task that was to fire it is dropped with the
/// runtime, nothing fires it any more.
#[test]
fn a_deadline_armed_on_a_runtime_that_shut_down_still_fires() {
    let deadline = TOKIO_CLOCK.after(Duration::from_millis(150));
    let (ctx, _cancel) = Context::background().with_deadline(deadline);
    {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ctx = ctx.clone();
        rt.block_on(async move {
            // A waiter that gives up early: `done()` was polled, so the timer task is armed.
            let r = tokio::time::timeout(Duration::from_millis(1), ctx.done()).await;
            assert!(r.is_err(), "the 150 ms deadline cannot have fired after 1 ms of waiting");
        });
        drop(rt); // shuts the runtime down, with the timer task still sleeping
    }
    assert!(!ctx.is_done() || deadline.has_passed());

    // Waiters after the runtime is gone.
    let (tx, rx) = mpsc::channel();
    let _h = ctx.after_cancel(move || {
        let _ = tx.send(Instant::now(&TOKIO_CLOCK));
    });
    let waited = block_on_within(CAP, ctx.done());
    assert!(
        waited.is_some(),
        "done() never resolved: the deadline was armed on a runtime that has shut down, and nothing \
         fired it (err() = {:?}, deadline passed = {})",
        ctx.err(),
        deadline.has_passed()
    );
    let fired_at = rx.recv_timeout(CAP).expect("the after_cancel callback never ran");
    assert!(fired_at >= deadline, "the callback ran before the deadline");
    assert_eq!(ctx.err(), Some(ContextError::DeadlineExceeded));
}

/// The tokio clock on a runtime built without the time driver (`Builder::new_multi_thread()`
/// without `enable_time`/`enable_all`): the clock finds a runtime and spawns its timer task
/// there; the deadline must still fire (as it does outside any runtime), not be lost.
#[test]
fn a_deadline_on_a_runtime_without_timers_still_fires() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
    let deadline = TOKIO_CLOCK.after(Duration::from_millis(150));
    let (ctx, _cancel) = Context::background().with_deadline(deadline);
    let (tx, rx) = mpsc::channel();
    let c2 = ctx.clone();
    let _h = rt.block_on(async move {
        c2.after_cancel(move || {
            let _ = tx.send(Instant::now(&TOKIO_CLOCK));
        })
    });
    // A waiter parked before the deadline (its first poll finds the deadline ahead).
    let (wtx, wrx) = mpsc::channel();
    let waiter = ctx.clone();
    std::thread::spawn(move || {
        futures::executor::block_on(waiter.done());
        let _ = wtx.send(());
    });
    let fired = rx.recv_timeout(CAP);
    let waited = wrx.recv_timeout(Duration::from_millis(200)).is_ok();
    drop(rt);
    let fired_at = fired.unwrap_or_else(|_| {
        panic!(
            "the after_cancel callback never ran: the timer task spawned on a runtime without \
             timers was lost (err() = {:?} lazily, parked done() waiter woken = {waited})",
            ctx.err(),
        )
    });
    assert!(fired_at >= deadline, "the callback ran before the deadline");
    assert!(waited, "the parked done() waiter was never woken");
}

/// Shutting a runtime down drops the timer tasks it held, but not their deadlines: each goes to
/// the std timer thread, which fires it at the same wall time — its `after_cancel` callbacks
/// run (nothing is lost), and then the scopes and the values above them are released, as for
/// any deadline context dropped without a cancel. (Before, the shutdown released the values and
/// silently lost every callback and waiter of those deadlines.)
#[test]
fn shutting_a_runtime_down_hands_its_deadlines_to_the_std_timer() {
    const N: usize = 500;
    let drops = Arc::new(AtomicUsize::new(0));
    let callbacks = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let handles = rt.block_on(async {
        let mut handles = Vec::new();
        for _ in 0..N {
            let base = Context::background().with_value("probe", Probe(Arc::clone(&drops)));
            let (ctx, cancel) = base.with_deadline(TOKIO_CLOCK.after(Duration::from_millis(300)));
            let mut done = ctx.done();
            assert!(poll_once(&mut done).is_pending()); // arms a timer task
            let ran = Arc::clone(&callbacks);
            handles.push(ctx.after_cancel(move || {
                ran.fetch_add(1, Ordering::SeqCst);
            }));
            drop((done, ctx, cancel, base));
        }
        tokio::task::yield_now().await;
        handles
    });
    assert_eq!(drops.load(Ordering::SeqCst), 0, "armed timers hold their scopes until the deadline");
    drop(rt);
    wait_until("every deadline fires on the std timer after the shutdown", || callbacks.load(Ordering::SeqCst) == N);
    drop(handles);
    wait_until("every value held by a timer is dropped once it fired", || drops.load(Ordering::SeqCst) == N);
}

// ---------------------------------------------------------------------------------------------
// causality: nothing fires before its deadline
// ---------------------------------------------------------------------------------------------

/// On the std timer: every `done()` that resolves and every callback that runs sees its
/// deadline reached on its own clock, and the error is `DeadlineExceeded`. Children with an
/// earlier own deadline fire on theirs; children with a later one fire on the parent's.
#[test]
fn std_timer_never_fires_before_the_deadline_and_children_never_outlive_parents() {
    const N: u64 = 60;
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let ran = Arc::new(AtomicUsize::new(0));
    let mut keep = Vec::new();
    let mut waiters = Vec::new();
    for i in 0..N {
        let (parent, pc) = Context::background().with_deadline(std_deadline_in(5 + i % 17));
        // One child with a later own deadline (the parent's counts), one with an earlier one.
        let (late, lc) = parent.with_deadline(std_deadline_in(3_600_000));
        let (early, ec) = parent.with_deadline(std_deadline_in(1 + i % 5));
        for (name, ctx, own) in [
            ("parent", parent.clone(), parent.deadline().unwrap()),
            ("late child", late.clone(), parent.deadline().unwrap()),
            ("early child", early.clone(), early.deadline().unwrap()),
        ] {
            let v = Arc::clone(&violations);
            let r = Arc::clone(&ran);
            let c = ctx.clone();
            keep.push(ctx.after_cancel(move || {
                if !own.has_passed() {
                    v.lock().unwrap().push(format!("{name} {i}: callback before its deadline"));
                }
                if c.err() != Some(ContextError::DeadlineExceeded) {
                    v.lock().unwrap().push(format!("{name} {i}: err() = {:?} in the callback", c.err()));
                }
                r.fetch_add(1, Ordering::SeqCst);
            }));
            if i % 10 == 0 {
                let v = Arc::clone(&violations);
                waiters.push(std::thread::spawn(move || {
                    futures::executor::block_on(ctx.done());
                    if !own.has_passed() {
                        v.lock().unwrap().push(format!("{name} {i}: done() before its deadline"));
                    }
                }));
            }
        }
        assert_eq!(late.deadline(), parent.deadline(), "a later own deadline is capped by the parent's");
        drop((pc, lc, ec)); // dropping a handle does not cancel
    }
    wait_until("every callback ran", || ran.load(Ordering::SeqCst) == 3 * N as usize);
    for w in waiters {
        w.join().unwrap();
    }
    let v = violations.lock().unwrap();
    assert!(v.is_empty(), "{v:#?}");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(ran.load(Ordering::SeqCst), 3 * N as usize, "a callback ran twice");
}

/// On the tokio clock, inside a multi-thread runtime: `done()` resolves only once the tokio
/// clock has reached the deadline; `after_cancel` callbacks too.
#[test]
fn tokio_timer_never_fires_before_the_deadline() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let violations = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..60u64 {
            tasks.push(tokio::spawn(async move {
                let deadline = TOKIO_CLOCK.after(Duration::from_micros(300 + 397 * (i % 40)));
                let (ctx, _cancel) = Context::background().with_deadline(deadline);
                let (tx, rx) = tokio::sync::oneshot::channel();
                let _h = ctx.after_cancel(move || {
                    let _ = tx.send(deadline.has_passed());
                });
                tokio::time::timeout(CAP, ctx.done()).await.expect("done() never resolved");
                let mut bad = Vec::new();
                if !deadline.has_passed() {
                    bad.push(format!("{i}: done() resolved before the deadline"));
                }
                if !tokio::time::timeout(CAP, rx).await.expect("callback never ran").unwrap() {
                    bad.push(format!("{i}: callback before the deadline"));
                }
                bad
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert!(violations.is_empty(), "{violations:#?}");
}

// ---------------------------------------------------------------------------------------------
// mixed clocks
// ---------------------------------------------------------------------------------------------

/// A parent on the std clock (30 ms), a child on the tokio clock (1 h): the child's `done()`,
/// awaited on a tokio runtime, resolves when the parent's deadline fires (on the std timer), and
/// never before it; the child's callback runs once.
#[test]
fn a_tokio_clock_child_never_outlives_its_std_clock_parent() {
    let parent_deadline = std_deadline_in(30);
    let (parent, _pc) = Context::background().with_deadline(parent_deadline);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&runs);
    let (child, err) = rt.block_on(async move {
        let (child, _cc) = parent.with_deadline(TOKIO_CLOCK.after(Duration::from_secs(3600)));
        let _h = child.after_cancel(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        tokio::time::timeout(CAP, child.done()).await.expect("the child outlived its parent's deadline");
        assert!(parent_deadline.has_passed(), "the child was done before its parent's deadline");
        assert!(parent.is_done());
        let err = child.err();
        (child, err)
    });
    assert_eq!(err, Some(ContextError::DeadlineExceeded));
    wait_until("the child's callback ran", || runs.load(Ordering::SeqCst) == 1);
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(child.is_done());
}

/// The other way round: a parent on the tokio clock (30 ms, made inside a runtime), a child on
/// the std clock (1 h), waited for on a plain thread (outside the runtime, which stays alive).
/// The parent's expiry is armed through the grandchild's `outer` link.
#[test]
fn a_std_clock_child_never_outlives_its_tokio_clock_parent() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (parent, parent_deadline) = rt.block_on(async {
        let d = TOKIO_CLOCK.after(Duration::from_millis(30));
        (Context::background().with_deadline(d), d)
    });
    let (parent, _pc) = parent;
    let (child, _cc) = parent.with_deadline(std_deadline_in(3_600_000));
    let (grandchild, _gc) = child.with_value("k", 1u8).with_cancel();
    assert!(!grandchild.is_done());
    let waited = block_on_within(CAP, grandchild.done());
    assert!(waited.is_some(), "the grandchild outlived its tokio-clock grandparent's deadline");
    assert!(parent_deadline.has_passed(), "done before the parent's deadline");
    assert_eq!(grandchild.err(), Some(ContextError::DeadlineExceeded));
    assert_eq!(child.err(), Some(ContextError::DeadlineExceeded));
    drop(rt);
}

// ---------------------------------------------------------------------------------------------
// memory: timers must not pin what was cancelled or what expired
// ---------------------------------------------------------------------------------------------

/// Thousands of requests with 1 h deadlines on the std timer, each waited on (armed) and then
/// cancelled and dropped: their values are released (the timer purges settled expiries as its
/// queue grows), and the queue does not keep thousands of entries.
#[test]
fn cancelled_deadline_contexts_do_not_pile_up_in_the_std_timer() {
    in_child_process("cancelled_deadline_contexts_do_not_pile_up_in_the_std_timer", || {
        const N: usize = 5_000;
        let drops = Arc::new(AtomicUsize::new(0));
        for i in 0..N {
            let base = Context::background().with_value("probe", Probe(Arc::clone(&drops)));
            let (ctx, cancel) = base.with_deadline(std_deadline_in(3_600_000));
            if i % 2 == 0 {
                let _h = ctx.after_cancel(|| {});
            } else {
                let mut done = ctx.done();
                assert!(poll_once(&mut done).is_pending());
            }
            assert!(cancel.cancel());
        }
        let pending = STD_CLOCK.pending_timers();
        assert!(pending < 200, "{pending} settled expiries still queued after {N} cancelled requests");
        let dropped = drops.load(Ordering::SeqCst);
        assert!(dropped + 200 > N, "only {dropped} of {N} cancelled requests' values were released");
    });
}

/// Contexts dropped without a cancel are held by their armed timers until the deadline, and
/// released when it fires; every callback runs exactly once.
#[test]
fn dropped_uncancelled_deadline_contexts_are_released_when_they_fire() {
    const N: usize = 1_000;
    let drops = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    for i in 0..N {
        let base = Context::background().with_value("probe", Probe(Arc::clone(&drops)));
        let (ctx, _cancel) = base.with_deadline(std_deadline_in(20 + (i % 10) as u64));
        let r = Arc::clone(&runs);
        let _h = ctx.after_cancel(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
    }
    wait_until("every expired context's value is released", || drops.load(Ordering::SeqCst) == N);
    assert_eq!(runs.load(Ordering::SeqCst), N);
}

// ---------------------------------------------------------------------------------------------
// cancel vs deadline
// ---------------------------------------------------------------------------------------------

/// A cancel racing the timer: callbacks run exactly once, `cancel()` returns `true` exactly when
/// the cause is `Canceled`, and `done()` resolves.
#[test]
fn cancel_racing_the_std_timer_runs_callbacks_exactly_once() {
    for round in 0..200u64 {
        let deadline = STD_CLOCK.after(Duration::from_micros(100 + (round % 7) * 50));
        let (ctx, cancel) = Context::background().with_deadline(deadline);
        let (child, _cc) = ctx.with_cancel();
        let counts: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let mut handles = Vec::new();
        for (c, n) in [&ctx, &child].into_iter().zip(&counts) {
            let n = Arc::clone(n);
            handles.push(c.after_cancel(move || {
                n.fetch_add(1, Ordering::SeqCst);
            }));
        }
        let t = std::thread::spawn(move || {
            while STD_CLOCK.now() + Duration::from_micros(20) < deadline.since_origin() {
                std::hint::spin_loop();
            }
            cancel.cancel()
        });
        let won = t.join().unwrap();
        wait_until("both callbacks ran", || counts.iter().all(|n| n.load(Ordering::SeqCst) >= 1));
        assert_eq!(won, ctx.err() == Some(ContextError::Canceled), "round {round}: won={won}, err={:?}", ctx.err());
        assert!(poll_once(&mut child.done()).is_ready());
        for (i, n) in counts.iter().enumerate() {
            assert_eq!(n.load(Ordering::SeqCst), 1, "round {round}: callback {i} ran more than once");
        }
    }
}

/// `AfterCancel::stop` racing the std timer: `true` means the callback never runs, `false`
/// means it ran (or is running) and runs exactly once.
#[test]
fn stop_racing_the_std_timer_is_exact() {
    for round in 0..200u64 {
        let deadline = STD_CLOCK.after(Duration::from_micros(100 + (round % 5) * 60));
        let (ctx, _cancel) = Context::background().with_deadline(deadline);
        let runs = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&runs);
        let handle = ctx.after_cancel(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        while STD_CLOCK.now() + Duration::from_micros(30) < deadline.since_origin() {
            std::hint::spin_loop();
        }
        let stopped = handle.stop();
        // Make sure the scope is settled (the timer fired, or this poll settles it).
        assert_eq!(block_on_within(CAP, ctx.done()), Some(()), "round {round}: done() never resolved");
        if stopped {
            std::thread::sleep(Duration::from_millis(1));
            assert_eq!(runs.load(Ordering::SeqCst), 0, "round {round}: stop() returned true but the callback ran");
        } else {
            wait_until("the callback ran", || runs.load(Ordering::SeqCst) >= 1);
            assert_eq!(runs.load(Ordering::SeqCst), 1, "round {round}: the callback ran twice");
        }
    }
}

/// A clock that is "preempted" inside one `now()` call: the hooked thread reads the time
/// (before the deadline), and before it can use the value the time moves past the deadline and
/// another thread observes the context. Monotonic: a read returns a value that was current when
/// the call started, exactly what a thread preempted right after reading a clock returns.
struct PreemptedClock {
    ms: AtomicU64,
}

thread_local! {
    static HOOK: std::cell::RefCell<Option<Box<dyn FnOnce()>>> = const { std::cell::RefCell::new(None) };
}

impl Clock for PreemptedClock {
    fn now(&self) -> Duration {
        let read = self.ms.load(Ordering::SeqCst);
        if let Some(hook) = HOOK.with(|h| h.borrow_mut().take()) {
            hook();
        }
        Duration::from_millis(read)
    }
}

static PREEMPTED: PreemptedClock = PreemptedClock { ms: AtomicU64::new(0) };
/// Another instance, for the other test that uses the hook (tests run in parallel).
static PREEMPTED_2: PreemptedClock = PreemptedClock { ms: AtomicU64::new(0) };

/// `err()` never changes once it is `Some` (the documented promise of `cancel`): a reader that
/// saw `DeadlineExceeded` (lazily, the deadline having passed) must not later see `Canceled`
/// because a cancel that read the clock just before the deadline completed afterwards.
#[test]
fn err_never_changes_once_some_when_a_cancel_races_the_deadline() {
    PREEMPTED.ms.store(99, Ordering::SeqCst);
    let deadline = Instant::from_clock_time(&PREEMPTED, Duration::from_millis(100));
    let (ctx, cancel) = Context::background().with_deadline(deadline);
    assert_eq!(ctx.err(), None);
    let observer = ctx.clone();
    let (tx, rx) = mpsc::channel();
    HOOK.with(|h| {
        *h.borrow_mut() = Some(Box::new(move || {
            // The canceller read 99 ms; the clock moves on to 101 ms and another thread looks.
            PREEMPTED.ms.store(101, Ordering::SeqCst);
            let seen = std::thread::spawn(move || observer.err()).join().unwrap();
            tx.send(seen).unwrap();
        }));
    });
    let won = cancel.cancel();
    HOOK.with(|h| h.borrow_mut().take());
    let first = rx.recv().expect("the hook ran inside cancel()'s clock read");
    let later = ctx.err();
    assert_eq!(first, Some(ContextError::DeadlineExceeded), "the observer saw the passed deadline");
    assert_eq!(
        later, first,
        "err() changed from {first:?} to {later:?} (cancel() returned {won}): a cancel that read the clock \
         before the deadline overrode a DeadlineExceeded already observed"
    );
}

// ---------------------------------------------------------------------------------------------
// callbacks on the timer thread
// ---------------------------------------------------------------------------------------------

/// A callback fired by the std timer thread that opens a new deadline and registers on it
/// (re-arming the timer from the timer thread): the chain completes, no deadlock.
#[test]
fn timer_callbacks_can_arm_new_deadlines_from_the_timer_thread() {
    fn chain(ctx: &Context, left: usize, tx: mpsc::Sender<usize>) {
        let (next, _c) = ctx.without_cancel().with_deadline(std_deadline_in(3));
        let n2 = next.clone();
        let _h = next.after_cancel(move || {
            if left == 0 {
                let _ = tx.send(0);
            } else {
                let _ = tx.send(left);
                chain(&n2, left - 1, tx);
            }
        });
    }
    let (tx, rx) = mpsc::channel();
    chain(&Context::background(), 5, tx);
    let mut seen = Vec::new();
    loop {
        let v = rx.recv_timeout(CAP).unwrap_or_else(|_| panic!("the chain stalled after {seen:?}"));
        seen.push(v);
        if v == 0 {
            break;
        }
    }
    assert_eq!(seen, vec![5, 4, 3, 2, 1, 0]);
}

/// The std timer thread is shared by every request's deadlines. A callback that binds a
/// session there (and forgets to unbind) must not make that session current for later
/// callbacks of unrelated requests (Go runs each `AfterFunc` in its own goroutine).
#[test]
fn a_session_bound_by_one_timer_callback_is_not_current_in_the_next() {
    let (first, _c1) = Context::background().with_deadline(std_deadline_in(2));
    let leaked = SessionMap::new().with_value("owner", "request A");
    let (tx, rx) = mpsc::channel();
    let _h1 = first.after_cancel(move || {
        bind(leaked).unwrap(); // a bug in request A's cleanup: never unbound
        let _ = tx.send(());
    });
    rx.recv_timeout(CAP).expect("the first callback never ran");
    let (second, _c2) = Context::background().with_deadline(std_deadline_in(2));
    let (tx, rx) = mpsc::channel();
    let _h2 = second.after_cancel(move || {
        let seen = current().and_then(|s| s.value_cloned::<&str, _>(&"owner"));
        let on = std::thread::current().name().map(str::to_owned);
        let _ = tx.send((seen, on));
    });
    let (seen, on) = rx.recv_timeout(CAP).expect("the second callback never ran");
    assert_eq!(on.as_deref(), Some("localsession-timer"));
    assert_eq!(seen, None, "request B's deadline callback sees request A's session as current");
}

// ---------------------------------------------------------------------------------------------
// std thread helpers
// ---------------------------------------------------------------------------------------------

/// `Builder` with a name, a stack size and a given session, whose closure panics: the panic
/// reaches `join` with its payload, the thread had its name and session, the session is
/// released once (with the thread), and the spawner's own binding is untouched.
#[test]
fn builder_named_thread_that_panics_releases_its_session() {
    let drops = Arc::new(AtomicUsize::new(0));
    let given = SessionMap::new().with_value("probe", Probe(Arc::clone(&drops))).with_value("who", "given");
    let mine = SessionMap::new().with_value("who", "spawner");
    let h = scope(mine.clone(), || {
        Builder::new()
            .name("adv-time-worker".into())
            .stack_size(256 * 1024)
            .session(given)
            .spawn(|| {
                let who = current().and_then(|s| s.value_cloned::<&str, _>(&"who"));
                assert_eq!(who, Some("given"));
                assert_eq!(std::thread::current().name(), Some("adv-time-worker"));
                std::panic::panic_any(String::from("adv-time boom"));
            })
            .unwrap()
    });
    let err = h.join().expect_err("the panic reaches join");
    assert_eq!(err.downcast_ref::<String>().map(String::as_str), Some("adv-time boom"));
    assert_eq!(drops.load(Ordering::SeqCst), 1, "the given session was released exactly once with its thread");
    assert!(current().is_none(), "the test thread had nothing bound");
    assert_eq!(mine.value::<&str, _>(&"who").as_deref(), Some(&"spawner"));
}

/// `Builder::spawn` failing (a stack the OS cannot give): the error comes back and the session
/// is dropped (documented), not leaked.
#[test]
fn builder_spawn_failure_returns_the_error_and_drops_the_session() {
    let drops = Arc::new(AtomicUsize::new(0));
    let given = SessionMap::new().with_value("probe", Probe(Arc::clone(&drops)));
    let r = Builder::new().stack_size(1 << 50).session(given).spawn(|| 1u8);
    match r {
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert_eq!(drops.load(Ordering::SeqCst), 1, "the session of a thread that was never created leaked");
        }
        Ok(h) => {
            // The OS granted a 1 PiB stack (unlikely): the session is still released with it.
            assert_eq!(h.join().unwrap(), 1);
            assert_eq!(drops.load(Ordering::SeqCst), 1);
        }
    }
}

/// `go` with a session whose deadline expires while the thread runs: the thread sees the
/// session become invalid (the timer fires even with nobody polling), and its binding ends
/// with it.
#[test]
fn go_threads_see_their_inherited_deadline_fire() {
    let s = SessionCtx::with_deadline(&Context::background(), std_deadline_in(20));
    let deadline = s.export().deadline().unwrap();
    let h = scope(s.clone(), || {
        go(move || {
            let cur = current().expect("inherited");
            let ctx = cur.as_ctx().expect("a SessionCtx").export();
            let (tx, rx) = mpsc::channel();
            let _h = ctx.after_cancel(move || {
                let _ = tx.send(());
            });
            rx.recv_timeout(CAP).expect("the inherited deadline never fired");
            (deadline.has_passed(), current().map(|c| c.is_valid()))
        })
    });
    assert_eq!(h.join().unwrap(), (true, Some(false)));
    assert!(!s.is_valid());
}

/// Scoped threads (`ScopeExt::go`, `go_session`, `Builder::spawn_scoped`): each sees its own
/// session; one panics; the scope re-raises the panic after joining all; every session is
/// released exactly once; the spawner's binding is what it was.
#[test]
fn scoped_threads_carry_sessions_and_release_them_on_panic() {
    let drops = Arc::new(AtomicUsize::new(0));
    let spawner = SessionMap::new().with_value("who", "spawner").with_value("p", Probe(Arc::clone(&drops)));
    let given = SessionMap::new().with_value("who", "given").with_value("p", Probe(Arc::clone(&drops)));
    let built = SessionMap::new().with_value("who", "built").with_value("p", Probe(Arc::clone(&drops)));
    let seen = Mutex::new(Vec::new());
    let seen_ref = &seen;
    let r = scope(spawner.clone(), || {
        catch_unwind(AssertUnwindSafe(|| {
            std::thread::scope(|sc| {
                let who = move || current().and_then(|s| s.value_cloned::<&str, _>(&"who"));
                sc.go(move || seen_ref.lock().unwrap().push(who()));
                sc.go_session(given.clone(), move || {
                    seen_ref.lock().unwrap().push(who());
                    panic!("scoped boom");
                });
                Builder::new()
                    .session(built.clone())
                    .spawn_scoped(sc, move || {
                        seen_ref.lock().unwrap().push(who());
                        // A nested bind inside the scoped thread ends with the thread.
                        bind(SessionMap::new().with_value("who", "nested")).unwrap();
                    })
                    .unwrap();
            });
        }))
        .map(|()| current().and_then(|s| s.value_cloned::<&str, _>(&"who")))
        .map_err(|_| current().and_then(|s| s.value_cloned::<&str, _>(&"who")))
    });
    assert_eq!(r, Err(Some("spawner")), "the scope re-raises the panic; the spawner keeps its binding");
    let mut seen = seen.into_inner().unwrap();
    seen.sort();
    assert_eq!(seen, vec![Some("built"), Some("given"), Some("spawner")]);
    drop((spawner, given, built));
    assert_eq!(drops.load(Ordering::SeqCst), 3, "every scoped thread's session was released");
    assert!(current().is_none());
}

/// With the `live-count` feature: after `go`, `go_session`, `Builder` (plain and scoped),
/// `ScopeExt`, wrapped closures run inline and on threads, with panics and nested binds, and
/// deadline callbacks on the timer thread, the live-session count returns to where it started.
#[test]
fn live_sessions_return_to_zero_after_thread_helpers_and_timers() {
    in_child_process("live_sessions_return_to_zero_after_thread_helpers_and_timers", || {
        let Some(start) = localsession_std::live_sessions() else {
            return; // built without `live-count`: nothing to count
        };
        assert_eq!(start, 0, "fresh process");
        let s = SessionCtx::with_deadline(&Context::background(), std_deadline_in(3_600_000));
        bind(s.clone()).unwrap();
        assert_eq!(localsession_std::live_sessions(), Some(1));
        let mut handles = Vec::new();
        for i in 0..20 {
            handles.push(go(move || {
                bind(SessionMap::new()).unwrap();
                assert!(i % 5 != 0, "go boom");
            }));
            handles.push(go_session(SessionMap::new(), move || assert!(i % 7 != 0, "go_session boom")));
            handles.push(
                Builder::new()
                    .name(format!("adv-live-{i}"))
                    .spawn(move || {
                        let _nested = in_current_session(|| bind(SessionMap::new()).unwrap());
                        assert!(i % 3 != 0, "builder boom");
                    })
                    .unwrap(),
            );
        }
        for h in handles {
            let _ = h.join();
        }
        std::thread::scope(|sc| {
            sc.go(|| ());
            sc.go_session(SessionMap::new(), || ());
            let _ = Builder::new().no_session().spawn_scoped(sc, || bind(SessionMap::new()).unwrap()).unwrap().join();
        });
        // Wrapped closures inline, one panicking.
        let _ = catch_unwind(|| with_session(Some(SessionMap::new().into()), || panic!("inline boom"))());
        in_current_session(|| ())();
        // Deadline callbacks on the timer thread.
        let (ctx, _c) = s.export().with_deadline(std_deadline_in(2));
        let (tx, rx) = mpsc::channel();
        let _h = ctx.after_cancel(move || {
            let _ = tx.send(current().is_some());
        });
        assert_eq!(rx.recv_timeout(CAP), Ok(false), "nothing is bound on the timer thread");
        assert_eq!(localsession_std::live_sessions(), Some(1), "only the test thread's binding is live");
        unbind();
        assert_eq!(localsession_std::live_sessions(), Some(0));
    });
}

/// A parked `done()` waiter on a plain thread is woken by the std timer, and only once the
/// deadline has passed (no lost wake-up, no early one).
#[test]
fn a_parked_done_waiter_is_woken_by_the_std_timer() {
    for _ in 0..50 {
        let (ctx, _c) = Context::background().with_deadline(std_deadline_in(1));
        let deadline = ctx.deadline().unwrap();
        let r = block_on_within(CAP, async move {
            ctx.done().await;
            deadline.has_passed()
        });
        assert_eq!(r, Some(true), "done() hung or resolved before the deadline");
    }
}

/// A parent cancelled (`Canceled`) before its deadline: a child that only inherits that
/// deadline (`with_cancel`, no deadline of its own) takes the parent's cause, as in Go, where a
/// child without a timer of its own gets the parent's error. Here the deadline passes while the
/// cancel is still walking the children (the hook moves the clock right after the cancel's own
/// deadline check). Found first by `cancel_racing_the_std_timer_runs_callbacks_exactly_once`
/// on the real std clock (round 90 of 200 in one run): parent `Canceled`, child
/// `DeadlineExceeded`.
#[test]
fn a_child_without_its_own_deadline_takes_its_parents_cancel_cause() {
    PREEMPTED_2.ms.store(99, Ordering::SeqCst);
    let deadline = Instant::from_clock_time(&PREEMPTED_2, Duration::from_millis(100));
    let (parent, cancel) = Context::background().with_deadline(deadline);
    let (child, _cc) = parent.with_value("k", 1u8).with_cancel();
    assert_eq!(child.deadline(), Some(deadline), "the child only inherits the parent's deadline");
    HOOK.with(|h| {
        *h.borrow_mut() = Some(Box::new(|| PREEMPTED_2.ms.store(101, Ordering::SeqCst)));
    });
    let won = cancel.cancel();
    HOOK.with(|h| h.borrow_mut().take());
    assert!(won, "the cancel read the clock before the deadline");
    assert_eq!(parent.err(), Some(ContextError::Canceled));
    assert_eq!(
        child.err(),
        parent.err(),
        "the parent was cancelled before its deadline, yet the child (whose only deadline is the \
         parent's) reports a different cause"
    );
}
