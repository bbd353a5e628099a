//! Adversarial concurrency tests: context / session trees forked, cancelled and disabled from
//! several threads at once, `ShardedStore` binds racing GC sweeps, `SessionMap` writers racing
//! readers and snapshots, `reset_default_manager` racing bind/scope/current, and hostile user code
//! (panicking or re-entrant `Drop`, panicking `Eq`, re-entrant wakers) in all of them.
//!
//! Every racing part runs under a watchdog: a hang fails the test instead of wedging the run.
//! Tests that would leave a spinning thread behind on failure run in a child process that is
//! killed after a timeout.
//!
//! Global state: the std thread store. `reset_default_manager` unbinds every thread's session,
//! so the one test that resets takes `STD_LOCK` for writing and every test that binds on the std
//! store takes it for reading.
#![allow(missing_docs)]

mod common;
use common::{Cause, Rng, Token, Tracker, in_child_within, silently, within};

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context as TaskContext, RawWaker, RawWakerVTable, Waker};
use std::time::Duration;

use localsession_core::{
    AnySession, CancelHandle, Clock, Context, ContextError, DynKey, Expiry, Instant, Key, KeyQuery, ManagerOptions,
    Session, SessionCtx, SessionMap, ShardedStore,
};
use localsession_std::{ShardedManager, bind, current, enter, reset_default_manager, scope, unbind, with_current};

/// A hang detector, never a performance assertion.
const HANG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// Serializes `reset_default_manager` (write) against tests that bind on the std store (read).
static STD_LOCK: RwLock<()> = RwLock::new(());

fn std_shared() -> RwLockReadGuard<'static, ()> {
    STD_LOCK.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn std_exclusive() -> RwLockWriteGuard<'static, ()> {
    STD_LOCK.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// 1. Context / SessionCtx trees
// ---------------------------------------------------------------------------------------------

/// A registered `after_cancel` callback: how often it ran, and its captured token.
struct Reg {
    ran: Arc<AtomicUsize>,
    /// Whether the session it was registered on was forked after `disable()` had returned.
    born_after_disable: bool,
    session: Option<SessionCtx>,
    first_err: Option<ContextError>,
}

/// Four threads fork children and grandchildren of one session (keeping some, dropping others
/// at once) and register an `after_cancel` on each, while a fifth disables the root. Every kept
/// fork ends invalid with `Canceled`, a fork made after `disable()` returned is invalid at once
/// and runs its callback inline, no callback runs twice, and every callback closure is dropped
/// exactly once (run or not).
#[test]
fn forks_from_four_threads_while_the_root_is_disabled_all_end_invalid_and_callbacks_run_once() {
    const THREADS: usize = 4;
    const FORKS: usize = 1_500;
    within("forking racing disable", HANG, || {
        for round in 0..4u64 {
            let closures = Tracker::new();
            let root = SessionCtx::new(&Context::background());
            let disabled = Arc::new(AtomicBool::new(false));
            let progress = Arc::new(AtomicUsize::new(0));
            let start = Arc::new(Barrier::new(THREADS + 1));
            let workers: Vec<_> = (0..THREADS)
                .map(|w| {
                    let (root, disabled, progress, start, closures) =
                        (root.clone(), disabled.clone(), progress.clone(), start.clone(), closures.clone());
                    std::thread::spawn(move || {
                        let mut rng = Rng(0x9E37_79B9 ^ ((w as u64 + 1) * 7919 + round));
                        let mut regs: Vec<Reg> = Vec::new();
                        let mut handles = Vec::new();
                        start.wait();
                        let mut last: Option<SessionCtx> = None;
                        for _ in 0..FORKS {
                            let before = disabled.load(Ordering::SeqCst);
                            // A fork of the root, of the last fork, or of a derived session.
                            let child = match (rng.below(3), &last) {
                                (1, Some(l)) => l.fork(),
                                (2, Some(l)) => l.with_value("w", w).fork(),
                                _ => root.fork(),
                            };
                            let ran = Arc::new(AtomicUsize::new(0));
                            let (r2, token) = (ran.clone(), closures.token());
                            let h = child.after_cancel(move || {
                                r2.fetch_add(1, Ordering::SeqCst);
                                drop(token);
                            });
                            let first_err = child.err();
                            if before {
                                assert_eq!(
                                    first_err,
                                    Some(ContextError::Canceled),
                                    "a fork made after disable() is valid"
                                );
                                assert_eq!(ran.load(Ordering::SeqCst), 1, "the callback did not run inline");
                            }
                            if rng.below(4) == 0 {
                                // Dropped at once: races the disable's walk of the children.
                                drop(h);
                                drop(child);
                                continue;
                            }
                            handles.push(h);
                            regs.push(Reg { ran, born_after_disable: before, session: Some(child.clone()), first_err });
                            last = Some(child);
                            progress.fetch_add(1, Ordering::Relaxed);
                        }
                        (regs, handles)
                    })
                })
                .collect();
            start.wait();
            while progress.load(Ordering::Relaxed) < FORKS {
                std::thread::yield_now();
            }
            assert!(root.disable(), "nothing else disables the root");
            disabled.store(true, Ordering::SeqCst);
            let mut all = Vec::new();
            for w in workers {
                let (regs, handles) = w.join().expect("a forking thread failed");
                all.push((regs, handles));
            }
            let mut after = 0;
            for (regs, _handles) in &all {
                for reg in regs {
                    let s = reg.session.as_ref().unwrap();
                    assert!(!s.is_valid(), "round {round}: a fork is still valid after its root was disabled");
                    assert_eq!(s.err(), Some(ContextError::Canceled), "round {round}");
                    if let Some(first) = &reg.first_err {
                        assert_eq!(Some(first), s.err().as_ref(), "err() changed once Some");
                    }
                    assert_eq!(reg.ran.load(Ordering::SeqCst), 1, "round {round}: a kept fork's callback ran != once");
                    after += usize::from(reg.born_after_disable);
                }
            }
            let _ = after;
            drop(all);
            drop(root);
            assert_eq!(
                closures.made(),
                closures.dropped(),
                "round {round}: callback closures leaked or dropped twice ({} made)",
                closures.made()
            );
        }
    });
}

