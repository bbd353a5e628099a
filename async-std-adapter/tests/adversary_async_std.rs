//! Adversarial tests of the async-std / smol adapter: spawn forms, `Builder` with and without a
//! session, tasks that outlive their spawner, nested `block_on` (also inside `spawn_blocking`),
//! panicking tasks on shared worker threads, 4 executor threads, and a reset of the default
//! manager while tasks are idle (in a child process: a reset is process-wide).
#![allow(missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use localsession_async_std::{Builder, FutureExt, block_on, spawn, spawn_blocking, spawn_local, spawn_with};
use localsession_core::{Context, Key, SessionCtx, SessionMap};
use localsession_std::{bind, current, scope, unbind, without_flow};

static ID: Key<u64> = Key::new("adv-id");

fn cur_id() -> Option<u64> {
    current().and_then(|s| s.get_cloned(&ID))
}

fn session(id: u64) -> SessionCtx {
    SessionCtx::new(&Context::background()).with(&ID, id)
}

/// Runs `body` in a child process (this test binary, `--exact name`): for process-wide state
/// (a reset of the default manager) that must not disturb the other tests of this binary.
fn in_child_process(name: &str, body: impl FnOnce()) {
    if std::env::var("ADVERSARY_ASYNC_STD_CHILD").as_deref() == Ok(name) {
        body();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("ADVERSARY_ASYNC_STD_CHILD", name)
        .output()
        .expect("spawn child test process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child process for `{name}` failed: {:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
}

/// Four smol (async-executor) worker threads running `ex` until `stop` is set.
struct Workers {
    ex: Arc<async_executor::Executor<'static>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(n: usize) -> Workers {
        let ex = Arc::new(async_executor::Executor::new());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let (ex, stop) = (ex.clone(), stop.clone());
                std::thread::spawn(move || {
                    // A panicking task is caught by async-executor and re-raised in its
                    // `Task`'s awaiter; the worker keeps running.
                    futures_lite::future::block_on(ex.run(async move {
                        while !stop.load(Ordering::SeqCst) {
                            async_io::Timer::after(Duration::from_millis(1)).await;
                        }
                    }));
                })
            })
            .collect();
        Workers { ex, stop, threads }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("a worker thread panicked");
        }
    }
}

/// Plain (unwrapped) tasks on every worker see no session: nothing was left on a worker thread.
fn plain_tasks_see_nothing(ex: &async_executor::Executor<'static>) -> usize {
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            ex.spawn(async {
                futures_lite::future::yield_now().await;
                usize::from(current().is_some())
            })
        })
        .collect();
    futures_lite::future::block_on(async {
        let mut leaked = 0;
        for t in tasks {
            leaked += t.await;
        }
        leaked
    })
}

#[test]
fn four_smol_workers_keep_every_task_on_its_own_session_with_binds_and_nested_spawns() {
    let workers = Workers::start(4);
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let tasks: Vec<_> = (0..400u64)
        .map(|id| {
            let (errs, ex) = (errors.clone(), workers.ex.clone());
            let fut = async move {
                for step in 0..4 {
                    if cur_id() != Some(id) {
                        errs.lock().unwrap().push(format!("task {id} step {step}: {:?}", cur_id()));
                    }
                    futures_lite::future::yield_now().await;
                }
                // A bind inside the task sticks to it, across awaits and workers.
                bind(session(id + 10_000)).unwrap();
                futures_lite::future::yield_now().await;
                if cur_id() != Some(id + 10_000) {
                    errs.lock().unwrap().push(format!("task {id} lost its bind: {:?}", cur_id()));
                }
                // A child spawned now inherits the bound session, and outlives nothing.
                let child = ex.spawn(
                    async {
                        futures_lite::future::yield_now().await;
                        cur_id()
                    }
                    .in_current_session(),
                );
                let child_saw = child.await;
                if child_saw != Some(id + 10_000) {
                    errs.lock().unwrap().push(format!("child of {id}: {child_saw:?}"));
                }
                // Unbinding sticks too.
                unbind();
                futures_lite::future::yield_now().await;
                if current().is_some() {
                    errs.lock().unwrap().push(format!("task {id} saw a session after unbind"));
                }
            };
            workers.ex.spawn(fut.with_session(session(id)))
        })
        .collect();
    futures_lite::future::block_on(async {
        for t in tasks {
            t.await;
        }
    });
    let leaked = plain_tasks_see_nothing(&workers.ex);
    workers.stop();
    assert!(errors.lock().unwrap().is_empty(), "{:#?}", errors.lock().unwrap());
    assert_eq!(leaked, 0, "a worker thread kept a task's session after its poll");
}

