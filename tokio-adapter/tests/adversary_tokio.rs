//! Adversarial tests of the tokio adapter (implicit mode under `--cfg tokio_unstable`, explicit
//! helpers, and the contain mode of runtimes without hooks): resets, sweeps, LocalSets and
//! nested runtimes inside hooked tasks, LocalRuntime, JoinSet/abort, spawn_blocking with
//! `Handle::block_on`, shutdown_timeout/shutdown_background, reentrant session `Drop`s, enter
//! guards held across `.await` or forgotten.
//!
//! The implicit table, the manager generation and the panic hook are process-wide: every test
//! of this file takes `serial()`.
#![cfg(tokio_unstable)]
#![allow(missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use localsession_core::{Context, Key, SessionCtx};
use localsession_std::{
    bind, current, default_manager_options, enter, reset_default_manager, scope, unbind, with_current, without_flow,
};
use localsession_tokio::{FutureExt, ImplicitSessions, implicit_task_sessions, implicit_tasks, sweep_ended_sessions};
use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::{JoinSet, LocalSet, yield_now};

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

static REQ: Key<u64> = Key::new("adversary_req");

fn sess(n: u64) -> SessionCtx {
    SessionCtx::new(&Context::background()).with(&REQ, n)
}

/// The request id of the session current on this thread (inside a task: the task's).
fn cur() -> Option<u64> {
    with_current(|s| s.and_then(|s| s.read_key(&REQ, |v| v.copied())))
}

fn implicit_mt(workers: usize) -> Runtime {
    let mut builder = Builder::new_multi_thread();
    builder.worker_threads(workers).max_blocking_threads(4).enable_all();
    ImplicitSessions::new().install(&mut builder);
    builder.build().unwrap()
}

fn implicit_ct() -> Runtime {
    let mut builder = Builder::new_current_thread();
    builder.enable_all();
    ImplicitSessions::new().install(&mut builder);
    builder.build().unwrap()
}

/// A runtime without the hooks (contain mode); registers tokio's task probe.
fn plain_ct() -> Runtime {
    let mut builder = Builder::new_current_thread();
    builder.enable_all();
    localsession_tokio::apply_manager_options(&mut builder).unwrap();
    builder.build().unwrap()
}