/// Four threads each open a child under one root and cancel the root with their own cause, all
/// at once, in 2 000 rounds. Exactly one cancel wins; the root and every child — opened before
/// or after the winning cancel — report the winner's cause; `err()` never changes once `Some`.
#[test]
fn concurrent_cancels_with_distinct_causes_settle_one_cause_in_the_whole_tree() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 2_000;
    within("cancels racing cancels", HANG, || {
        let slot: Arc<Mutex<Option<(Context, CancelHandle)>>> = Arc::new(Mutex::new(None));
        let go = Arc::new(Barrier::new(THREADS + 1));
        let done = Arc::new(Barrier::new(THREADS + 1));
        let workers: Vec<_> = (0..THREADS as u64)
            .map(|w| {
                let (slot, go, done) = (slot.clone(), go.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut out = Vec::with_capacity(ROUNDS);
                    for _ in 0..ROUNDS {
                        go.wait();
                        let (root, cancel) = slot.lock().unwrap().clone().unwrap();
                        let (child, _c) =
                            if w % 2 == 0 { root.with_cancel() } else { root.with_value("w", w).with_cancel() };
                        let grandchild = SessionCtx::new(&child);
                        let seen_before = child.err();
                        let mine = ContextError::cause(Cause(w));
                        let won = cancel.cancel_with_cause(mine.clone());
                        let root_err = root.err();
                        let child_err = child.err();
                        if let Some(b) = &seen_before {
                            assert_eq!(Some(b), child_err.as_ref(), "err() changed once Some");
                        }
                        if won {
                            assert_eq!(root_err.as_ref(), Some(&mine), "the winner's cause is not the root's err()");
                        }
                        out.push((won, root_err, child_err, grandchild.err()));
                        done.wait();
                    }
                    out
                })
            })
            .collect();
        for _ in 0..ROUNDS {
            *slot.lock().unwrap() = Some(Context::background().with_cancel());
            go.wait();
            done.wait();
        }
        let results: Vec<Vec<_>> = workers.into_iter().map(|w| w.join().expect("a cancelling thread failed")).collect();
        for round in 0..ROUNDS {
            let row: Vec<_> = results.iter().map(|r| &r[round]).collect();
            assert_eq!(row.iter().filter(|r| r.0).count(), 1, "round {round}: not exactly one cancel won");
            let root_err = row[0].1.clone().expect("the root is cancelled");
            for (i, (won, r, c, g)) in row.iter().enumerate() {
                assert_eq!(r.as_ref(), Some(&root_err), "round {round} thread {i}: root err() differs between threads");
                assert!(
                    c.is_some() && g.is_some(),
                    "BUG: round {round} thread {i}: its cancel() returned {won} while its own child under the \
                     cancelled root was still not done (child err() {c:?}, session under it {g:?}): a losing \
                     cancel returns before the winner has propagated to the descendants"
                );
                assert_eq!(
                    c.as_ref(),
                    Some(&root_err),
                    "round {round} thread {i}: a child has another cause than its root"
                );
                assert_eq!(
                    g.as_ref(),
                    Some(&root_err),
                    "round {round} thread {i}: a session under a child has another cause"
                );
            }
        }
    });
}

/// Two threads disable the same session, which has 2 000 forks, at once (say a request layer
/// ending the request while the handler ends it too). Documented for `disable()`: it invalidates
/// "this session, every session derived from it with `with_value`, and every fork"; it returns
/// `false` when the session was invalid already. So once either call has returned, no fork may
/// read valid. 300 rounds.
#[test]
fn after_a_losing_disable_returns_every_fork_is_invalid() {
    within("two disables racing", HANG, || {
        let mut worst = 0usize;
        for round in 0..300 {
            let root = SessionCtx::new(&Context::background());
            let forks: Arc<Vec<SessionCtx>> = Arc::new((0..2_000).map(|_| root.fork()).collect());
            let start = Arc::new(Barrier::new(2));
            let other = {
                let (root, forks, start) = (root.clone(), forks.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let won = root.disable();
                    (won, forks.iter().filter(|f| f.is_valid()).count())
                })
            };
            start.wait();
            let won = root.disable();
            let valid_here = forks.iter().filter(|f| f.is_valid()).count();
            let (other_won, valid_there) = other.join().unwrap();
            assert!(won != other_won, "round {round}: exactly one disable() returns true");
            worst = worst.max(valid_here).max(valid_there);
            assert_eq!(
                (valid_here, valid_there),
                (0, 0),
                "BUG: round {round}: forks still valid after disable() returned (this thread: {valid_here} of 2000, \
                 returned {won}; other thread: {valid_there}, returned {other_won})"
            );
        }
        assert_eq!(worst, 0);
    });
}

/// Three threads register `after_cancel` callbacks (stopping about half of them right away)
/// while a fourth cancels, in 300 rounds. Each callback that was not stopped runs exactly once;
/// `stop() == true` means it never runs; the callbacks re-enter the scope (register again: runs
/// inline; open a child: born cancelled; cancel again: `false`). Every closure is dropped
/// exactly once.
#[test]
fn after_cancel_registered_while_cancelling_runs_exactly_once_unless_stopped() {
    const ROUNDS: u64 = 300;
    const PER_THREAD: usize = 40;
    within("after_cancel racing cancel", HANG, || {
        let closures = Tracker::new();
        for round in 0..ROUNDS {
            let (ctx, cancel) = Context::background().with_cancel();
            let (sub, _sub_cancel) = ctx.with_cancel();
            let start = Arc::new(Barrier::new(4));
            let registrars: Vec<_> = (0..3u64)
                .map(|w| {
                    let (ctx, sub, cancel, start, closures) =
                        (ctx.clone(), sub.clone(), cancel.clone(), start.clone(), closures.clone());
                    std::thread::spawn(move || {
                        let mut rng = Rng(round * 31 + w + 1);
                        start.wait();
                        let mut out = Vec::new();
                        for i in 0..PER_THREAD {
                            let target = if i % 2 == 0 { ctx.clone() } else { sub.clone() };
                            let ran = Arc::new(AtomicUsize::new(0));
                            let nested = Arc::new(AtomicUsize::new(0));
                            let (r2, n2, token, inner_token) =
                                (ran.clone(), nested.clone(), closures.token(), closures.token());
                            let (t2, c2) = (target.clone(), cancel.clone());
                            let h = target.after_cancel(move || {
                                r2.fetch_add(1, Ordering::SeqCst);
                                // Re-enter the scope that is being cancelled.
                                let n3 = n2.clone();
                                let inner = t2.after_cancel(move || {
                                    n3.fetch_add(1, Ordering::SeqCst);
                                    drop(inner_token);
                                });
                                assert!(!inner.stop(), "a callback registered on a done scope runs inline");
                                let (born, _h) = t2.with_cancel();
                                assert!(born.is_done(), "a child opened in a callback is not born cancelled");
                                assert!(!c2.cancel(), "cancel() inside a callback returned true");
                                drop(token);
                            });
                            let stopped = rng.below(2) == 0 && h.stop();
                            out.push((ran, nested, stopped));
                        }
                        out
                    })
                })
                .collect();
            start.wait();
            for _ in 0..(round % 7) * 20 {
                std::hint::spin_loop();
            }
            assert!(cancel.cancel());
            for r in registrars {
                for (i, (ran, nested, stopped)) in
                    r.join().expect("a registering thread failed").into_iter().enumerate()
                {
                    let (ran, nested) = (ran.load(Ordering::SeqCst), nested.load(Ordering::SeqCst));
                    if stopped {
                        assert_eq!(ran, 0, "round {round} #{i}: stop() returned true but the callback ran");
                    } else {
                        assert_eq!(ran, 1, "round {round} #{i}: a callback that was not stopped ran {ran} times");
                    }
                    assert_eq!(nested, ran, "round {round} #{i}: the nested inline callback ran {nested} times");
                }
            }
            drop((ctx, sub, cancel));
        }
        assert_eq!(closures.made(), closures.dropped(), "callback closures leaked or dropped twice");
    });
}