#[test]
fn a_task_panicking_in_poll_on_a_shared_worker_leaves_nothing_behind() {
    let workers = Workers::start(2);
    let panicking: Vec<_> = (0..32u64)
        .map(|id| {
            workers.ex.spawn(
                async move {
                    futures_lite::future::yield_now().await;
                    bind(SessionMap::new().with(&ID, id + 1)).unwrap();
                    if id % 2 == 0 {
                        panic!("task {id} panics with a session bound");
                    }
                    cur_id()
                }
                .with_session(session(id)),
            )
        })
        .collect();
    let results: Vec<_> = panicking
        .into_iter()
        .map(|t| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| futures_lite::future::block_on(t))).ok())
        .collect();
    let leaked = plain_tasks_see_nothing(&workers.ex);
    workers.stop();
    for (id, r) in results.into_iter().enumerate() {
        if id % 2 == 0 {
            assert!(r.is_none(), "task {id} should have panicked");
        } else {
            assert_eq!(r, Some(Some(id as u64 + 1)));
        }
    }
    assert_eq!(leaked, 0, "a panicking task left its session on a worker thread");
}

#[test]
fn builder_variants_give_the_documented_session() {
    let outer = session(1);
    let (inherit, given, none, named) = scope(outer, || {
        let inherit = Builder::new().spawn(async { cur_id() }).unwrap();
        let given = Builder::new().session(session(2)).spawn(async { cur_id() }).unwrap();
        let none = Builder::new().no_session().spawn(async { current().is_none() }).unwrap();
        let named = Builder::new()
            .name("adv".into())
            .no_session()
            .session(session(3))
            .spawn(async {
                async_std::task::yield_now().await;
                (cur_id(), async_std::task::current().name().map(str::to_owned))
            })
            .unwrap();
        (inherit, given, none, named)
    });
    assert_eq!(async_std::task::block_on(inherit), Some(1));
    assert_eq!(async_std::task::block_on(given), Some(2));
    assert!(async_std::task::block_on(none));
    assert_eq!(async_std::task::block_on(named), (Some(3), Some("adv".to_owned())));

    // `blocking` and `local` on this thread: the session for the future, nothing after.
    let v = scope(session(4), || Builder::new().session(session(5)).blocking(async { cur_id() }));
    assert_eq!(v, Some(5));
    assert!(current().is_none());
    let v = scope(session(6), || Builder::new().blocking(async { cur_id() }));
    assert_eq!(v, Some(6));
    let v = async_std::task::block_on(async {
        let h = scope(session(7), || Builder::new().local(async { cur_id() }).unwrap());
        let n = Builder::new().no_session().local(async { cur_id() }).unwrap();
        (h.await, n.await)
    });
    assert_eq!(v, (Some(7), None));
    assert!(current().is_none());
}

#[test]
fn tasks_that_outlive_their_spawner_keep_its_session_and_see_it_disabled() {
    let root = SessionCtx::new(&Context::background()).with(&ID, 42);
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let parent = spawn_with(root.clone(), async move {
        let mut children = Vec::new();
        for _ in 0..4 {
            let (rx, started) = (release_rx.clone(), started_tx.clone());
            children.push(spawn(async move {
                let before = cur_id();
                let _ = started.send(());
                // Park (off the executor) until the spawner is gone and the root disabled.
                let rx2 = rx.clone();
                async_std::task::spawn_blocking(move || rx2.lock().unwrap().recv().ok()).await;
                (before, cur_id(), current().is_some_and(|s| s.is_valid()))
            }));
        }
        children
    });
    let children = async_std::task::block_on(parent); // the spawner has returned
    for _ in 0..4 {
        started_rx.recv_timeout(Duration::from_secs(10)).expect("child started");
    }
    root.disable();
    for _ in 0..4 {
        release_tx.send(()).unwrap();
    }
    for c in children {
        let (before, after, valid) = async_std::task::block_on(c);
        assert_eq!(before, Some(42));
        assert_eq!(after, Some(42), "a child lost its session when its spawner ended");
        assert!(!valid, "a child did not see the disable of its spawner's session");
    }
}