/// Waits (bounded, 5 s) until the implicit table is back to the given counts.
fn wait_baseline(what: &str, tasks: usize, sessions: usize) {
    let start = Instant::now();
    loop {
        let (t, s) = (implicit_tasks(), implicit_task_sessions());
        if t == tasks && s == sessions {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what}: table not back to its baseline: {t} tasks / {s} sessions (expected {tasks} / {sessions})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn baseline() -> (usize, usize) {
    (implicit_tasks(), implicit_task_sessions())
}

/// Returns `Pending` once after waking its own task during the poll (another worker may start
/// the next poll before this worker's after-poll hook ran).
struct WakeMidPoll(bool);

impl Future for WakeMidPoll {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

// ---------------------------------------------------------------------------------------------
// reset_default_manager while tasks run
// ---------------------------------------------------------------------------------------------

/// A reset made inside a hooked task's poll must not be undone by the after-poll hook: the
/// thread's binding from before the reset must not come back (it does not in explicit mode,
/// see the control test below; `WithSession`'s `Restore` checks the generation).
#[test]
fn reset_inside_an_implicit_task_leaves_the_block_on_thread_unbound() {
    let _serial = serial();
    let rt = implicit_ct();
    let after = rt.block_on(async {
        bind(sess(100)).unwrap(); // the block_on thread's own binding
        without_flow(|| tokio::spawn(async { reset_default_manager(default_manager_options()).unwrap() }))
            .await
            .unwrap();
        cur()
    });
    drop(rt);
    let _ = unbind();
    assert_eq!(after, None, "a binding made before reset_default_manager is visible again after it");
}

/// Control for the test above: the same with the explicit helper on a runtime without hooks.
#[test]
fn reset_inside_an_explicit_task_leaves_the_block_on_thread_unbound() {
    let _serial = serial();
    let rt = plain_ct();
    let after = rt.block_on(async {
        bind(sess(100)).unwrap();
        localsession_tokio::spawn(async { reset_default_manager(default_manager_options()).unwrap() }).await.unwrap();
        cur()
    });
    drop(rt);
    let _ = unbind();
    assert_eq!(after, None);
}

/// A task's own binding is unbound by a reset (the task reads `None` right after it); it must
/// not come back at the task's next poll (it does not in explicit mode, see the control).
#[test]
fn a_reset_inside_an_implicit_task_is_not_undone_by_its_next_poll() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_mt(2);
    let seen = rt
        .block_on(async {
            tokio::spawn(async {
                bind(sess(200)).unwrap();
                reset_default_manager(default_manager_options()).unwrap();
                let right_after = cur();
                yield_now().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
                (right_after, cur())
            })
            .await
        })
        .unwrap();
    drop(rt);
    wait_baseline("reset in a task", t0, s0);
    assert_eq!(seen, (None, None), "(right after the reset, after the next await)");
}

/// Control for the test above (explicit helper, runtime without hooks).
#[test]
fn a_reset_inside_an_explicit_task_is_not_undone_by_its_next_poll() {
    let _serial = serial();
    let rt = plain_ct();
    let seen = rt
        .block_on(async {
            localsession_tokio::spawn(async {
                bind(sess(200)).unwrap();
                reset_default_manager(default_manager_options()).unwrap();
                let right_after = cur();
                yield_now().await;
                (right_after, cur())
            })
            .await
        })
        .unwrap();
    drop(rt);
    assert_eq!(seen, (None, None));
}

/// Resets from another thread while 4 workers' worth of tasks bind, wake themselves mid-poll and
/// spawn: no panic, every JoinHandle resolves, the table returns to its baseline.
#[test]
fn resets_racing_with_busy_implicit_tasks_break_nothing() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_mt(4);
    let stop = Arc::new(AtomicBool::new(false));
    let resetter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 200 {
                reset_default_manager(default_manager_options()).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let foreign = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let mut hs = Vec::new();
        for i in 0..400u64 {
            let foreign = foreign.clone();
            hs.push(tokio::spawn(async move {
                for k in 0..10u64 {
                    let mine = i * 100 + k;
                    bind(sess(mine)).unwrap();
                    WakeMidPoll(false).await;
                    // A reset may have unbound it; anything else is a foreign session.
                    match cur() {
                        None => {}
                        Some(v) if v == mine => {}
                        Some(_) => {
                            foreign.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    tokio::spawn(async {}).await.unwrap();
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
    });
    stop.store(true, Ordering::SeqCst);
    resetter.join().unwrap();
    drop(rt);
    wait_baseline("resets racing", t0, s0);
    assert_eq!(foreign.load(Ordering::SeqCst), 0, "polls saw another task's session");
}

// ---------------------------------------------------------------------------------------------
// units the hooks do not see, polled inside a hooked task
// ---------------------------------------------------------------------------------------------

/// A plain `spawn_local` task of a LocalSet run inside a hooked task (block_in_place +
/// Handle::block_on) binds its own session. The hooked task must keep its own: its 666 must
/// never reach the host, its entry or its children. (Failed before: the bind was recorded in
/// the host's entry, `(Some(666), Some(666), Some(666))`.) For the rest of that one poll the
/// host reads nothing — the slot holds the local task's contained binding, as on a runtime
/// without hooks — and from its next poll on its own session again.
#[test]
fn plain_spawn_local_bind_inside_a_hooked_task_does_not_reach_the_hosting_task() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_mt(2);
    let seen = rt
        .block_on(async {
            tokio::spawn(async {
                bind(sess(1)).unwrap();
                tokio::task::block_in_place(|| {
                    let local = LocalSet::new();
                    Handle::current().block_on(local.run_until(async {
                        tokio::task::spawn_local(async { bind(sess(666)).unwrap() }).await.unwrap();
                    }));
                });
                let same_poll = cur();
                yield_now().await;
                (same_poll, cur(), tokio::spawn(async { cur() }).await.unwrap())
            })
            .await
        })
        .unwrap();
    drop(rt);
    wait_baseline("spawn_local in a hooked task", t0, s0);
    assert_eq!(
        seen,
        (None, Some(1), Some(1)),
        "(the hosting task right after the LocalSet, after its next await, its child)"
    );
}

/// A plain task of a runtime without hooks, run inside a hooked task (block_in_place + an inner
/// runtime's block_on), binds its own session. The hooked task must keep its own (failed
/// before: `(Some(666), Some(666))`); as above, it reads nothing for the rest of that poll.
#[test]
fn tasks_of_a_plain_nested_runtime_inside_a_hooked_task_do_not_rebind_it() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_mt(2);
    let seen = rt
        .block_on(async {
            tokio::spawn(async {
                bind(sess(1)).unwrap();
                tokio::task::block_in_place(|| {
                    let inner = Builder::new_current_thread().enable_all().build().unwrap();
                    inner.block_on(async { tokio::spawn(async { bind(sess(666)).unwrap() }).await.unwrap() });
                });
                let same_poll = cur();
                yield_now().await;
                (same_poll, cur())
            })
            .await
        })
        .unwrap();
    drop(rt);
    wait_baseline("nested plain runtime", t0, s0);
    assert_eq!(seen, (None, Some(1)), "(the hosting task right after, after its next await)");
}

/// The explicit `spawn_local` helper inside a hooked task: its bindings stay with it, the host
/// keeps its session (regression coverage for the documented remedy).
#[test]
fn explicit_spawn_local_inside_a_hooked_task_keeps_the_host_session() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_mt(2);
    let seen = rt
        .block_on(async {
            tokio::spawn(async {
                bind(sess(1)).unwrap();
                let inner = tokio::task::block_in_place(|| {
                    let local = LocalSet::new();
                    Handle::current().block_on(local.run_until(async {
                        let h = scope(sess(7), || {
                            localsession_tokio::spawn_local(async {
                                let inherited = cur();
                                bind(sess(666)).unwrap();
                                yield_now().await;
                                (inherited, cur())
                            })
                        });
                        h.await.unwrap()
                    }))
                });
                yield_now().await;
                (inner, cur())
            })
            .await
        })
        .unwrap();
    drop(rt);
    wait_baseline("explicit spawn_local", t0, s0);
    assert_eq!(seen, ((Some(7), Some(666)), Some(1)));
}

// ---------------------------------------------------------------------------------------------
// sweep_ended_sessions
// ---------------------------------------------------------------------------------------------

/// The sweep runs (on another thread) while the task is in the middle of a poll. The docs
/// promise the task runs without the ended session "from its next poll on".
fn sweep_during_a_poll() -> Option<u64> {
    let rt = implicit_mt(2);
    let request = sess(5);
    let (in_poll_tx, in_poll_rx) = std::sync::mpsc::channel::<()>();
    let (swept_tx, swept_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    // Spawned from this thread (inside the runtime's context), inheriting its scope.
    let entered = rt.enter();
    let h = scope(request.clone(), || {
        tokio::spawn(async move {
            go_rx.await.unwrap();
            in_poll_tx.send(()).unwrap();
            swept_rx.recv_timeout(Duration::from_secs(5)).expect("the sweep");
            yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
            cur()
        })
    });
    drop(entered);
    request.disable(); // the request ends
    go_tx.send(()).unwrap();
    in_poll_rx.recv_timeout(Duration::from_secs(5)).expect("the task's poll");
    assert_eq!(sweep_ended_sessions(), 1, "the sweep should clear the task's ended session");
    swept_tx.send(()).unwrap();
    let seen = rt.block_on(h).unwrap();
    drop(rt);
    seen
}

#[test]
fn a_sweep_during_a_poll_holds_from_the_next_poll_on() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let seen = sweep_during_a_poll();
    wait_baseline("sweep", t0, s0);
    assert_eq!(seen, None);
}

// ---------------------------------------------------------------------------------------------
// LocalRuntime, JoinSet, abort, spawn_blocking, shutdown
// ---------------------------------------------------------------------------------------------

/// tokio's LocalRuntime fires the spawn hook for `spawn_local`: inheritance, sticky binds and
/// the table's release work there too.
#[test]
fn local_runtime_inherits_contains_and_releases() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let mut builder = Builder::new_current_thread();
    builder.enable_all();
    ImplicitSessions::new().install(&mut builder);
    let rt = builder.build_local(tokio::runtime::LocalOptions::default()).unwrap();
    let seen = rt.block_on(async {
        let rc = std::rc::Rc::new(()); // !Send: only a local task can hold it
        let a = scope(sess(3), || {
            tokio::task::spawn_local(async move {
                let _rc = rc;
                let inherited = cur();
                bind(sess(4)).unwrap();
                yield_now().await;
                let child = tokio::task::spawn_local(async { cur() }).await.unwrap();
                (inherited, cur(), child)
            })
        });
        let b = tokio::task::spawn_local(async { cur() });
        (a.await.unwrap(), b.await.unwrap(), cur())
    });
    drop(rt);
    wait_baseline("LocalRuntime", t0, s0);
    assert_eq!(seen, ((Some(3), Some(4), Some(4)), None, None));
}

/// 4 workers: JoinSet tasks with their own sessions rebind, wake themselves mid-poll and wake
/// / abort each other; the set is aborted halfway and a second set dropped. No poll sees a
/// foreign session; the table returns to its baseline.
#[test]
fn join_sets_abort_and_cross_wakes_keep_sessions_apart_4_workers() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_mt(4);
    let foreign = Arc::new(AtomicU64::new(0));
    let polls = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let notifies: Arc<Vec<tokio::sync::Notify>> = Arc::new((0..600).map(|_| tokio::sync::Notify::new()).collect());
        let aborts: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::new(Mutex::new(Vec::new()));
        let mut set = JoinSet::new();
        for i in 0..600u64 {
            let (foreign, polls, notifies, task_aborts) =
                (foreign.clone(), polls.clone(), notifies.clone(), aborts.clone());
            let handle = scope(sess(i * 1000), || {
                set.spawn(async move {
                    let mut rng = XorShift(i * 7919 + 1);
                    let mut mine = i * 1000;
                    for k in 1..20u64 {
                        polls.fetch_add(1, Ordering::Relaxed);
                        if cur() != Some(mine) {
                            foreign.fetch_add(1, Ordering::SeqCst);
                        }
                        match rng.next() % 6 {
                            0 => {
                                mine = i * 1000 + k;
                                bind(sess(mine)).unwrap();
                                WakeMidPoll(false).await;
                            }
                            1 => {
                                // wake a random other task from this worker, mid-poll
                                notifies[(rng.next() % 600) as usize].notify_one();
                                yield_now().await;
                            }
                            2 => {
                                let _ = tokio::time::timeout(Duration::from_millis(1), notifies[i as usize].notified())
                                    .await;
                            }
                            3 => {
                                let target = rng.next() as usize;
                                {
                                    let handles = task_aborts.lock().unwrap();
                                    if !handles.is_empty() && target.is_multiple_of(10) {
                                        handles[target % handles.len()].abort();
                                    }
                                }
                                WakeMidPoll(false).await;
                            }
                            4 => {
                                // a child inherits, then the parent keeps its own
                                let child = tokio::spawn(async move { cur() }).await.unwrap();
                                if child != Some(mine) {
                                    foreign.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            _ => {
                                let v = scope(sess(999_999), cur);
                                if v != Some(999_999) {
                                    foreign.fetch_add(1, Ordering::SeqCst);
                                }
                                yield_now().await;
                            }
                        }
                    }
                    if cur() != Some(mine) {
                        foreign.fetch_add(1, Ordering::SeqCst);
                    }
                    mine
                })
            });
            aborts.lock().unwrap().push(handle);
        }
        let mut finished = 0;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(_) => finished += 1,
                Err(e) => assert!(e.is_cancelled(), "a task panicked: {e}"),
            }
            if finished == 300 {
                set.abort_all();
            }
        }
        // A second set, dropped while its tasks are parked.
        let mut set2 = JoinSet::new();
        for i in 0..300u64 {
            scope(sess(5_000_000 + i), || {
                set2.spawn(async move {
                    std::future::pending::<()>().await;
                });
            });
        }
        yield_now().await;
        drop(set2);
    });
    drop(rt);
    wait_baseline("join sets", t0, s0);
    assert!(polls.load(Ordering::Relaxed) > 1000);
    assert_eq!(foreign.load(Ordering::SeqCst), 0, "polls saw a session that was not their task's");
}