/// A clock the test moves by hand, with a timer: `schedule` queues expiries, a timer thread fires
/// the due ones.
struct ManualClock {
    ms: AtomicU64,
    queue: Mutex<Vec<(Duration, Expiry)>>,
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_millis(self.ms.load(Ordering::SeqCst))
    }
    fn schedule(&self, at: Duration, expiry: Expiry) {
        self.queue.lock().unwrap().push((at, expiry));
    }
}

static TREE_CLOCK: ManualClock = ManualClock { ms: AtomicU64::new(0), queue: Mutex::new(Vec::new()) };

/// Deadlines racing cancels in a tree: the root session has a deadline, forks on four threads add
/// deadlines of their own (earlier and later), a timer thread fires due expiries while the clock
/// advances, and a canceller cancels the root's context with a cause. Every reader records the
/// first `Some` it sees per session: it never changes; every session ends done with either
/// `DeadlineExceeded` or the root's cause; every callback ran exactly once.
#[test]
fn deadlines_racing_cancel_in_a_forked_tree_keep_err_stable_and_callbacks_once() {
    const THREADS: u64 = 4;
    const ROUNDS: u64 = 30;
    within("deadlines racing cancels", HANG, || {
        let closures = Tracker::new();
        for round in 0..ROUNDS {
            let base_ms = round * 10_000;
            TREE_CLOCK.ms.store(base_ms, Ordering::SeqCst);
            TREE_CLOCK.queue.lock().unwrap().clear();
            let at = move |ms: u64| Instant::from_clock_time(&TREE_CLOCK, Duration::from_millis(base_ms + ms));
            let (ctx, cancel) = Context::background().with_cancel();
            let root = SessionCtx::with_deadline(&ctx, at(500));
            let cause = ContextError::cause(Cause(round));
            let stop = Arc::new(AtomicBool::new(false));
            // The timer, the advancer, the workers, the canceller and this thread.
            let start = Arc::new(Barrier::new(THREADS as usize + 4));
            let timer = {
                let (stop, start) = (stop.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    while !stop.load(Ordering::SeqCst) {
                        let now = TREE_CLOCK.now();
                        let due: Vec<Expiry> = {
                            let mut q = TREE_CLOCK.queue.lock().unwrap();
                            let (due, keep): (Vec<_>, Vec<_>) = q.drain(..).partition(|(t, _)| *t <= now);
                            *q = keep;
                            due.into_iter().map(|(_, e)| e).collect()
                        };
                        for e in due {
                            e.fire();
                        }
                        std::thread::yield_now();
                    }
                })
            };
            let advancer = {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    for _ in 0..100 {
                        TREE_CLOCK.ms.fetch_add(10, Ordering::SeqCst);
                        std::thread::yield_now();
                    }
                })
            };
            let workers: Vec<_> = (0..THREADS)
                .map(|w| {
                    let (root, start, closures) = (root.clone(), start.clone(), closures.clone());
                    std::thread::spawn(move || {
                        let mut rng = Rng(round * 97 + w + 3);
                        start.wait();
                        let mut mine: Vec<(SessionCtx, Option<ContextError>, Arc<AtomicUsize>, _)> = Vec::new();
                        for i in 0..60 {
                            let parent = if i > 0 && rng.below(2) == 0 {
                                mine[rng.below(mine.len() as u64) as usize].0.clone()
                            } else {
                                root.clone()
                            };
                            let s = match rng.below(3) {
                                0 => parent.fork(),
                                // Earlier or later than the root's own deadline.
                                _ => SessionCtx::with_deadline(parent.context(), at(rng.below(1_000))),
                            };
                            let ran = Arc::new(AtomicUsize::new(0));
                            let (r2, token) = (ran.clone(), closures.token());
                            let h = s.after_cancel(move || {
                                r2.fetch_add(1, Ordering::SeqCst);
                                drop(token);
                            });
                            let first = s.err();
                            mine.push((s, first, ran, h));
                            for (s, first, _, _) in &mut mine {
                                let now = s.err();
                                match first {
                                    Some(f) => assert_eq!(Some(&*f), now.as_ref(), "err() changed once Some"),
                                    None => *first = now,
                                }
                            }
                        }
                        mine
                    })
                })
                .collect();
            let canceller = {
                let (start, cause, cancel) = (start.clone(), cause.clone(), cancel.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for _ in 0..(round % 5) * 200 {
                        std::hint::spin_loop();
                    }
                    cancel.cancel_with_cause(cause)
                })
            };
            start.wait();
            let all: Vec<_> = workers.into_iter().flat_map(|w| w.join().expect("a forking thread failed")).collect();
            advancer.join().unwrap();
            canceller.join().unwrap();
            // Everything is done by now (cancelled, or past the deadline of 1 s at the latest).
            TREE_CLOCK.ms.store(base_ms + 2_000, Ordering::SeqCst);
            // Give the timer the last expiries, then stop it.
            while !TREE_CLOCK.queue.lock().unwrap().is_empty() {
                std::thread::yield_now();
            }
            stop.store(true, Ordering::SeqCst);
            timer.join().unwrap();
            for (i, (s, first, ran, _h)) in all.iter().enumerate() {
                let now = s.err().expect("every session is done");
                if let Some(f) = first {
                    assert_eq!(f, &now, "round {round} #{i}: err() changed once Some");
                }
                assert!(
                    now == ContextError::DeadlineExceeded || now == cause,
                    "round {round} #{i}: unexpected err() {now:?}"
                );
                assert_eq!(ran.load(Ordering::SeqCst), 1, "round {round} #{i}: a callback ran != once");
            }
            drop(all);
            drop((root, ctx, cancel));
        }
        assert_eq!(closures.made(), closures.dropped(), "callback closures leaked or dropped twice");
    });
}

/// Four threads block on `done()` of deep forks (some already past their own deadline on the
/// std clock: none) while the root is disabled; 200 rounds. No waiter is lost.
#[test]
fn done_waiters_on_four_threads_all_wake_when_an_ancestor_is_disabled() {
    within("done() waiters racing disable", HANG, || {
        for round in 0..200u64 {
            let root = SessionCtx::new(&Context::background());
            let start = Arc::new(Barrier::new(5));
            let waiters: Vec<_> = (0..4u64)
                .map(|w| {
                    let (root, start) = (root.clone(), start.clone());
                    std::thread::spawn(move || {
                        let mut s = root.fork();
                        for _ in 0..(w + round % 3) {
                            s = s.with_value("d", w).fork();
                        }
                        let done = s.done();
                        start.wait();
                        futures::executor::block_on(done);
                        s.err()
                    })
                })
                .collect();
            start.wait();
            if round % 2 == 0 {
                std::thread::yield_now();
            }
            assert!(root.disable());
            for w in waiters {
                assert_eq!(w.join().unwrap(), Some(ContextError::Canceled), "round {round}");
            }
        }
    });
}