#[test]
fn block_on_nested_in_spawn_blocking_inside_a_task_restores_each_level() {
    let got = block_on(spawn_with(session(1), async {
        let inner = spawn_blocking(|| {
            let a = cur_id();
            // Nested block_on on the blocking thread; it binds, which sticks to its future only.
            let b = block_on(async {
                let seen = cur_id();
                bind(session(3)).unwrap();
                async_std::task::yield_now().await;
                (seen, cur_id())
            });
            // And a nested spawn from inside the blocking closure inherits the closure's session.
            let c = block_on(spawn(async { cur_id() }));
            // A plain async-std block_on (no wrapper) runs on this thread: it sees the thread's.
            let d = async_std::task::block_on(async { cur_id() });
            (a, b, c, d, cur_id())
        })
        .await;
        (inner, cur_id())
    }));
    let ((a, (b_seen, b_after_bind), c, d, e), task_after) = got;
    assert_eq!(a, Some(1));
    assert_eq!(b_seen, Some(1));
    assert_eq!(b_after_bind, Some(3));
    assert_eq!(c, Some(1));
    assert_eq!(d, Some(1));
    assert_eq!(e, Some(1), "the nested block_on's bind leaked into the blocking closure");
    assert_eq!(task_after, Some(1));
    assert!(current().is_none());
    // The blocking pool's threads are clean afterwards.
    for _ in 0..16 {
        assert!(async_std::task::block_on(async_std::task::spawn_blocking(|| current().is_none())));
    }
}

#[test]
fn spawn_local_tasks_interleaved_with_binds_on_the_block_on_thread() {
    let out = block_on(async {
        let mut handles = Vec::new();
        for id in 0..20u64 {
            let h = scope(session(id), || {
                spawn_local(async move {
                    for _ in 0..3 {
                        async_std::task::yield_now().await;
                    }
                    bind(session(id + 100)).unwrap();
                    async_std::task::yield_now().await;
                    cur_id()
                })
            });
            handles.push(h);
        }
        // The block_on future itself binds between the local tasks' polls.
        bind(session(999)).unwrap();
        let mut seen = Vec::new();
        for h in handles {
            seen.push(h.await);
            if cur_id() != Some(999) {
                seen.push(Some(u64::MAX)); // the block_on future lost its own bind
            }
        }
        seen
    });
    let want: Vec<_> = (0..20u64).map(|id| Some(id + 100)).collect();
    assert_eq!(out, want);
    assert!(current().is_none(), "block_on's future's bind leaked to the calling thread");
}

/// A future dropped before completion runs its drop with its session; dropping one handle of
/// an async-std task cancels nothing (it detaches), so use a `select`-like race instead.
#[test]
fn a_cancelled_future_drops_its_state_with_its_own_session() {
    struct ReportOnDrop(Arc<Mutex<Option<Option<u64>>>>);
    impl Drop for ReportOnDrop {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(cur_id());
        }
    }
    struct Never;
    impl Future for Never {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<()> {
            Poll::Pending
        }
    }
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let result = block_on(spawn_with(session(8), async move {
        let guard = ReportOnDrop(s);
        let loser = async move {
            let _g = guard;
            Never.await;
            0u64
        }
        .with_session(session(9));
        futures_lite::future::or(loser, async {
            async_std::task::yield_now().await;
            1u64
        })
        .await
    }));
    assert_eq!(result, 1);
    assert_eq!(*seen.lock().unwrap(), Some(Some(9)), "the loser's drop did not run with its own session");
}

/// Documents how flow suppression interacts with `block_on`: the future runs on the calling
/// thread, which still sees its session (reading is unaffected by `without_flow`).
#[test]
fn block_on_under_without_flow_runs_the_future_with_the_callers_session() {
    let (outside, inside) = scope(session(5), || without_flow(|| (cur_id(), block_on(async { cur_id() }))));
    assert_eq!(outside, Some(5), "documented: reading is unaffected by suppression");
    assert_eq!(
        inside,
        Some(5),
        "block_on is documented as 'carrying the caller's current session into the future', and the \
         future runs inline on the caller's thread"
    );
}