/// A task aborts itself in the middle of its poll: its future is dropped with its own session
/// installed, the JoinHandle reports the cancellation, the entry is released.
#[test]
fn self_abort_mid_poll_drops_with_the_tasks_session_and_releases() {
    let _serial = serial();
    let (t0, s0) = baseline();
    for workers in [2, 4] {
        let rt = implicit_mt(workers);
        let seen_on_drop = Arc::new(Mutex::new(Vec::new()));
        rt.block_on(async {
            let mut hs = Vec::new();
            for i in 0..200u64 {
                let (tx, rx) = tokio::sync::oneshot::channel::<tokio::task::AbortHandle>();
                let seen = seen_on_drop.clone();
                let h = scope(sess(i), || {
                    tokio::spawn(async move {
                        let _guard = OnDrop(move || seen.lock().unwrap().push((i, cur())));
                        let me = rx.await.unwrap();
                        bind(sess(10_000 + i)).unwrap();
                        me.abort();
                        WakeMidPoll(false).await;
                        std::future::pending::<()>().await;
                    })
                });
                tx.send(h.abort_handle()).unwrap();
                hs.push(h);
            }
            for h in hs {
                let err = tokio::time::timeout(Duration::from_secs(5), h).await.expect("JoinHandle never resolved");
                assert!(err.unwrap_err().is_cancelled());
            }
        });
        drop(rt);
        let seen = seen_on_drop.lock().unwrap();
        assert_eq!(seen.len(), 200);
        for (i, s) in seen.iter() {
            assert_eq!(*s, Some(10_000 + i), "task {i}'s future was dropped with another session");
        }
    }
    wait_baseline("self abort", t0, s0);
}