/// A callback that panics among callbacks registered from three threads while a fourth cancels:
/// the panic reaches the canceller (or, for a registration after the cancel, the registering
/// thread), the whole tree is cancelled anyway, no callback runs twice, and every closure is
/// dropped exactly once, whether it ran or was dropped unrun after the panic.
#[test]
fn a_panicking_callback_racing_registrations_loses_no_closure_and_cancels_the_tree() {
    within("panicking callbacks racing cancel", HANG, || {
        let closures = Tracker::new();
        for round in 0..200u64 {
            let (ctx, cancel) = Context::background().with_cancel();
            let (child, _cc) = ctx.with_cancel();
            let start = Arc::new(Barrier::new(4));
            let registrars: Vec<_> = (0..3u64)
                .map(|w| {
                    let (ctx, child, start, closures) = (ctx.clone(), child.clone(), start.clone(), closures.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let mut runs = Vec::new();
                        let mut inline_panics = 0;
                        for i in 0..30u64 {
                            let ran = Arc::new(AtomicUsize::new(0));
                            let (r2, token) = (ran.clone(), closures.token());
                            let panics = (i + w + round) % 11 == 0;
                            let target = if i % 3 == 0 { &child } else { &ctx };
                            let registered = silently(|| {
                                target.after_cancel(move || {
                                    r2.fetch_add(1, Ordering::SeqCst);
                                    let _keep = token;
                                    if panics {
                                        panic!("hostile after_cancel callback");
                                    }
                                })
                            });
                            if registered.is_err() {
                                inline_panics += 1;
                            }
                            runs.push(ran);
                        }
                        (runs, inline_panics)
                    })
                })
                .collect();
            start.wait();
            let _ = silently(|| cancel.cancel());
            let mut total_inline = 0;
            for r in registrars {
                let (runs, inline) = r.join().expect("a registering thread failed");
                total_inline += inline;
                for ran in runs {
                    assert!(ran.load(Ordering::SeqCst) <= 1, "round {round}: a callback ran twice");
                }
            }
            let _ = total_inline;
            assert!(ctx.is_done() && child.is_done(), "round {round}: a panicking callback stopped the cancel");
            assert_eq!(child.err(), Some(ContextError::Canceled));
            drop((ctx, child, cancel));
            assert_eq!(closures.made(), closures.dropped(), "round {round}: closures leaked or dropped twice");
        }
    });
}

// --- a waker whose clone re-enters the scope --------------------------------------------------

static REENTRANT_CANCEL: OnceLock<CancelHandle> = OnceLock::new();
static WAKER_ARMED: AtomicBool = AtomicBool::new(false);
static WAKER_DATA: u8 = 0;

fn reentrant_clone(data: *const ()) -> RawWaker {
    if WAKER_ARMED.swap(false, Ordering::SeqCst)
        && let Some(c) = REENTRANT_CANCEL.get()
    {
        // User code of the waker: cancels the very scope whose `done()` is being polled.
        c.cancel();
    }
    RawWaker::new(data, &REENTRANT_VTABLE)
}
fn reentrant_noop(_: *const ()) {}
static REENTRANT_VTABLE: RawWakerVTable =
    RawWakerVTable::new(reentrant_clone, reentrant_noop, reentrant_noop, reentrant_noop);

/// A `done()` future re-polled with a different waker whose `clone` cancels the same scope (user
/// code re-entering the library). Expected: no deadlock; the future then resolves.
#[test]
fn a_waker_whose_clone_cancels_the_scope_does_not_deadlock_done() {
    in_child_within("a_waker_whose_clone_cancels_the_scope_does_not_deadlock_done", Duration::from_secs(20), || {
        let (ctx, cancel) = Context::background().with_cancel();
        REENTRANT_CANCEL.set(cancel).unwrap();
        let mut done = Box::pin(ctx.done());
        assert!(done.as_mut().poll(&mut TaskContext::from_waker(Waker::noop())).is_pending());
        // SAFETY: the vtable's functions ignore the data pointer (a static byte).
        let hostile =
            unsafe { Waker::from_raw(RawWaker::new(std::ptr::from_ref(&WAKER_DATA).cast(), &REENTRANT_VTABLE)) };
        WAKER_ARMED.store(true, Ordering::SeqCst);
        let polled = within("poll of done() with a re-entrant waker", Duration::from_secs(10), move || {
            let r = done.as_mut().poll(&mut TaskContext::from_waker(&hostile));
            (r.is_ready(), done.as_mut().poll(&mut TaskContext::from_waker(Waker::noop())).is_ready())
        });
        assert!(polled.1, "done() did not resolve after its scope was cancelled");
        assert!(ctx.is_done());
    });
}

// ---------------------------------------------------------------------------------------------
// 2. ShardedStore
// ---------------------------------------------------------------------------------------------

static ROUND: Key<u64> = Key::new("round");

/// A coordinator binds, per round, a fork of that round's root under eight unit ids, then
/// disables the root; four threads read the units and a fifth sweeps with `gc()`. After the
/// disable returned, no reader sees a session of that round as valid; after a sweep that started
/// after the disable returned, no unit still holds a session of that round.
#[test]
fn sharded_store_disabled_rounds_read_invalid_everywhere_and_a_later_sweep_removes_them() {
    const UNITS: u64 = 8;
    const ROUNDS: u64 = 2_000;
    within("ShardedStore binds racing gc", HANG, || {
        let store = Arc::new(
            ShardedStore::new(ManagerOptions { shard_number: 3, gc_interval: None, implicit_transmit: false }, || None)
                .unwrap(),
        );
        let disabled_upto = Arc::new(AtomicU64::new(0)); // rounds are 1-based
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..4u64)
            .map(|r| {
                let (store, disabled_upto, stop) = (store.clone(), disabled_upto.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    let mut unit = r;
                    while !stop.load(Ordering::SeqCst) {
                        unit = (unit + 1) % UNITS;
                        let d = disabled_upto.load(Ordering::SeqCst);
                        if let Some(s) = store.get(unit) {
                            let round = s.get_cloned(&ROUND).expect("every bound session has a round");
                            if round <= d {
                                assert!(
                                    !s.is_valid(),
                                    "unit {unit}: round {round} reads valid after its disable (upto {d})"
                                );
                                assert_eq!(s.err(), Some(ContextError::Canceled));
                            }
                            reads += 1;
                        }
                    }
                    reads
                })
            })
            .collect();
        let sweeper = {
            let (store, disabled_upto, stop) = (store.clone(), disabled_upto.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut swept = 0;
                while !stop.load(Ordering::SeqCst) {
                    let d = disabled_upto.load(Ordering::SeqCst);
                    swept += store.gc();
                    for unit in 0..UNITS {
                        if let Some(s) = store.get(unit) {
                            let round = s.get_cloned(&ROUND).unwrap();
                            assert!(
                                round > d,
                                "unit {unit}: gc() kept round {round}, disabled before it started (upto {d})"
                            );
                        }
                    }
                }
                swept
            })
        };
        for round in 1..=ROUNDS {
            let root = SessionCtx::new(&Context::background()).with(&ROUND, round);
            for unit in 0..UNITS {
                let s = if unit % 2 == 0 { root.fork() } else { root.fork().fork().with(&ROUND, round) };
                drop(store.bind(unit, s));
            }
            if round % 3 == 0 {
                drop(store.remove(round % UNITS));
            }
            assert!(root.disable());
            disabled_upto.store(round, Ordering::SeqCst);
        }
        stop.store(true, Ordering::SeqCst);
        let reads: u64 = readers.into_iter().map(|r| r.join().expect("a reader failed")).sum();
        let swept = sweeper.join().expect("the sweeper failed");
        assert!(reads > 0 && swept > 0, "the race did not happen: {reads} reads, {swept} swept");
        store.gc();
        assert!(store.is_empty(), "invalid sessions left after the last sweep: {:?}", store.shard_lens());
    });
}

