//! Implicit mode under the hook orderings tokio allows (`--cfg tokio_unstable`), at 2 and 4
//! workers: tasks that bind and are woken in the middle of the poll (so that another worker
//! may start the next poll before this worker's after-poll hook ran), tasks that then complete
//! or are aborted elsewhere, nested polls, spawns on a shut-down runtime, and session values
//! whose `Drop` panics.
//!
//! Each test failed on the earlier hook design, which wrote a poll's bindings into the task
//! table from the after-poll hook and dropped sessions inside the poll hooks.
//!
//! The implicit table is process-wide: the tests of this file run one at a time (`serial`).
//! `LOCALSESSION_STRESS=1` runs 10^7 polls instead of 10^6.
#![cfg(tokio_unstable)]
#![allow(missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use localsession_core::{Context, Key, SessionCtx};
use localsession_std::{bind, current, with_current};
use localsession_tokio::{ImplicitSessions, hook_drop_panics, implicit_task_sessions, implicit_tasks};
use tokio::runtime::{Builder, Runtime};

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn stress() -> bool {
    std::env::var_os("LOCALSESSION_STRESS").is_some_and(|v| v != "0")
}

static CREATED: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// A session value that counts its drops.
struct Mark {
    n: u64,
}

impl Mark {
    fn new(n: u64) -> Mark {
        CREATED.fetch_add(1, Ordering::Relaxed);
        Mark { n }
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

static MARK: Key<Mark> = Key::new("mark");

fn marked(n: u64) -> SessionCtx {
    SessionCtx::new(&Context::background()).with(&MARK, Mark::new(n))
}

fn current_mark() -> Option<u64> {
    with_current(|s| s.and_then(|s| s.read_key(&MARK, |m| m.map(|m| m.n))))
}

/// Returns `Pending` once, after waking its own task *during* the poll: the task is notified
/// while running, so tokio reschedules it as soon as the poll returns — and an idle worker may
/// steal and poll it before this worker ran the after-poll hook.
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

fn runtime(workers: usize) -> Runtime {
    let mut builder = Builder::new_multi_thread();
    builder.worker_threads(workers).enable_all();
    ImplicitSessions::new().install(&mut builder);
    builder.build().unwrap()
}

/// Waits (bounded) until the table is back to `tasks`/`sessions` entries and every `Mark` is
/// dropped.
fn assert_released(tasks: usize, sessions: usize) {
    let start = std::time::Instant::now();
    loop {
        let (t, s) = (implicit_tasks(), implicit_task_sessions());
        let (c, d) = (CREATED.load(Ordering::SeqCst), DROPPED.load(Ordering::SeqCst));
        if t == tasks && s == sessions && c == d {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not released: {t} tasks / {s} sessions in the table (expected {tasks} / {sessions}), \
             {c} marks created, {d} dropped"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `tasks` tasks of `polls` polls each. Every poll checks that it sees the task's latest
/// binding, binds the next one and wakes itself mid-poll; a third of the tasks end by
/// completing, a third by being aborted by a sibling while parked, a third by unbinding.
fn polls_see_their_own_latest_binding(workers: usize) {
    let _serial = serial();
    let total: u64 = if stress() { 10_000_000 } else { 1_000_000 } / 2;
    let tasks: u64 = 1000;
    let polls = total / tasks;
    let (tasks_before, sessions_before) = (implicit_tasks(), implicit_task_sessions());
    let stale = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let rt = runtime(workers);
    rt.block_on(async {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (stale, done) = (stale.clone(), done.clone());
            let parked = Arc::new(AtomicBool::new(false));
            let flag = parked.clone();
            let h = tokio::spawn(async move {
                let mut expect = None;
                for p in 0..polls {
                    if current_mark() != expect {
                        stale.fetch_add(1, Ordering::Relaxed);
                    }
                    let n = t * polls + p;
                    bind(marked(n)).unwrap();
                    expect = Some(n);
                    WakeMidPoll(false).await;
                }
                if current_mark() != expect {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
                match t % 3 {
                    // Park forever with the binding: the test aborts it.
                    0 => {
                        flag.store(true, Ordering::SeqCst);
                        std::future::pending::<()>().await;
                    }
                    1 => drop(localsession_std::unbind()),
                    _ => {}
                }
            });
            handles.push((h, parked));
        }
        for (h, parked) in handles {
            if h.is_finished() {
                h.await.unwrap();
                continue;
            }
            // Abort parked tasks from here (another task), after they bound their session.
            let start = std::time::Instant::now();
            while !parked.load(Ordering::SeqCst) && !h.is_finished() {
                assert!(start.elapsed() < Duration::from_secs(60), "a task never finished its polls");
                tokio::task::yield_now().await;
            }
            if parked.load(Ordering::SeqCst) {
                h.abort();
                assert!(h.await.unwrap_err().is_cancelled());
            } else {
                h.await.unwrap();
            }
        }
    });
    drop(rt);
    assert_eq!(done.load(Ordering::SeqCst), tasks);
    assert_eq!(stale.load(Ordering::SeqCst), 0, "polls that did not see their task's latest binding");
    assert_released(tasks_before, sessions_before);
}

#[test]
fn polls_see_their_own_latest_binding_2_workers() {
    polls_see_their_own_latest_binding(2);
}

#[test]
fn polls_see_their_own_latest_binding_4_workers() {
    polls_see_their_own_latest_binding(4);
}

/// A task that binds, is woken mid-poll and completes in its next poll — likely on another
/// worker, before the first worker's after-poll hook ran.
fn completing_elsewhere_leaves_no_entry(workers: usize) {
    let _serial = serial();
    let tasks = if stress() { 500_000 } else { 50_000 };
    let (tasks_before, sessions_before) = (implicit_tasks(), implicit_task_sessions());
    let rt = runtime(workers);
    rt.block_on(async {
        let mut batch = Vec::with_capacity(1000);
        for t in 0..tasks {
            batch.push(tokio::spawn(async move {
                bind(marked(t)).unwrap();
                WakeMidPoll(false).await;
                assert_eq!(current_mark(), Some(t));
            }));
            if batch.len() == 1000 {
                for h in batch.drain(..) {
                    h.await.unwrap();
                }
            }
        }
        for h in batch {
            h.await.unwrap();
        }
    });
    drop(rt);
    assert_released(tasks_before, sessions_before);
}

#[test]
fn completing_elsewhere_leaves_no_entry_2_workers() {
    completing_elsewhere_leaves_no_entry(2);
}

#[test]
fn completing_elsewhere_leaves_no_entry_4_workers() {
    completing_elsewhere_leaves_no_entry(4);
}

#[test]
fn spawn_on_a_shut_down_runtime_leaves_no_entry() {
    let _serial = serial();
    let (tasks_before, sessions_before) = (implicit_tasks(), implicit_task_sessions());
    for flavor in [Builder::new_current_thread(), Builder::new_multi_thread()] {
        let mut builder = flavor;
        ImplicitSessions::new().install(builder.enable_all());
        let rt = builder.build().unwrap();
        let handle = rt.handle().clone();
        drop(rt);
        // tokio terminates the task before its spawn hook runs.
        let h = localsession_std::scope(marked(1), || handle.spawn(async {}));
        drop(h);
    }
    assert_released(tasks_before, sessions_before);
}

#[test]
fn nested_polls_keep_the_outer_tasks_bindings() {
    let _serial = serial();
    let (tasks_before, sessions_before) = (implicit_tasks(), implicit_task_sessions());
    for workers in [2, 4] {
        let rt = runtime(workers);
        let seen = rt.block_on(async {
            tokio::spawn(async {
                bind(marked(1)).unwrap();
                let inner_seen = tokio::task::block_in_place(|| {
                    let mut inner = Builder::new_current_thread();
                    ImplicitSessions::new().install(inner.enable_all());
                    let inner = inner.build().unwrap();
                    // The inner task is polled on this thread, inside the outer task's poll.
                    inner.block_on(async {
                        tokio::spawn(async {
                            let inherited = current_mark();
                            bind(marked(99)).unwrap(); // the inner task's own binding stays with it
                            tokio::task::yield_now().await;
                            (inherited, current_mark())
                        })
                        .await
                        .unwrap()
                    })
                });
                let outer_after_inner = current_mark();
                bind(marked(2)).unwrap(); // a later bind of the outer task must stick
                WakeMidPoll(false).await;
                tokio::time::sleep(Duration::from_millis(1)).await;
                (inner_seen, outer_after_inner, current_mark())
            })
            .await
            .unwrap()
        });
        drop(rt);
        assert_eq!(seen, ((Some(1), Some(99)), Some(1), Some(2)));
    }
    assert_released(tasks_before, sessions_before);
}

static PANICKY_ARMED: AtomicBool = AtomicBool::new(true);

/// A session value whose `Drop` panics (once armed).
struct PanicOnDrop;

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        if PANICKY_ARMED.load(Ordering::SeqCst) && !std::thread::panicking() {
            panic!("PanicOnDrop: a user Drop that panics");
        }
    }
}

static PANICKY: Key<PanicOnDrop> = Key::new("panicky");

#[test]
fn a_panicking_session_drop_never_takes_the_runtime_down() {
    let _serial = serial();
    let (tasks_before, sessions_before) = (implicit_tasks(), implicit_task_sessions());
    let caught_before = hook_drop_panics();
    for workers in [2, 4] {
        let rt = runtime(workers);
        rt.block_on(async {
            // 1. The task ends with the value bound: its last reference goes with the task's
            //    entry. Caught and counted; the JoinHandle resolves.
            let h = tokio::spawn(async {
                bind(SessionCtx::new(&Context::background()).with(&PANICKY, PanicOnDrop)).unwrap();
                WakeMidPoll(false).await;
                7
            });
            assert_eq!(h.await.unwrap(), 7);

            // 2. The task replaces the value by binding another: the last drop usually runs
            //    inside the task, an ordinary task panic that its JoinHandle reports — unless
            //    the late after-poll hook of the task's previous poll (on another worker) still
            //    held a clone; then the last drop is that hook's, caught and counted.
            let caught = hook_drop_panics();
            let h = tokio::spawn(async {
                bind(SessionCtx::new(&Context::background()).with(&PANICKY, PanicOnDrop)).unwrap();
                WakeMidPoll(false).await;
                bind(marked(5)).unwrap();
            });
            match h.await {
                Err(e) => assert!(e.is_panic()),
                Ok(()) => {
                    let start = std::time::Instant::now();
                    while hook_drop_panics() == caught {
                        assert!(start.elapsed() < Duration::from_secs(10), "the panicking drop went nowhere");
                        tokio::task::yield_now().await;
                    }
                }
            }

            // 3. Aborted while holding it.
            let h = tokio::spawn(async {
                bind(SessionCtx::new(&Context::background()).with(&PANICKY, PanicOnDrop)).unwrap();
                std::future::pending::<()>().await;
            });
            tokio::task::yield_now().await;
            h.abort();
            let _ = h.await;

            // The runtime still works, on every worker.
            let mut hs = Vec::new();
            for i in 0..64u64 {
                hs.push(tokio::spawn(async move {
                    bind(marked(i)).unwrap();
                    WakeMidPoll(false).await;
                    current_mark()
                }));
            }
            for (i, h) in hs.into_iter().enumerate() {
                assert_eq!(h.await.unwrap(), Some(i as u64));
            }
        });
        drop(rt);
    }
    assert!(hook_drop_panics() > caught_before, "the hooks' drops were expected to catch a panic");
    PANICKY_ARMED.store(false, Ordering::SeqCst);
    assert_released(tasks_before, sessions_before);
    PANICKY_ARMED.store(true, Ordering::SeqCst);
}

#[test]
fn user_hooks_compose_with_implicit_sessions() {
    let _serial = serial();
    let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
    let saw_session = Arc::new(AtomicUsize::new(0));
    let mut builder = Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    let (c1, c2, c3, c4, seen) = (counts.clone(), counts.clone(), counts.clone(), counts.clone(), saw_session.clone());
    ImplicitSessions::new()
        .on_task_spawn(move |_| {
            c1[0].fetch_add(1, Ordering::SeqCst);
        })
        .on_before_task_poll(move |_| {
            c2[1].fetch_add(1, Ordering::SeqCst);
            if current().is_some() {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        })
        .on_after_task_poll(move |_| {
            c3[2].fetch_add(1, Ordering::SeqCst);
        })
        .on_task_terminate(move |_| {
            c4[3].fetch_add(1, Ordering::SeqCst);
        })
        .install(&mut builder);
    let rt = builder.build().unwrap();
    let inherited = rt.block_on(async {
        localsession_std::scope(marked(3), || tokio::spawn(async { current_mark() })).await.unwrap()
    });
    drop(rt);
    assert_eq!(inherited, Some(3), "the implicit hooks still work next to the user's");
    for (i, c) in counts.iter().enumerate() {
        assert!(c.load(Ordering::SeqCst) >= 1, "user hook {i} never ran");
    }
    assert!(saw_session.load(Ordering::SeqCst) >= 1, "the user's before-poll hook runs after the session is installed");
}

/// Keeps the panics these tests provoke in users' hooks (hundreds, on worker threads) out of
/// the test output; every other panic is reported as before.
fn quiet_user_hook_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.payload().downcast_ref::<&str>().copied().unwrap_or("");
            if !msg.starts_with("a user's") {
                previous(info);
            }
        }));
    });
}

