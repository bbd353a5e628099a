//! The adapter's semantics on async-std's multi-threaded executor, and the same code on smol and
//! async-executor (the adapter is `WithSession` over the thread-local store, nothing more).
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use localsession_async_std::{FutureExt, block_on, spawn, spawn_blocking, spawn_with};
use localsession_core::{Context, Key, SessionCtx, SessionMap};
use localsession_std::{current, scope};

static ID: Key<u64> = Key::new("id");

fn cur_id() -> Option<u64> {
    current().and_then(|s| s.get_cloned(&ID))
}

fn session(id: u64) -> SessionCtx {
    SessionCtx::new(&Context::background()).with(&ID, id)
}

#[test]
fn nested_spawns_see_the_right_session() {
    let got = block_on(async {
        let h = scope(session(1), || {
            spawn(async {
                async_std::task::yield_now().await;
                let inner = spawn(async {
                    async_std::task::sleep(Duration::from_millis(1)).await;
                    let innermost = spawn(async { cur_id() });
                    (cur_id(), innermost.await)
                });
                (cur_id(), inner.await)
            })
        });
        h.await
    });
    assert_eq!(got, (Some(1), (Some(1), Some(1))));
}

#[test]
fn with_value_in_a_child_never_changes_the_parent() {
    let parent = session(1);
    let p = parent.clone();
    let child_saw = block_on(spawn_with(parent.clone(), async move {
        let derived = p.with_value("extra", 1u8);
        let h = spawn_with(derived, async { current().unwrap().value_cloned::<u8, _>(&"extra") });
        h.await
    }));
    assert_eq!(child_saw, Some(1));
    assert_eq!(parent.value::<u8, _>(&"extra"), None);
}

#[test]
fn disable_reaches_every_descendant() {
    let root = session(7);
    let parked = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let parked = parked.clone();
            let s = if i % 2 == 0 { root.with_value("i", i) } else { root.fork() };
            spawn_with(s, async move {
                parked.fetch_add(1, Ordering::SeqCst);
                while current().is_some_and(|s| s.is_valid()) {
                    async_std::task::sleep(Duration::from_millis(1)).await;
                }
                cur_id()
            })
        })
        .collect();
    while parked.load(Ordering::SeqCst) < 8 {
        std::thread::yield_now();
    }
    root.disable();
    for h in handles {
        assert_eq!(block_on(h), Some(7));
    }
}

#[test]
fn blocking_and_local_tasks_inherit_and_leave_threads_clean() {
    let v = scope(session(3), || block_on(spawn_blocking(cur_id)));
    assert_eq!(v, Some(3));
    // A later plain blocking job on the pool sees nothing.
    for _ in 0..16 {
        assert!(block_on(async_std::task::spawn_blocking(|| current().is_none())));
    }
    let local = block_on(async { scope(session(4), || localsession_async_std::spawn_local(async { cur_id() })).await });
    assert_eq!(local, Some(4));
}

#[test]
fn isolation_under_load() {
    const N: u64 = 2_000;
    let errors = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..N)
        .map(|id| {
            let errors = errors.clone();
            spawn_with(session(id), async move {
                for step in 0..4u64 {
                    if cur_id() != Some(id) {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                    if (id + step) % 3 == 0 {
                        async_std::task::sleep(Duration::from_micros(100)).await;
                    } else {
                        async_std::task::yield_now().await;
                    }
                }
                let child = spawn(async move { cur_id() == Some(id) });
                if !child.await {
                    errors.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    block_on(async {
        for h in handles {
            h.await;
        }
    });
    assert_eq!(errors.load(Ordering::SeqCst), 0);
    // No worker keeps a session: plain tasks on every worker see none.
    let leaked: usize = block_on(async {
        futures_join((0..200).map(|_| async_std::task::spawn(async { usize::from(current().is_some()) }))).await
    });
    assert_eq!(leaked, 0);
}

async fn futures_join<I: Iterator<Item = async_std::task::JoinHandle<usize>>>(handles: I) -> usize {
    let mut sum = 0;
    for h in handles {
        sum += h.await;
    }
    sum
}

#[test]
fn same_code_on_smol() {
    let map = SessionMap::new().with(&ID, 11);
    let v = smol::block_on(async {
        let h = smol::spawn(
            async {
                smol::future::yield_now().await;
                cur_id()
            }
            .with_session(map.clone()),
        );
        h.await
    });
    assert_eq!(v, Some(11));
    // Inheritance through the same combinator.
    let v = scope(session(12), || smol::block_on(smol::spawn(async { cur_id() }.in_current_session())));
    assert_eq!(v, Some(12));
}

#[test]
fn same_code_on_async_executor_threads() {
    let ex = Arc::new(async_executor::Executor::new());
    let (stop_tx, stop_rx) = async_channel_like();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (ex, stop) = (ex.clone(), stop_rx.clone());
            std::thread::spawn(move || {
                futures_lite::future::block_on(ex.run(async move {
                    while !stop.load(Ordering::SeqCst) {
                        futures_lite::future::yield_now().await
                    }
                }))
            })
        })
        .collect();
    let tasks: Vec<_> = (0..100u64)
        .map(|id| {
            ex.spawn(
                async move {
                    futures_lite::future::yield_now().await;
                    cur_id() == Some(id)
                }
                .with_session(session(id)),
            )
        })
        .collect();
    let ok = futures_lite::future::block_on(async {
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await);
        }
        ok
    });
    stop_tx.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(ok, 100);
}

fn async_channel_like() -> (Arc<std::sync::atomic::AtomicBool>, Arc<std::sync::atomic::AtomicBool>) {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    (flag.clone(), flag)
}