/// A user session: validity from a flag, a counted token, and optional hostile `Drop`.
struct Hostile {
    valid: AtomicBool,
    panic_on_drop: bool,
    /// A store its `Drop` re-enters (bind, get, remove, gc, and the core's free functions over it).
    reenter: Option<&'static ShardedStore>,
    id: u64,
    _token: Token,
}

impl Session for Hostile {
    fn is_valid(&self) -> bool {
        self.valid.load(Ordering::SeqCst)
    }
    fn get_with(&self, _key: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) {
        f(None);
    }
    fn with_value_dyn(&self, key: DynKey, value: Arc<dyn Any + Send + Sync>) -> AnySession {
        SessionCtx::new(&Context::background()).with_value_dyn(key, value)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        if let Some(store) = self.reenter {
            let other = 1_000 + self.id % 7;
            drop(store.get(self.id));
            drop(store.bind(other, SessionCtx::new(&Context::background())));
            drop(store.remove(other));
            let _ = store.len();
            if self.id.is_multiple_of(5) {
                let _ = store.gc();
            }
        }
        if self.panic_on_drop && !std::thread::panicking() {
            panic!("hostile session Drop");
        }
    }
}

fn hostile(
    t: &Arc<Tracker>,
    id: u64,
    valid: bool,
    panic_on_drop: bool,
    reenter: Option<&'static ShardedStore>,
) -> AnySession {
    AnySession::custom(Hostile { valid: AtomicBool::new(valid), panic_on_drop, reenter, id, _token: t.token() })
}

/// The std `ShardedManager`'s GC thread sweeps an invalid user session whose `Drop` panics. The
/// GC thread must keep sweeping afterwards (the manager documents that the sweep catches user
/// panics; its `stop_gc` says "The GC thread catches user panics, so it does not panic itself"):
/// an invalid session bound later must still be swept.
#[test]
fn gc_thread_keeps_sweeping_after_a_swept_session_panics_in_drop() {
    let t = Tracker::new();
    let manager = ShardedManager::new(
        ManagerOptions { shard_number: 2, gc_interval: Some(Duration::from_secs(1)), implicit_transmit: false },
        || None,
    )
    .unwrap();
    let store = Arc::clone(manager.store());
    drop(store.bind(0, hostile(&t, 0, false, true, None)));
    // Wait until the first sweep took it (the panic happens in the GC thread).
    let started = std::time::Instant::now();
    while store.get(0).is_some() {
        assert!(started.elapsed() < HANG, "the GC thread never swept the invalid session");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Now a plain invalid session: the next sweeps must take it.
    let later = SessionCtx::new(&Context::background());
    drop(store.bind(1, later.clone()));
    later.disable();
    let started = std::time::Instant::now();
    let mut swept = false;
    while started.elapsed() < Duration::from_secs(5) {
        if store.get(1).is_none() {
            swept = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let sweeps = manager.gc_sweeps();
    manager.close();
    assert!(
        swept,
        "BUG: after a swept session's Drop panicked, the GC thread stopped sweeping (gc_sweeps() = {sweeps}; \
         an invalid session bound later stayed for 5 s with a 1 s gc_interval)"
    );
    assert_eq!(t.made(), t.dropped());
}

/// `gc()` sweeps two invalid user sessions of one shard whose `Drop` panics. The documented
/// contract is that user code, the drop of a removed session included, runs with no lock held so
/// that a panic leaves the store usable: the first panic may reach the caller of `gc()`, but the
/// process must not abort (it does if the second drop runs while the first unwinds).
#[test]
fn gc_of_two_sessions_with_panicking_drops_reports_the_panic_and_keeps_the_store_usable() {
    in_child_within(
        "gc_of_two_sessions_with_panicking_drops_reports_the_panic_and_keeps_the_store_usable",
        HANG,
        || {
            let t = Tracker::new();
            let store = ShardedStore::new(
                ManagerOptions { shard_number: 1, gc_interval: None, implicit_transmit: false },
                || None,
            )
            .unwrap();
            drop(store.bind(1, hostile(&t, 1, false, true, None)));
            drop(store.bind(2, hostile(&t, 2, false, true, None)));
            drop(store.bind(3, SessionCtx::new(&Context::background())));
            let r = silently(|| store.gc());
            assert!(r.is_err(), "a Drop panicked: the panic reaches the caller");
            // The store is still usable.
            assert!(store.get(3).is_some_and(|s| s.is_valid()));
            drop(store.bind(4, SessionCtx::new(&Context::background())));
            assert_eq!(store.len(), 2, "the invalid sessions were removed, the valid ones stay");
        },
    );
}

static REENTER_STORE: OnceLock<ShardedStore> = OnceLock::new();

thread_local! {
    static UNIT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Four threads bind / replace / remove user sessions whose `Drop` re-enters the same store
/// (get, bind, remove, len, gc) — some of them also panicking in `Drop` — through the store's API
/// and through `enter_in` over it as a `ContextStore`, while a fifth sweeps. No deadlock, and
/// every session is dropped exactly once.
#[test]
fn sharded_store_sessions_whose_drop_reenters_the_store_never_deadlock_or_leak() {
    let store: &'static ShardedStore = REENTER_STORE.get_or_init(|| {
        ShardedStore::new(ManagerOptions { shard_number: 4, gc_interval: None, implicit_transmit: false }, || {
            UNIT.with(std::cell::Cell::get)
        })
        .unwrap()
    });
    let t = Tracker::new();
    let t2 = t.clone();
    within("re-entrant session drops in a ShardedStore", HANG, move || {
        let t = t2;
        let stop = Arc::new(AtomicBool::new(false));
        let sweeper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut panics = 0;
                while !stop.load(Ordering::SeqCst) {
                    if silently(|| store.gc()).is_err() {
                        panics += 1;
                    }
                }
                panics
            })
        };
        let workers: Vec<_> = (0..4u64)
            .map(|w| {
                let t = t.clone();
                std::thread::spawn(move || {
                    UNIT.with(|u| u.set(Some(100 + w)));
                    let mut rng = Rng(w * 1_000_003 + 17);
                    let mut panics = 0;
                    for i in 0..3_000u64 {
                        let id = w + 4 * rng.below(8);
                        // A session entered through the ContextStore impl must stay current: valid.
                        let valid = i % 4 == 2 || rng.below(2) == 0;
                        let panicky = rng.below(10) == 0;
                        let s = hostile(&t, id, valid, panicky, Some(store));
                        let r = silently(|| match i % 4 {
                            0 => drop(store.bind(id, s)),
                            1 => {
                                drop(store.bind(id, s));
                                drop(store.remove(id));
                            }
                            2 => {
                                // Through the ContextStore impl: the unit's id is 100 + w.
                                let _g = localsession_core::enter_in(store, s);
                                let seen = localsession_core::with_current_in(store, |c| c.is_some());
                                assert!(seen, "enter_in over the sharded store: nothing current");
                            }
                            _ => {
                                drop(store.bind(id, s));
                                drop(store.get(id));
                            }
                        });
                        if r.is_err() {
                            panics += 1;
                        }
                    }
                    panics
                })
            })
            .collect();
        let worker_panics: usize = workers.into_iter().map(|w| w.join().expect("a worker failed")).sum();
        stop.store(true, Ordering::SeqCst);
        let sweep_panics = sweeper.join().expect("the sweeper failed");
        let _ = (worker_panics, sweep_panics);
        // Empty the store (dropping what is left may panic and re-enter too).
        for _ in 0..4 {
            for id in (0..64).chain(1_000..1_010).chain(100..104) {
                let _ = silently(|| drop(store.remove(id)));
            }
        }
        assert!(store.is_empty(), "left: {:?}", store.shard_lens());
    });
    assert_eq!(t.made(), t.dropped(), "sessions leaked or dropped twice: {} made", t.made());
}