/// A user's terminate hook that panics: tokio catches it (`Harness::complete`), and the
/// composed hook used to skip this crate's terminate hook with it, so the task's entry and its
/// session stayed in the table for good. Now the user's hook is caught, ours runs, and the
/// panic is resumed for tokio to catch as before. At 2 and 4 workers, tasks with and without a
/// session of their own.
fn a_panicking_user_terminate_hook_leaks_nothing(workers: usize) {
    let _serial = serial();
    quiet_user_hook_panics();
    let (tasks_before, sessions_before) = (implicit_tasks(), implicit_task_sessions());
    let terminated = Arc::new(AtomicUsize::new(0));
    let seen = terminated.clone();
    let mut builder = Builder::new_multi_thread();
    builder.worker_threads(workers).enable_all();
    ImplicitSessions::new()
        .on_task_terminate(move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
            panic!("a user's terminate hook panics");
        })
        .install(&mut builder);
    let rt = builder.build().unwrap();
    let marks = rt.block_on(async {
        let mut handles = Vec::new();
        for i in 0..200u64 {
            handles.push(localsession_std::scope(marked(i), || {
                tokio::spawn(async move {
                    if i.is_multiple_of(2) {
                        bind(marked(1000 + i)).unwrap();
                    }
                    tokio::task::yield_now().await;
                    current_mark()
                })
            }));
        }
        let mut marks = Vec::new();
        for h in handles {
            marks.push(h.await.unwrap());
        }
        marks
    });
    drop(rt);
    for (i, m) in marks.into_iter().enumerate() {
        let i = i as u64;
        assert_eq!(m, Some(if i.is_multiple_of(2) { 1000 + i } else { i }), "task {i} saw another session");
    }
    assert!(terminated.load(Ordering::SeqCst) >= 200, "the user's terminate hook ran for every task");
    assert_released(tasks_before, sessions_before);
}