/// spawn_blocking (helper) + Handle::block_on + tokio::spawn inside the blocking closure: the
/// task inherits; a plain spawn_blocking job on the same (only) blocking thread afterwards sees
/// nothing, nor does one after a plain job that bound sticky.
#[test]
fn spawn_blocking_block_on_spawn_inherit_and_leave_nothing_behind() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let mut builder = Builder::new_multi_thread();
    builder.worker_threads(2).max_blocking_threads(1).enable_all();
    ImplicitSessions::new().install(&mut builder);
    let rt = builder.build().unwrap();
    let seen = rt.block_on(async {
        let a = scope(sess(1), || {
            localsession_tokio::spawn_blocking(|| {
                let in_task = Handle::current().block_on(async { tokio::spawn(async { cur() }).await.unwrap() });
                (cur(), in_task)
            })
        })
        .await
        .unwrap();
        let b = tokio::task::spawn_blocking(cur).await.unwrap();
        let c = tokio::task::spawn_blocking(|| {
            bind(sess(2)).unwrap();
            cur()
        })
        .await
        .unwrap();
        let d = tokio::task::spawn_blocking(|| {
            let plain = cur();
            let child = Handle::current().block_on(async { tokio::spawn(async { cur() }).await.unwrap() });
            (plain, child)
        })
        .await
        .unwrap();
        let e = scope(sess(3), || localsession_tokio::spawn_blocking(cur)).await.unwrap();
        let f = tokio::task::spawn_blocking(cur).await.unwrap();
        (a, b, c, d, e, f)
    });
    drop(rt);
    wait_baseline("spawn_blocking", t0, s0);
    assert_eq!(seen, ((Some(1), Some(1)), None, Some(2), (None, None), Some(3), None));
}