/// Reports each `Poll::Pending` of the wrapped future *after* the poll returned, i.e. after the
/// `WithSession` inside swapped its session back out of the worker's slot: the task is idle.
struct ReportIdle<F> {
    inner: Pin<Box<F>>,
    idle: mpsc::Sender<()>,
}

impl<F: Future> Future for ReportIdle<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let poll = self.inner.as_mut().poll(cx);
        if poll.is_pending() {
            let _ = self.idle.send(());
        }
        poll
    }
}

/// `reset_default_manager` unbinds "every session bound before the call", and the tokio
/// adapter's implicit mode guarantees (README, Isolation table) that an idle task does not get
/// its pre-reset session back at its next poll. A task of this adapter (a `WithSession` over the
/// thread store, as `spawn_with` makes) that is idle during the reset is checked for the same.
/// A reset that lands *during* a poll does clear the task's session (`std_reset_guard.rs`), so
/// the outcome must not depend on whether the task happened to be running.
#[test]
fn a_reset_while_a_task_is_idle_is_not_undone_by_its_next_poll() {
    in_child_process("a_reset_while_a_task_is_idle_is_not_undone_by_its_next_poll", || {
        // SAFETY: the child process runs this one test on one thread, before any other thread
        // of this process exists; nothing reads the environment concurrently.
        unsafe { std::env::remove_var(localsession_core::config::ENV_KEY) };
        localsession_std::init_default_manager(localsession_std::default_manager_options()).unwrap();

        // 1. Deterministic, on this thread: the adapter's future type, polled by hand.
        let mut fut = std::pin::pin!(localsession_core::WithSession::new_in_store(
            &localsession_std::THREAD_STORE,
            async {
                let before = cur_id();
                async_std::task::yield_now().await; // Pending once
                (before, cur_id())
            },
            Some(session(76).into()),
        ));
        let mut cx = TaskContext::from_waker(std::task::Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        localsession_std::reset_default_manager(localsession_std::default_manager_options()).unwrap();
        let Poll::Ready((before, after)) = fut.as_mut().poll(&mut cx) else { panic!("not ready") };
        assert_eq!(before, Some(76));
        let by_hand = after;

        // 2. The same on async-std's executor: a task spawned with a session, idle at the reset.
        let (idle_tx, idle_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Arc::new(Mutex::new(go_rx));
        let body = async move {
            let before = cur_id();
            let rx = go_rx.clone();
            async_std::task::spawn_blocking(move || rx.lock().unwrap().recv().ok()).await;
            (before, cur_id())
        };
        let task =
            async_std::task::spawn(ReportIdle { inner: Box::pin(body.with_session(session(77))), idle: idle_tx });
        idle_rx.recv_timeout(Duration::from_secs(10)).unwrap(); // the first poll has returned
        localsession_std::reset_default_manager(localsession_std::default_manager_options()).unwrap();
        go_tx.send(()).unwrap();
        let (before, on_executor) = async_std::task::block_on(task);
        assert_eq!(before, Some(77));

        assert_eq!(
            (by_hand, on_executor),
            (None, None),
            "an idle WithSession got its pre-reset session back at its next poll after reset_default_manager"
        );
    });
}

#[test]
fn many_short_tasks_from_many_spawners_count_each_session_drop_once() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::SeqCst);
        }
    }
    let n = 200;
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let s = SessionCtx::new(&Context::background()).with(&ID, i).with_value("drop", Counted);
            spawn_with(s, async move {
                let child = spawn(async move {
                    async_std::task::yield_now().await;
                    cur_id()
                });
                async_std::task::yield_now().await;
                (cur_id(), child.await)
            })
        })
        .collect();
    let got: Vec<_> = async_std::task::block_on(async {
        let mut v = Vec::new();
        for h in handles {
            v.push(h.await);
        }
        v
    });
    for (i, (a, b)) in got.into_iter().enumerate() {
        assert_eq!((a, b), (Some(i as u64), Some(i as u64)));
    }
    // Every session (one per spawner; children hold clones) is dropped exactly once when its
    // last task finished; allow the executor a moment to drop finished tasks.
    let cap = std::time::Instant::now() + Duration::from_secs(5);
    while DROPS.load(Ordering::SeqCst) < n as usize && std::time::Instant::now() < cap {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(DROPS.load(Ordering::SeqCst), n as usize);
}