// ---------------------------------------------------------------------------------------------
// 3. SessionMap
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Val {
    n: u64,
    _token: Token,
}

/// Two writers each write their pair of keys in order (`a_w = n`, then `b_w = n`), churn 64
/// other keys (inserts and removes, so the map compacts), while two readers take `export()`
/// snapshots, clone and drop handles, and read through the map. A snapshot is consistent: it holds
/// `b_w <= a_w <= b_w + 1`, and reads the same later, after many more writes. Reads through the
/// map never go back in time. Every value is dropped exactly once after everything is released.
#[test]
fn map_snapshots_taken_under_concurrent_writers_are_consistent_and_values_drop_once() {
    const WRITES: u64 = 6_000;
    let t = Tracker::new();
    let t2 = t.clone();
    within("SessionMap writers racing snapshots", HANG, move || {
        let t = t2;
        let map = SessionMap::new();
        let key_a = |w: u64| 1_000_000 + w * 2;
        let key_b = |w: u64| 1_000_001 + w * 2;
        for w in 0..2 {
            map.insert(key_a(w), Val { n: 0, _token: t.token() });
            map.insert(key_b(w), Val { n: 0, _token: t.token() });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (map, t) = (map.clone(), t.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng(w + 99);
                    for n in 1..=WRITES {
                        map.insert(key_a(w), Val { n, _token: t.token() });
                        map.insert(key_b(w), Val { n, _token: t.token() });
                        let k = rng.below(64);
                        if rng.below(3) == 0 {
                            map.remove(&k);
                        } else {
                            map.insert(k, Val { n, _token: t.token() });
                        }
                    }
                })
            })
            .collect();
        let readers: Vec<_> = (0..2u64)
            .map(|r| {
                let (map, stop) = (map.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut kept: Vec<(Context, [u64; 4])> = Vec::new();
                    let mut last_a = [0u64; 2];
                    let mut snapshots = 0u64;
                    let read =
                        |ctx: &Context, key: u64| ctx.value::<Val, _>(&key).expect("the pair keys are never removed").n;
                    while !stop.load(Ordering::SeqCst) {
                        let handle = map.clone();
                        let snap = handle.export();
                        let vals = [
                            read(&snap, key_a(0)),
                            read(&snap, key_b(0)),
                            read(&snap, key_a(1)),
                            read(&snap, key_b(1)),
                        ];
                        for w in 0..2 {
                            let (a, b) = (vals[w * 2], vals[w * 2 + 1]);
                            assert!(
                                b <= a && a <= b + 1,
                                "reader {r}: inconsistent snapshot for writer {w}: a={a} b={b}"
                            );
                        }
                        // Through the map: b first, then a (a read later is never older).
                        for w in 0..2u64 {
                            let b = handle.read(&key_b(w), |v: Option<&Val>| v.map(|v| v.n)).unwrap();
                            let a = handle.value::<Val, _>(&key_a(w)).unwrap().n;
                            assert!(
                                a >= b,
                                "reader {r}: a read of a_{w} ({a}) older than an earlier read of b_{w} ({b})"
                            );
                            assert!(
                                a >= last_a[w as usize],
                                "reader {r}: a_{w} went back from {} to {a}",
                                last_a[w as usize]
                            );
                            last_a[w as usize] = a;
                        }
                        let len = handle.len();
                        assert!((4..=68).contains(&len), "reader {r}: len() {len} out of range");
                        snapshots += 1;
                        if snapshots.is_multiple_of(16) {
                            kept.push((snap, vals));
                            if kept.len() > 64 {
                                kept.remove(0);
                            }
                        }
                        drop(handle);
                        // Old snapshots read what they read when taken.
                        if let Some((old, vals)) = kept.first() {
                            let now =
                                [read(old, key_a(0)), read(old, key_b(0)), read(old, key_a(1)), read(old, key_b(1))];
                            assert_eq!(&now, vals, "reader {r}: a snapshot changed after later writes");
                        }
                    }
                    snapshots
                })
            })
            .collect();
        for w in writers {
            w.join().expect("a writer failed");
        }
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            assert!(r.join().expect("a reader failed") > 0);
        }
        for w in 0..2 {
            assert_eq!(map.value::<Val, _>(&key_a(w)).unwrap().n, WRITES);
            assert_eq!(map.value::<Val, _>(&key_b(w)).unwrap().n, WRITES);
        }
        drop(map);
    });
    assert_eq!(t.made(), t.dropped(), "map values leaked or dropped twice: {} made", t.made());
}

/// Set while hostile values may panic in `Drop`; cleared before the last drops (two panicking
/// drops in one unwinding would abort, as for any Rust container).
static DROP_PANICS_ARMED: AtomicBool = AtomicBool::new(false);

/// A map value with hostile `Drop`: panics (while armed), or re-enters the library — writes to its
/// own map, reads it, and binds / reads / scopes on the std store of whichever thread frees it.
struct HostileVal {
    kind: u8,
    map: Option<SessionMap>,
    key: u64,
    _token: Token,
}

impl Drop for HostileVal {
    fn drop(&mut self) {
        match self.kind {
            1 if DROP_PANICS_ARMED.load(Ordering::SeqCst) && !std::thread::panicking() => {
                panic!("hostile map value Drop")
            }
            2 => {
                if let Some(map) = self.map.take() {
                    // A write to the map whose writer is freeing this value.
                    map.insert(500_000 + self.key % 8, self.key);
                    let _ = map.value::<u64, _>(&(500_000 + self.key % 8));
                    let _ = map.len();
                }
                let before = current();
                scope(SessionCtx::new(&Context::background()).with(&ROUND, self.key), || {
                    assert_eq!(current().and_then(|c| c.get_cloned(&ROUND)), Some(self.key));
                });
                let after = current();
                assert_eq!(before.is_some(), after.is_some(), "scope in a Drop did not restore the binding");
                if let Some(b) = before {
                    assert!(after.unwrap().ptr_eq(&b), "scope in a Drop restored another binding");
                }
            }
            _ => {}
        }
    }
}