/// shutdown_timeout while a task holding a session is stuck in block_in_place, and idle tasks
/// hold sessions: every entry is released once the stuck task returns.
#[test]
fn shutdown_timeout_with_a_task_in_block_in_place_releases_every_entry() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_mt(2);
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    rt.block_on(async {
        scope(sess(1), || {
            tokio::spawn(async move {
                tokio::task::block_in_place(|| {
                    started_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                });
                std::future::pending::<()>().await;
            })
        });
        for i in 0..100u64 {
            scope(sess(100 + i), || tokio::spawn(std::future::pending::<()>()));
        }
        yield_now().await;
    });
    started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(implicit_task_sessions() >= s0 + 101);
    rt.shutdown_timeout(Duration::from_millis(10));
    wait_baseline("shutdown_timeout", t0, s0);
}

/// shutdown_background with idle tasks holding sessions, some of which spawn from their Drop:
/// the table is released asynchronously.
#[test]
fn shutdown_background_releases_every_entry() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_mt(4);
    rt.block_on(async {
        for i in 0..300u64 {
            scope(sess(i), || {
                tokio::spawn(async move {
                    let _spawn_on_drop = OnDrop(move || {
                        if let Ok(h) = Handle::try_current() {
                            drop(h.spawn(async {}));
                        }
                    });
                    std::future::pending::<()>().await;
                })
            });
        }
        yield_now().await;
    });
    rt.shutdown_background();
    wait_baseline("shutdown_background", t0, s0);
}

