//! Explicit inheritance on tokio: the spawn helpers, `JoinSetExt` and `FutureExt`, on
//! multi-thread runtimes where tasks hop between workers. Runs with and without
//! `--cfg tokio_unstable` (these runtimes have no implicit hooks).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{
    DropCounted, OnDrop, REQ, assert_no_worker_holds_a_session, current_req, eventually, hop, req_session, within,
};
use localsession_core::{ContextError, SessionMap};
use localsession_std::{bind, current, scope, unbind};
use localsession_tokio::{FutureExt, JoinSetExt};
use tokio::sync::{Barrier, oneshot, watch};
use tokio::task::{JoinSet, LocalSet, yield_now};
use tokio::time::sleep;

const WORKERS: usize = 4;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A task tree `depth` levels deep, two children per level, spawned with `localsession_tokio::spawn`;
/// every task checks `expect` before and after hops. Returns the number of tasks in the tree.
fn descend(depth: u32, expect: u64) -> BoxFuture<usize> {
    Box::pin(async move {
        assert_eq!(current_req(), Some(expect), "depth {depth}: on first poll");
        hop().await;
        assert_eq!(current_req(), Some(expect), "depth {depth}: after a hop");
        if depth == 0 {
            return 1;
        }
        let children: Vec<_> = (0..2).map(|_| localsession_tokio::spawn(descend(depth - 1, expect))).collect();
        hop().await;
        assert_eq!(current_req(), Some(expect), "depth {depth}: after spawning");
        let mut tasks = 1;
        for child in children {
            tasks += child.await.expect("child task");
        }
        assert_eq!(current_req(), Some(expect), "depth {depth}: after joining");
        tasks
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nested_spawns_see_the_spawners_session() {
    let root = scope(req_session(1), || localsession_tokio::spawn(descend(4, 1)));
    assert_eq!(root.await.unwrap(), 31);
    // The test's own (block_on) thread never had anything bound.
    assert_eq!(current_req(), None);
    assert_no_worker_holds_a_session(WORKERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spawn_with_overrides_and_without_session_sees_none() {
    let root = scope(req_session(1), || {
        localsession_tokio::spawn(async {
            hop().await;
            // `spawn_with` overrides the inherited session for a whole subtree.
            let other = localsession_tokio::spawn_with(req_session(2), descend(2, 2));
            // A plain tokio::spawn wrapped in `without_session` runs with nothing bound.
            let bare = tokio::spawn(
                async {
                    let first = current_req();
                    hop().await;
                    (first, current_req(), current().is_none())
                }
                .without_session(),
            );
            // Awaited in place, `without_session` hides the session only inside.
            let inline = async {
                hop().await;
                current().is_none()
            }
            .without_session()
            .await;
            assert!(inline, "without_session awaited inline still saw a session");
            assert_eq!(current_req(), Some(1), "the parent lost its session after an inline without_session");
            // And `with_session` awaited in place, likewise.
            let inline = async {
                hop().await;
                current_req()
            }
            .with_session(req_session(3))
            .await;
            assert_eq!(inline, Some(3));
            assert_eq!(current_req(), Some(1), "the parent lost its session after an inline with_session");

            assert_eq!(other.await.unwrap(), 7);
            assert_eq!(bare.await.unwrap(), (None, None, true));
            hop().await;
            current_req()
        })
    });
    assert_eq!(root.await.unwrap(), Some(1));
    assert_no_worker_holds_a_session(WORKERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_value_in_a_child_never_changes_the_parent() {
    let root = req_session(7).with_value("a", "b");
    let parent = scope(root, || {
        localsession_tokio::spawn(async {
            let child = localsession_tokio::spawn(async {
                // The seed's pattern: derive from the current session and bind the result.
                let derived = current().unwrap().with_value("c", "d").with_value("a", "changed");
                bind(derived).unwrap();
                hop().await;
                let s = current().unwrap();
                assert_eq!(s.value_cloned::<&str, _>(&"a"), Some("changed"));
                assert_eq!(s.value_cloned::<&str, _>(&"c"), Some("d"));
                assert_eq!(current_req(), Some(7));
                // A grandchild spawned now inherits the derived session.
                let grandchild = localsession_tokio::spawn(async {
                    hop().await;
                    current().unwrap().value_cloned::<&str, _>(&"c")
                });
                assert_eq!(grandchild.await.unwrap(), Some("d"));
            });
            child.await.unwrap();
            hop().await;
            // Read after the child finished: unchanged.
            let s = current().unwrap();
            assert_eq!(s.value_cloned::<&str, _>(&"a"), Some("b"));
            assert_eq!(s.value_cloned::<&str, _>(&"c"), None);
            assert!(s.is_valid());
        })
    });
    parent.await.unwrap();
    assert_no_worker_holds_a_session(WORKERS).await;
}

/// Go parity, documented by test: a `SessionMap` is one shared map, so a child's `with_value`
/// *is* seen by the parent (unlike `SessionCtx`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_map_updates_in_a_child_are_shared_with_the_parent() {
    let map = SessionMap::new().with(&REQ, 8);
    let parent = scope(map, || {
        localsession_tokio::spawn(async {
            let child = localsession_tokio::spawn(async {
                hop().await;
                let _same_map = current().unwrap().with_value("c", "d");
            });
            child.await.unwrap();
            hop().await;
            (current_req(), current().unwrap().value_cloned::<&str, _>(&"c"))
        })
    });
    assert_eq!(parent.await.unwrap(), (Some(8), Some("d")));
}

/// A descendant: checks it is valid, reaches the barrier, waits for the root to disable, then
/// checks it sees its (still bound) session as invalid. Spawns `grandchildren` of its own, one
/// inheriting, one on a fork of its session.
fn descendant(barrier: Arc<Barrier>, disabled: watch::Receiver<bool>, grandchildren: bool) -> BoxFuture<usize> {
    Box::pin(async move {
        let mut kids = Vec::new();
        if grandchildren {
            kids.push(localsession_tokio::spawn(descendant(barrier.clone(), disabled.clone(), false)));
            let fork = current().unwrap().as_ctx().expect("a SessionCtx").fork();
            kids.push(localsession_tokio::spawn_with(fork, descendant(barrier.clone(), disabled.clone(), false)));
        }
        hop().await;
        assert!(current().expect("inherited").is_valid(), "invalid before the root disabled");
        within("all descendants parked", barrier.wait()).await;
        let mut disabled = disabled;
        let _ = within("the root's disable", disabled.wait_for(|d| *d)).await.expect("root alive");
        hop().await;
        let s = current().expect("a disabled session stays bound (Go parity)");
        assert!(!s.is_valid(), "a descendant still sees its session as valid after the root's disable");
        assert_eq!(s.as_ctx().unwrap().err(), Some(ContextError::Canceled));
        let mut seen = 1;
        for kid in kids {
            seen += kid.await.expect("grandchild");
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disabling_the_root_reaches_every_descendant() {
    const CHILDREN: usize = 4;
    const DESCENDANTS: usize = CHILDREN * 3;
    // Descendants, the root, and an unrelated request that must stay valid.
    let barrier = Arc::new(Barrier::new(DESCENDANTS + 2));
    let (tx, rx) = watch::channel(false);

    let unrelated = {
        let (barrier, mut rx) = (barrier.clone(), rx.clone());
        localsession_tokio::spawn_with(req_session(99), async move {
            within("all descendants parked", barrier.wait()).await;
            let _ = within("the root's disable", rx.wait_for(|d| *d)).await.expect("root alive");
            hop().await;
            current().unwrap().is_valid()
        })
    };
    let root = scope(req_session(3), || {
        localsession_tokio::spawn(async move {
            let mut children = Vec::new();
            for i in 0..CHILDREN {
                let (barrier, rx) = (barrier.clone(), rx.clone());
                if i % 2 == 0 {
                    children.push(localsession_tokio::spawn(descendant(barrier, rx, true)));
                } else {
                    // A child on a `with_value`-derived session: same validity scope.
                    let derived = current().unwrap().with_value("child", i);
                    children.push(localsession_tokio::spawn_with(derived, descendant(barrier, rx, true)));
                }
            }
            // Every descendant is parked now.
            within("all descendants parked", barrier.wait()).await;
            assert!(current().unwrap().disable());
            tx.send(true).unwrap();
            let mut seen = 0;
            for child in children {
                seen += child.await.expect("child task");
            }
            assert!(!current().unwrap().is_valid());
            seen
        })
    });
    assert_eq!(root.await.unwrap(), DESCENDANTS, "descendants that observed the disable");
    assert!(unrelated.await.unwrap(), "disabling one request invalidated an unrelated one");
    assert_no_worker_holds_a_session(WORKERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_set_spawn_current_and_spawn_with() {
    let mut set = JoinSet::new();
    scope(req_session(10), || {
        for _ in 0..8 {
            set.spawn_current(async {
                hop().await;
                current_req()
            });
        }
    });
    for i in 0..8 {
        set.spawn_with(req_session(100 + i), async {
            hop().await;
            current_req()
        });
    }
    // Nothing bound here: spawn_current carries "none".
    set.spawn_current(async {
        hop().await;
        current_req()
    });
    let mut got: Vec<Option<u64>> = set.join_all().await;
    got.sort_unstable();
    let mut want = vec![None];
    want.extend(std::iter::repeat_n(Some(10), 8));
    want.extend((100..108).map(Some));
    assert_eq!(got, want);
    assert_no_worker_holds_a_session(WORKERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn select_drops_the_losing_branch_without_leaving_a_session() {
    // The session-carrying future loses to a timer, inside a plain task on a worker.
    let in_drop = Arc::new(Mutex::new(None));
    let observed = Arc::clone(&in_drop);
    let task = tokio::spawn(async move {
        let loser = async move {
            let _probe = OnDrop(move || *observed.lock().unwrap() = Some(current_req()));
            hop().await;
            std::future::pending::<()>().await;
        }
        .with_session(req_session(20));
        tokio::select! {
            () = loser => unreachable!("pending"),
            () = sleep(Duration::from_millis(20)) => {}
        }
        let after = current_req();
        hop().await;
        (after, current_req())
    });
    assert_eq!(task.await.unwrap(), (None, None), "the task kept the dropped branch's session");
    assert_eq!(*in_drop.lock().unwrap(), Some(Some(20)), "the dropped future ran its drop without its session");

    // The session-carrying future wins; the timer is dropped. On the block_on thread this time.
    let won = tokio::select! {
        v = async { hop().await; current_req() }.with_session(req_session(21)) => v,
        () = sleep(Duration::from_secs(30)) => unreachable!("the session future is quick"),
    };
    assert_eq!(won, Some(21));
    assert_eq!(current_req(), None);
    assert_no_worker_holds_a_session(WORKERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abort_releases_the_session() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    static IN_TASK_DROPS: AtomicUsize = AtomicUsize::new(0);

    let session = req_session(70).with_value("guard", DropCounted(&DROPS));
    let (started_tx, started_rx) = oneshot::channel();
    let seen_in_drop = Arc::new(Mutex::new(None));
    let observed = Arc::clone(&seen_in_drop);
    let handle = localsession_tokio::spawn_with(session, async move {
        let _probe = OnDrop(move || {
            *observed.lock().unwrap() = Some(current_req());
            IN_TASK_DROPS.fetch_add(1, Ordering::SeqCst);
        });
        hop().await;
        started_tx.send(current_req()).unwrap();
        std::future::pending::<()>().await;
    });
    assert_eq!(started_rx.await.unwrap(), Some(70));
    assert_eq!(DROPS.load(Ordering::SeqCst), 0, "released while the task is parked");
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
    eventually("the aborted task's future is dropped", || IN_TASK_DROPS.load(Ordering::SeqCst) == 1).await;
    assert_eq!(*seen_in_drop.lock().unwrap(), Some(Some(70)), "the future was dropped without its session");
    eventually("the aborted task's session is released", || DROPS.load(Ordering::SeqCst) == 1).await;
    assert_no_worker_holds_a_session(WORKERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_a_join_set_releases_its_sessions() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let mut set = JoinSet::new();
    for i in 0..8 {
        let session = req_session(80 + i).with_value("guard", DropCounted(&DROPS));
        set.spawn_with(session, async {
            hop().await;
            STARTED.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        });
    }
    eventually("all JoinSet tasks parked", || STARTED.load(Ordering::SeqCst) == 8).await;
    assert_eq!(DROPS.load(Ordering::SeqCst), 0);
    drop(set);
    eventually("the dropped JoinSet's sessions are released", || DROPS.load(Ordering::SeqCst) == 8).await;
    assert_no_worker_holds_a_session(WORKERS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_worker_holds_a_session_after_a_burst() {
    let mut handles = Vec::new();
    for i in 0..500u64 {
        let check = async move {
            for _ in 0..(i % 4) {
                yield_now().await;
            }
            if i % 5 == 0 {
                sleep(Duration::from_millis(1)).await;
            }
            current_req()
        };
        handles.push(match i % 3 {
            0 => scope(req_session(i), || localsession_tokio::spawn(check)),
            1 => localsession_tokio::spawn_with(req_session(i), check),
            _ => tokio::spawn(check.with_session(req_session(i))),
        });
    }
    for (i, handle) in handles.into_iter().enumerate() {
        assert_eq!(handle.await.unwrap(), Some(i as u64));
    }
    assert_no_worker_holds_a_session(WORKERS).await;
}

/// `max_blocking_threads(1)`: every blocking job runs on the same pool thread, so a later plain
/// job reads exactly the slot the session-carrying one used.
fn one_blocking_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn spawn_blocking_inherits_and_leaves_the_blocking_thread_clean() {
    let rt = one_blocking_thread_runtime();
    rt.block_on(async {
        let task = scope(req_session(30), || {
            localsession_tokio::spawn(async {
                hop().await;
                localsession_tokio::spawn_blocking(|| (current_req(), std::thread::current().id())).await.unwrap()
            })
        });
        let (seen, blocking_thread) = task.await.unwrap();
        assert_eq!(seen, Some(30));

        // A panicking job unbinds too.
        let panicked =
            scope(req_session(31), || localsession_tokio::spawn_blocking(|| panic!("expected test panic"))).await;
        assert!(panicked.unwrap_err().is_panic());

        let (later, thread) =
            tokio::task::spawn_blocking(|| (current_req(), std::thread::current().id())).await.unwrap();
        assert_eq!(thread, blocking_thread, "one blocking thread: the same one");
        assert_eq!(later, None, "the blocking thread kept a session after its job");

        // Sessionless spawner: the job sees none.
        assert_eq!(localsession_tokio::spawn_blocking(current_req).await.unwrap(), None);
    });
}

/// Regression: a sessionless `localsession_tokio::spawn_blocking` used to run its closure with
/// whatever an earlier *plain* blocking job left bound on the pool thread (it only unbound
/// after the closure); like the futures helpers, it now installs "none".
#[test]
fn sessionless_spawn_blocking_does_not_see_a_binding_left_by_a_plain_job() {
    let rt = one_blocking_thread_runtime();
    rt.block_on(async {
        // User code on a plain blocking job binds and forgets to unbind.
        tokio::task::spawn_blocking(|| bind(req_session(40))).await.unwrap().unwrap();
        let seen = localsession_tokio::spawn_blocking(current_req).await.unwrap();
        assert_eq!(seen, None, "the sessionless spawner's job saw another job's session");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spawn_local_inherits_inside_a_local_set() {
    let local = LocalSet::new();
    local
        .run_until(async {
            let task = scope(req_session(50), || {
                localsession_tokio::spawn_local(async {
                    let not_send = std::rc::Rc::new(());
                    hop().await;
                    let nested = localsession_tokio::spawn_local(async {
                        hop().await;
                        current_req()
                    });
                    hop().await;
                    drop(not_send);
                    (current_req(), nested.await.unwrap())
                })
            });
            // A sessionless neighbour on the same thread sees none.
            let neighbour = localsession_tokio::spawn_local(async {
                hop().await;
                current_req()
            });
            assert_eq!(task.await.unwrap(), (Some(50), Some(50)));
            assert_eq!(neighbour.await.unwrap(), None);
            assert_eq!(current_req(), None);
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bind_inside_a_task_sticks_to_it_and_does_not_leak() {
    // Neighbours on the same workers, with their own sessions or none, checking all along.
    let neighbours: Vec<_> = (0..64u64)
        .map(|i| {
            let expect = (i % 2 == 0).then_some(200 + i);
            let check = async move {
                for _ in 0..10 {
                    hop().await;
                    assert_eq!(current_req(), expect, "a neighbour saw a session bound by another task");
                }
            };
            match expect {
                Some(id) => localsession_tokio::spawn_with(req_session(id), check),
                // Plain, unwrapped: reads whatever its worker's slot holds.
                None => tokio::spawn(check),
            }
        })
        .collect();

    // A plain tokio::spawn of a future wrapped by `in_current_session` while 60 is current.
    let binder = scope(req_session(60), || {
        tokio::spawn(
            async {
                assert_eq!(current_req(), Some(60));
                bind(req_session(61)).unwrap();
                for _ in 0..10 {
                    hop().await;
                    assert_eq!(current_req(), Some(61), "a bind inside the task did not stick across an await");
                }
                let child = localsession_tokio::spawn(async {
                    hop().await;
                    current_req()
                });
                assert_eq!(child.await.unwrap(), Some(61), "a child spawned after the bind");
                drop(unbind());
                hop().await;
                assert_eq!(current_req(), None, "an unbind inside the task did not stick");
                // The task ends with a binding of its own: it must go with the task.
                bind(req_session(62)).unwrap();
                hop().await;
                current_req()
            }
            .in_current_session(),
        )
    });
    assert_eq!(binder.await.unwrap(), Some(62));
    for n in neighbours {
        n.await.unwrap();
    }
    assert_eq!(current_req(), None);
    assert_no_worker_holds_a_session(WORKERS).await;
}

#[test]
fn with_session_runs_on_any_executor_and_block_on_sees_the_callers_session() {
    // `with_session` builds a plain future: usable on any executor, not only tokio.
    let v = futures::executor::block_on(
        async {
            yield_now().await;
            current_req()
        }
        .with_session(req_session(90)),
    );
    assert_eq!(v, Some(90));
    assert_eq!(current_req(), None);
    // A runtime's block_on future is not a task: it sees the calling thread's binding.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let outer = scope(req_session(91), || rt.block_on(async { current_req() }));
    assert_eq!(outer, Some(91));
}