/// Four writers insert values whose `Drop` panics or re-enters the library (a write to the same
/// map holding a weak back-reference through a clone taken out before the map's end; std binds
/// and scopes) while two readers read; panics from `insert` are caught. No deadlock; each writer's
/// last value per key is what the map holds; after the panics are disarmed and the map dropped,
/// every value is dropped exactly once.
#[test]
fn map_values_with_panicking_and_reentrant_drops_under_four_writers_lose_nothing() {
    let _std = std_shared();
    let t = Tracker::new();
    let t2 = t.clone();
    let panics = within("hostile map value drops", HANG, move || {
        let t = t2;
        let map = SessionMap::new();
        DROP_PANICS_ARMED.store(true, Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2u64)
            .map(|r| {
                let (map, stop) = (map.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng(r + 5);
                    while !stop.load(Ordering::SeqCst) {
                        let k = rng.below(4) * 100 + rng.below(16);
                        map.read(&k, |v: Option<&HostileVal>| {
                            if let Some(v) = v {
                                assert_eq!(v.key / 1_000_000, k, "a value under another key");
                            }
                        });
                    }
                })
            })
            .collect();
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let (map, t) = (map.clone(), t.clone());
                std::thread::spawn(move || {
                    let _g = enter(SessionCtx::new(&Context::background()).with(&ROUND, 7_000 + w));
                    let mut panics = 0;
                    let mut last = [0u64; 16];
                    for i in 1..=2_500u64 {
                        let k = w * 100 + i % 16;
                        let kind = (i % 5) as u8; // 1: panics, 2: re-enters
                        let back = (kind == 2).then(|| map.clone());
                        let v = HostileVal { kind, map: back, key: k * 1_000_000 + i, _token: t.token() };
                        if silently(|| map.insert(k, v)).is_err() {
                            panics += 1;
                        }
                        last[(i % 16) as usize] = i;
                        if i % 97 == 0 {
                            let _ = silently(|| map.remove(&(w * 100 + 15)));
                            last[15] = 0;
                        }
                    }
                    assert_eq!(
                        current().and_then(|c| c.get_cloned(&ROUND)),
                        Some(7_000 + w),
                        "a Drop run on this thread changed its binding"
                    );
                    (panics, last)
                })
            })
            .collect();
        let mut panics = 0;
        let mut lasts = Vec::new();
        for w in writers {
            let (p, last) = w.join().expect("a writer failed");
            panics += p;
            lasts.push(last);
        }
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().expect("a reader failed");
        }
        for (w, last) in lasts.iter().enumerate() {
            for (slot, &i) in last.iter().enumerate() {
                let k = w as u64 * 100 + slot as u64;
                let got = map.read(&k, |v: Option<&HostileVal>| v.map(|v| v.key % 1_000_000));
                assert_eq!(got, (i != 0).then_some(i), "key {k}: the map does not hold the writer's last value");
            }
        }
        // Still armed: if the races above freed no panicking value yet (old chains are freed only
        // after a compaction's grace period), keep writing until one is freed here.
        for i in 0..50_000u64 {
            if panics > 0 {
                break;
            }
            let v = HostileVal { kind: 1, map: None, key: (900 + i % 16) * 1_000_000 + i, _token: t.token() };
            if silently(|| map.insert(900 + i % 16, v)).is_err() {
                panics += 1;
            }
        }
        DROP_PANICS_ARMED.store(false, Ordering::SeqCst);
        // Break the back-references (values that hold their own map): overwrite every key with a
        // plain value, write enough to compact and free the old chains, then drop the map.
        for round in 0..3 {
            for w in 0..4u64 {
                for s in 0..16u64 {
                    map.insert(w * 100 + s, round);
                }
            }
            for i in 0..400u64 {
                map.insert(999, i);
            }
        }
        drop(map);
        panics
    });
    assert!(panics > 0, "no Drop panicked: the test did not exercise what it claims");
    assert_eq!(t.made(), t.dropped(), "hostile map values leaked or dropped twice: {} made", t.made());
}

/// Keys that all hash alike and whose `Eq` panics (one comparison in 13, from any thread): four
/// threads insert, read and remove, catching the panics. No deadlock; once the flag is
/// cleared the map works (a fresh value per key reads back); every key and value is dropped
/// exactly once after the map is dropped.
#[test]
fn map_keys_whose_eq_panics_under_concurrent_writers_leak_nothing() {
    static EQ_PANICS: AtomicBool = AtomicBool::new(false);
    static EQ_CALLS: AtomicUsize = AtomicUsize::new(0);
    #[derive(Debug)]
    struct BadKey(u64, Token);
    impl PartialEq for BadKey {
        fn eq(&self, other: &Self) -> bool {
            // While armed, one comparison in 13 panics, from whichever thread makes it.
            if EQ_PANICS.load(Ordering::SeqCst) && EQ_CALLS.fetch_add(1, Ordering::Relaxed).is_multiple_of(13) {
                panic!("hostile Eq");
            }
            self.0 == other.0
        }
    }
    impl Eq for BadKey {}
    impl Hash for BadKey {
        fn hash<H: Hasher>(&self, h: &mut H) {
            // Every key gets the same tag: every lookup compares keys.
            0u8.hash(h);
        }
    }
    impl Clone for BadKey {
        fn clone(&self) -> Self {
            BadKey(self.0, self.1.0.token())
        }
    }
    let keys = Tracker::new();
    let vals = Tracker::new();
    let (k2, v2) = (keys.clone(), vals.clone());
    within("hostile keys under concurrent writers", HANG, move || {
        let (keys, vals) = (k2, v2);
        let map = SessionMap::new();
        EQ_PANICS.store(true, Ordering::SeqCst);
        let workers: Vec<_> = (0..4u64)
            .map(|w| {
                let (map, keys, vals) = (map.clone(), keys.clone(), vals.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng(w * 7 + 1);
                    let mut panics = 0;
                    for _ in 0..1_500 {
                        let k = rng.below(40);
                        let r = silently(|| match rng.below(4) {
                            0 | 1 => map.insert(BadKey(k, keys.token()), Val { n: k, _token: vals.token() }),
                            2 => {
                                let probe = BadKey(k, keys.token());
                                if let Some(v) = map.value::<Val, _>(&probe) {
                                    assert_eq!(v.n, k, "a value under another key");
                                }
                            }
                            _ => {
                                map.remove(&BadKey(k, keys.token()));
                            }
                        });
                        if r.is_err() {
                            panics += 1;
                        }
                    }
                    panics
                })
            })
            .collect();
        let panics: usize = workers.into_iter().map(|w| w.join().expect("a worker failed")).sum();
        EQ_PANICS.store(false, Ordering::SeqCst);
        assert!(panics > 0, "no Eq panicked: the test did not exercise what it claims");
        for k in 0..40 {
            map.insert(BadKey(k, keys.token()), Val { n: k + 1_000, _token: vals.token() });
        }
        for k in 0..40 {
            assert_eq!(map.value::<Val, _>(&BadKey(k, keys.token())).map(|v| v.n), Some(k + 1_000), "key {k}");
        }
        assert_eq!(map.len(), 40);
        drop(map);
    });
    assert_eq!(keys.made(), keys.dropped(), "keys leaked or dropped twice: {} made", keys.made());
    assert_eq!(vals.made(), vals.dropped(), "values leaked or dropped twice: {} made", vals.made());
}