// ---------------------------------------------------------------------------------------------
// reentrant session drops
// ---------------------------------------------------------------------------------------------

static REENTRANT_DROPS: AtomicUsize = AtomicUsize::new(0);
static REENTRANT_MADE: AtomicUsize = AtomicUsize::new(0);

/// A session value whose Drop reads, binds and spawns (reentrancy into the store, the table and
/// the runtime while the hooks drop it).
struct Reentrant;

impl Drop for Reentrant {
    fn drop(&mut self) {
        REENTRANT_DROPS.fetch_add(1, Ordering::SeqCst);
        let _ = current();
        let _ = bind(sess(424_242));
        if let Ok(h) = Handle::try_current() {
            drop(h.spawn(async { cur() }));
        }
    }
}

static REENTRANT: Key<Reentrant> = Key::new("adversary_reentrant");

fn reentrant_session(n: u64) -> SessionCtx {
    REENTRANT_MADE.fetch_add(1, Ordering::SeqCst);
    sess(n).with(&REENTRANT, Reentrant)
}

/// Session values whose Drop binds and spawns, dropped by the hooks (task end, abort, rebind
/// elsewhere, shutdown): nothing aborts, JoinHandles resolve, the block_on thread keeps its own
/// session, sessionless probes see none, and the table returns to its baseline.
#[test]
fn reentrant_session_drops_in_hooks_break_nothing() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let drops_before = REENTRANT_DROPS.load(Ordering::SeqCst);
    let made_before = REENTRANT_MADE.load(Ordering::SeqCst);
    // current_thread: the worker is the block_on thread.
    let rt = implicit_ct();
    let kept = rt.block_on(async {
        bind(sess(50)).unwrap();
        for i in 0..50u64 {
            let h = without_flow(|| {
                tokio::spawn(async move {
                    bind(reentrant_session(i)).unwrap();
                    yield_now().await;
                    if i % 2 == 0 {
                        bind(sess(1)).unwrap();
                    }
                    i
                })
            });
            assert_eq!(tokio::time::timeout(Duration::from_secs(5), h).await.unwrap().unwrap(), i);
        }
        let aborted = without_flow(|| {
            tokio::spawn(async {
                bind(reentrant_session(77)).unwrap();
                std::future::pending::<()>().await;
            })
        });
        yield_now().await;
        aborted.abort();
        let _ = aborted.await;
        for _ in 0..10 {
            yield_now().await;
        }
        let probe = without_flow(|| tokio::spawn(async { cur() })).await.unwrap();
        (cur(), probe)
    });
    drop(rt);
    let _ = unbind();
    assert_eq!(kept, (Some(50), None), "(the block_on future's own session, a sessionless probe)");

    // multi-thread: last references dropped by late after-poll hooks on other workers.
    let rt = implicit_mt(4);
    let probes = rt.block_on(async {
        let mut hs = Vec::new();
        for i in 0..400u64 {
            hs.push(without_flow(|| {
                tokio::spawn(async move {
                    bind(reentrant_session(i)).unwrap();
                    WakeMidPoll(false).await;
                    bind(sess(i)).unwrap();
                    WakeMidPoll(false).await;
                })
            }));
        }
        for h in hs {
            tokio::time::timeout(Duration::from_secs(5), h).await.expect("JoinHandle never resolved").unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..200 {
            seen.push(without_flow(|| tokio::spawn(async { cur() })).await.unwrap());
        }
        for _ in 0..50 {
            without_flow(|| {
                tokio::spawn(async {
                    bind(reentrant_session(9)).unwrap();
                    std::future::pending::<()>().await;
                })
            });
        }
        yield_now().await;
        seen
    });
    drop(rt); // shutdown drops the last 50 with their Drop spawning on a closed runtime
    assert!(
        probes.iter().all(Option::is_none),
        "a sessionless task saw a session: {:?}",
        probes.iter().flatten().next()
    );
    wait_baseline("reentrant drops", t0, s0);
    let start = Instant::now();
    let made = REENTRANT_MADE.load(Ordering::SeqCst) - made_before;
    while REENTRANT_DROPS.load(Ordering::SeqCst) - drops_before < made && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // (the last 50 may not have been polled before the shutdown: they then made no value)
    assert!(made >= 451, "made {made}");
    assert_eq!(REENTRANT_DROPS.load(Ordering::SeqCst) - drops_before, made, "session values never dropped");
}

