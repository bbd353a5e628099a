//! Sessions follow the tasks of a hand-written executor built on `localsession-core` alone.
#![allow(missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use localsession_core::{Context, Key, SessionCtx, SessionMap, bind, current, unbind};
use localsession_tests::mini_executor::{MiniExecutor, yield_now};

static ID: Key<u64> = Key::new("id");

fn cur_id() -> Option<u64> {
    current().and_then(|s| s.get_cloned(&ID))
}

#[test]
fn sessions_follow_tasks_across_workers_and_children() {
    let executor = MiniExecutor::new();
    let errors = Arc::new(Mutex::new(Vec::new()));
    for id in 0..200u64 {
        let session = SessionCtx::new(&Context::background()).with(&ID, id);
        let (ex, errs) = (executor.clone(), errors.clone());
        executor.spawn_with(Some(session.into()), async move {
            for step in 0..5 {
                if cur_id() != Some(id) {
                    errs.lock().unwrap().push(format!("task {id} step {step} saw {:?}", cur_id()));
                }
                yield_now().await;
            }
            let errs2 = errs.clone();
            ex.spawn(async move {
                yield_now().await;
                if cur_id() != Some(id) {
                    errs2.lock().unwrap().push(format!("child of {id} saw {:?}", cur_id()));
                }
            });
        });
    }
    executor.run(3);
    assert!(errors.lock().unwrap().is_empty(), "{:?}", errors.lock().unwrap());
}

#[test]
fn tasks_without_a_session_see_none_and_binds_stick_to_their_task() {
    let executor = MiniExecutor::new();
    let seen_none = Arc::new(AtomicUsize::new(0));
    let sticky_ok = Arc::new(AtomicUsize::new(0));
    for i in 0..100u64 {
        let (none, sticky) = (seen_none.clone(), sticky_ok.clone());
        executor.spawn_with(None, async move {
            if i % 2 == 0 {
                // A bind inside a task sticks to it across yields...
                bind(SessionCtx::new(&Context::background()).with(&ID, i)).unwrap();
                yield_now().await;
                if cur_id() == Some(i) {
                    sticky.fetch_add(1, Ordering::SeqCst);
                }
                unbind();
            } else {
                // ...and never leaks into another task.
                yield_now().await;
                if current().is_none() {
                    none.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }
    executor.run(2);
    assert_eq!(sticky_ok.load(Ordering::SeqCst), 50);
    assert_eq!(seen_none.load(Ordering::SeqCst), 50);
}

#[test]
fn disabling_a_shared_map_is_seen_by_every_task() {
    let executor = MiniExecutor::new();
    let map = SessionMap::new();
    let invalid_seen = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(AtomicUsize::new(0));
    for _ in 0..10 {
        let (seen, gate) = (invalid_seen.clone(), gate.clone());
        executor.spawn_with(Some(map.clone().into()), async move {
            gate.fetch_add(1, Ordering::SeqCst);
            while current().is_some_and(|s| s.is_valid()) {
                yield_now().await;
            }
            seen.fetch_add(1, Ordering::SeqCst);
        });
    }
    let (m, g) = (map.clone(), gate.clone());
    executor.spawn_with(None, async move {
        while g.load(Ordering::SeqCst) < 10 {
            yield_now().await;
        }
        m.disable();
    });
    executor.run(2);
    assert_eq!(invalid_seen.load(Ordering::SeqCst), 10);
}