#[test]
fn a_panicking_user_terminate_hook_leaks_nothing_2_workers() {
    a_panicking_user_terminate_hook_leaks_nothing(2);
}

#[test]
fn a_panicking_user_terminate_hook_leaks_nothing_4_workers() {
    a_panicking_user_terminate_hook_leaks_nothing(4);
}

/// A user's before-poll or after-poll hook that panics on a current-thread runtime: the panic
/// leaves `block_on` on the caller's thread, which lives on. The composed hooks used to leave
/// the polled task's session installed on that thread (our before-poll hook had installed it,
/// our after-poll hook never ran): the caller then read another request's session, and its
/// next `bind` went to the dead task's entry. Now this crate's after-poll hook runs before the
/// panic is resumed.
fn a_panicking_user_poll_hook_leaves_the_thread_as_it_was(after: bool) {
    let _serial = serial();
    quiet_user_hook_panics();
    let armed = Arc::new(AtomicBool::new(true));
    let hook = {
        let armed = armed.clone();
        move |_: &tokio::runtime::TaskMeta<'_>| {
            // Only in the task that carries the other request's session (mark 2).
            if current_mark() == Some(2) && armed.swap(false, Ordering::SeqCst) {
                panic!("a user's poll hook panics");
            }
        }
    };
    let mut builder = Builder::new_current_thread();
    builder.enable_all();
    let hooks = ImplicitSessions::new();
    let hooks = if after { hooks.on_after_task_poll(hook) } else { hooks.on_before_task_poll(hook) };
    hooks.install(&mut builder);
    let rt = builder.build().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            bind(marked(1)).unwrap();
            let escaped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rt.block_on(async {
                    // Pending once, so that the first poll is not the task's last (a last poll
                    // ends the task's entry before the after-poll hook runs).
                    let task = async {
                        tokio::task::yield_now().await;
                        current_mark()
                    };
                    let _ = localsession_std::scope(marked(2), || tokio::spawn(task)).await;
                })
            }));
            assert!(escaped.is_err(), "the user's hook panicked out of block_on");
            assert_eq!(current_mark(), Some(1), "the caller's thread reads its own session again");
            // And its bindings are its own: a bind lands in the thread, not in a task's entry.
            bind(marked(3)).unwrap();
            assert_eq!(current_mark(), Some(3));
            localsession_std::unbind();
        })
        .join()
        .unwrap();
    });
    drop(rt);
}

#[test]
fn a_panicking_user_before_poll_hook_leaves_the_thread_as_it_was() {
    a_panicking_user_poll_hook_leaves_the_thread_as_it_was(false);
}

#[test]
fn a_panicking_user_after_poll_hook_leaves_the_thread_as_it_was() {
    a_panicking_user_poll_hook_leaves_the_thread_as_it_was(true);
}