/// Runtime shutdown drops a parked task's future outside a poll, before the terminate hook:
/// the hooks cannot install the task's session around that drop (documented in the implicit
/// module: the drop sees the dropping thread's binding). The documented remedy: a task spawned
/// with `spawn_with` (or a future wrapped `with_session`) drops with its own session, not the
/// session of the thread that happens to drop the runtime.
#[test]
fn a_task_future_dropped_at_shutdown_with_spawn_with_sees_its_own_session() {
    let _serial = serial();
    let rt = implicit_ct();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    rt.block_on(async move {
        localsession_tokio::spawn_with(sess(1), async move {
            let _g = OnDrop(move || s2.lock().unwrap().push(cur()));
            std::future::pending::<()>().await;
        });
        yield_now().await;
    });
    bind(sess(999)).unwrap(); // another request's session on the thread that drops the runtime
    drop(rt);
    let _ = unbind();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, [Some(1)], "the task's drop ran with its own session");
}

// ---------------------------------------------------------------------------------------------
// enter guards held across .await, forgotten
// ---------------------------------------------------------------------------------------------

/// An enter guard held across `.await` by a current_thread runtime's block_on future (allowed:
/// block_on needs no Send): tasks spawned before it do not see it, tasks spawned under it
/// inherit it, and it is gone after the guard drops.
#[test]
fn an_enter_guard_across_await_in_block_on_reaches_only_what_it_spawns() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_ct();
    let seen = rt.block_on(async {
        let early = tokio::spawn(async {
            yield_now().await;
            yield_now().await;
            cur()
        });
        let guard = enter(sess(5));
        let child = tokio::spawn(async { cur() });
        yield_now().await;
        let (e, c) = (early.await.unwrap(), child.await.unwrap());
        let during = cur();
        drop(guard);
        (e, c, during, cur())
    });
    drop(rt);
    wait_baseline("enter across await", t0, s0);
    assert_eq!(seen, (None, Some(5), Some(5), None));
}

/// A forgotten enter guard inside a hooked task becomes that task's binding only.
#[test]
fn a_forgotten_enter_guard_in_a_hooked_task_stays_with_that_task() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_mt(2);
    let seen = rt.block_on(async {
        let t = tokio::spawn(async {
            std::mem::forget(enter(sess(9)));
            WakeMidPoll(false).await;
            cur()
        });
        let t = t.await.unwrap();
        let other = tokio::spawn(async {
            yield_now().await;
            cur()
        })
        .await
        .unwrap();
        (t, other, cur())
    });
    drop(rt);
    wait_baseline("forgotten guard", t0, s0);
    assert_eq!(seen, (Some(9), None, None));
}

// ---------------------------------------------------------------------------------------------
// a mixed workload returns the table to its baseline
// ---------------------------------------------------------------------------------------------

/// Everything at once on a current_thread and a 2-worker runtime: spawn_blocking (plain and
/// helper), block_in_place with nested hooked and plain runtimes, JoinSet drop, abort, timers.
#[test]
fn a_mixed_workload_returns_the_table_to_its_baseline() {
    let _serial = serial();
    let (t0, s0) = baseline();
    for flavor in ["current_thread", "multi_thread"] {
        let rt = if flavor == "current_thread" { implicit_ct() } else { implicit_mt(2) };
        let wrong = rt.block_on(async move {
            let mut wrong = 0u32;
            for round in 0..20u64 {
                let mine = round + 1;
                let h = scope(sess(mine), || {
                    tokio::spawn(async move {
                        let mut wrong = 0u32;
                        let _ = tokio::task::spawn_blocking(|| bind(sess(0))).await;
                        let _ = localsession_tokio::spawn_blocking(cur).await;
                        if flavor == "multi_thread" {
                            tokio::task::block_in_place(|| {
                                let mut b = Builder::new_current_thread();
                                ImplicitSessions::new().install(b.enable_all());
                                let inner = b.build().unwrap();
                                let v = inner.block_on(async { tokio::spawn(async { cur() }).await.unwrap() });
                                if v != Some(mine) {
                                    wrong += 1;
                                }
                            });
                        }
                        let mut set = JoinSet::new();
                        for _ in 0..20 {
                            set.spawn(async {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                cur()
                            });
                        }
                        if let Some(Ok(v)) = set.join_next().await
                            && v != Some(mine)
                        {
                            wrong += 1;
                        }
                        drop(set);
                        let a = tokio::spawn(std::future::pending::<()>());
                        yield_now().await;
                        a.abort();
                        if cur() != Some(mine) {
                            wrong += 1;
                        }
                        wrong
                    })
                });
                wrong += h.await.unwrap();
            }
            wrong
        });
        drop(rt);
        assert_eq!(wrong, 0, "{flavor}: a task saw a session that was not its own");
    }
    wait_baseline("mixed workload", t0, s0);
}