/// A map disabled by one thread while four others write, read, export and register
/// `after_cancel` callbacks that write to the map: after `disable()` returned, every handle and
/// every snapshot reads invalid; each callback ran exactly once; writes keep working (Go parity:
/// a disabled map is still a map).
#[test]
fn a_map_disabled_while_written_reads_invalid_everywhere_and_callbacks_run_once() {
    within("SessionMap disable racing writers", HANG, || {
        for round in 0..40u64 {
            let map = SessionMap::new();
            let disabled = Arc::new(AtomicBool::new(false));
            let start = Arc::new(Barrier::new(5));
            let workers: Vec<_> = (0..4u64)
                .map(|w| {
                    let (map, disabled, start) = (map.clone(), disabled.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let mut runs = Vec::new();
                        let mut snaps = Vec::new();
                        for i in 0..200u64 {
                            let before = disabled.load(Ordering::SeqCst);
                            map.insert(w, i);
                            let snap = map.export();
                            if before {
                                assert!(!map.is_valid(), "round {round}: the map reads valid after disable() returned");
                                assert!(snap.is_done(), "round {round}: a snapshot reads valid after disable()");
                                assert_eq!(map.err(), Some(ContextError::Canceled));
                            }
                            let ran = Arc::new(AtomicUsize::new(0));
                            let (r2, m2) = (ran.clone(), map.clone());
                            let _h = map.after_cancel(move || {
                                r2.fetch_add(1, Ordering::SeqCst);
                                m2.insert(100 + w, i);
                            });
                            if before {
                                assert_eq!(ran.load(Ordering::SeqCst), 1, "round {round}: not run inline");
                            }
                            runs.push(ran);
                            if i % 20 == 0 {
                                snaps.push(snap);
                            }
                        }
                        (runs, snaps)
                    })
                })
                .collect();
            start.wait();
            for _ in 0..(round % 4) * 500 {
                std::hint::spin_loop();
            }
            assert!(map.disable());
            disabled.store(true, Ordering::SeqCst);
            for w in workers {
                let (runs, snaps) = w.join().expect("a worker failed");
                for ran in runs {
                    assert_eq!(ran.load(Ordering::SeqCst), 1, "round {round}: a map callback ran != once");
                }
                for s in snaps {
                    assert!(s.is_done(), "round {round}: a snapshot taken before disable() is not done");
                }
            }
            for w in 0..4u64 {
                assert_eq!(map.value::<u64, _>(&w).as_deref(), Some(&199));
                assert!(map.value::<u64, _>(&(100 + w)).is_some(), "a callback's write is lost");
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 4. reset_default_manager racing bind / scope / enter / current
// ---------------------------------------------------------------------------------------------

static TAG: Key<Arc<AtomicU64>> = Key::new("tag");
const UNSURE: u64 = u64::MAX;

/// Four threads bind, scope, enter and read on the std store while a fifth resets the default
/// manager 300 times. Each session is tagged with the number of resets *started* before its
/// binding began, confirmed unchanged after the binding completed (otherwise it raced a reset and
/// is not checked). Documented: every session bound before a reset is unbound, and `enter`
/// guards / scopes opened before it do not restore old bindings. So a thread that has seen reset
/// number `t + 1` complete must never read a session tagged `t` again — through `current()`,
/// `with_current`, or after a guard or scope ends.
#[test]
fn after_reset_returns_no_thread_reads_a_session_bound_before_it() {
    const THREADS: u64 = 4;
    let _std = std_exclusive();
    let started = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    within("reset racing bind/scope/current", HANG, move || {
        let ops_total = Arc::new(AtomicU64::new(0));
        let opts = ManagerOptions { shard_number: 1, gc_interval: None, implicit_transmit: false };
        reset_default_manager(opts).expect("reset initializes the manager");
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..THREADS)
            .map(|w| {
                let (started, completed, stop, ops_total) =
                    (started.clone(), completed.clone(), stop.clone(), ops_total.clone());
                std::thread::spawn(move || {
                    let new_session = || {
                        let tag = Arc::new(AtomicU64::new(UNSURE));
                        (
                            SessionCtx::new(&Context::background()).with(&TAG, tag.clone()),
                            tag,
                            started.load(Ordering::SeqCst),
                        )
                    };
                    let confirm = |tag: &AtomicU64, s0: u64| {
                        if started.load(Ordering::SeqCst) == s0 {
                            tag.store(s0, Ordering::SeqCst);
                        }
                    };
                    let check = |what: &str| {
                        let c = completed.load(Ordering::SeqCst);
                        let seen = current().and_then(|s| s.get_cloned(&TAG)).map(|t| t.load(Ordering::SeqCst));
                        if let Some(t) = seen
                            && t != UNSURE
                        {
                            assert!(
                                c <= t,
                                "thread {w}, {what}: read a session bound before reset #{} after {c} resets completed",
                                t + 1
                            );
                        }
                        let c = completed.load(Ordering::SeqCst);
                        let borrowed =
                            with_current(|s| s.and_then(|s| s.get_cloned(&TAG)).map(|t| t.load(Ordering::SeqCst)));
                        if let Some(t) = borrowed
                            && t != UNSURE
                        {
                            assert!(c <= t, "thread {w}, {what} (with_current): a pre-reset session after {c} resets");
                        }
                    };
                    let mut rng = Rng(w + 1234);
                    let mut ops = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        ops += 1;
                        ops_total.fetch_add(1, Ordering::SeqCst);
                        match rng.below(5) {
                            0 | 1 => {
                                let (s, tag, s0) = new_session();
                                bind(s).unwrap();
                                confirm(&tag, s0);
                                check("after bind");
                            }
                            2 => {
                                let (s, tag, s0) = new_session();
                                scope(s, || {
                                    confirm(&tag, s0);
                                    check("inside scope");
                                    std::thread::yield_now();
                                    check("inside scope, later");
                                });
                                check("after scope");
                            }
                            3 => {
                                let (s, tag, s0) = new_session();
                                let g = enter(s);
                                confirm(&tag, s0);
                                check("inside enter");
                                let (s2, tag2, s02) = new_session();
                                let g2 = enter(s2);
                                confirm(&tag2, s02);
                                std::thread::yield_now();
                                check("nested enter");
                                drop(g2);
                                check("after nested guard");
                                drop(g);
                                check("after guard");
                            }
                            _ => {
                                if rng.below(4) == 0 {
                                    drop(unbind());
                                }
                                check("read");
                            }
                        }
                    }
                    drop(unbind());
                    ops
                })
            })
            .collect();
        for i in 0..300 {
            // Paced by the workers: each reset waits until they made some progress.
            let target = ops_total.load(Ordering::SeqCst) + 40;
            while ops_total.load(Ordering::SeqCst) < target {
                std::thread::yield_now();
            }
            started.fetch_add(1, Ordering::SeqCst);
            reset_default_manager(opts).expect("reset");
            completed.fetch_add(1, Ordering::SeqCst);
            if i % 3 == 0 {
                std::thread::yield_now();
            }
        }
        stop.store(true, Ordering::SeqCst);
        let ops: Vec<u64> = workers.into_iter().map(|w| w.join().expect("a worker saw a pre-reset session")).collect();
        assert!(ops.iter().all(|&n| n > 0), "{ops:?}");
    });
}