// Keep `FutureExt` used (explicit combinators on an implicit runtime).
#[test]
fn in_current_session_inside_a_hooked_task_that_rebinds() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_mt(2);
    let seen = rt.block_on(async {
        scope(sess(1), || {
            tokio::spawn(async {
                let inner = async {
                    bind(sess(2)).unwrap(); // sticks to the inner wrapper
                    WakeMidPoll(false).await;
                    cur()
                }
                .in_current_session()
                .await;
                WakeMidPoll(false).await;
                (inner, cur())
            })
        })
        .await
        .unwrap()
    });
    drop(rt);
    wait_baseline("in_current_session", t0, s0);
    assert_eq!(seen, (Some(2), Some(1)));
}

/// Tasks that panic while holding a bound session (mid-poll, after a mid-poll wake): the
/// JoinHandles report the panics, the runtime and its workers live on, the table is released.
#[test]
fn panicking_tasks_with_bound_sessions_release_their_entries() {
    let _serial = serial();
    let (t0, s0) = baseline();
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.payload().downcast_ref::<&str>().copied().unwrap_or("");
            if !msg.starts_with("adversary:") {
                previous(info);
            }
        }));
    });
    for workers in [2, 4] {
        let rt = implicit_mt(workers);
        let after = rt.block_on(async {
            let mut hs = Vec::new();
            for i in 0..200u64 {
                hs.push(scope(sess(i), || {
                    tokio::spawn(async move {
                        bind(sess(i + 1_000)).unwrap();
                        WakeMidPoll(false).await;
                        if i % 2 == 0 {
                            panic!("adversary: a task panics with a session bound");
                        }
                        cur()
                    })
                }));
            }
            for (i, h) in hs.into_iter().enumerate() {
                let r = tokio::time::timeout(Duration::from_secs(5), h).await.expect("JoinHandle never resolved");
                match r {
                    Ok(v) => assert_eq!(v, Some(i as u64 + 1_000)),
                    Err(e) => assert!(e.is_panic() && i % 2 == 0),
                }
            }
            let mut seen = Vec::new();
            for _ in 0..100 {
                seen.push(tokio::spawn(async { cur() }).await.unwrap());
            }
            seen
        });
        drop(rt);
        assert!(after.iter().all(Option::is_none), "a sessionless task saw a session after the panics");
    }
    wait_baseline("panicking tasks", t0, s0);
}

/// A LocalSet run by a current_thread runtime's block_on (not inside a hooked task): a plain
/// spawn_local task's sticky bind is contained to it (block_on and the next local task do not
/// see it); what it spawns inherits it.
#[test]
fn plain_spawn_local_bind_under_block_on_is_contained() {
    let _serial = serial();
    let (t0, s0) = baseline();
    let rt = implicit_ct();
    let local = LocalSet::new();
    let seen = local.block_on(&rt, async {
        let child = tokio::task::spawn_local(async {
            bind(sess(666)).unwrap();
            yield_now().await;
            tokio::spawn(async { cur() }).await.unwrap()
        });
        yield_now().await;
        let next = tokio::task::spawn_local(async { cur() }).await.unwrap();
        let child = child.await.unwrap();
        (child, next, cur())
    });
    drop(local);
    drop(rt);
    wait_baseline("LocalSet under block_on", t0, s0);
    assert_eq!(seen, (Some(666), None, None), "(what the binding task spawned, the next local task, block_on)");
}
