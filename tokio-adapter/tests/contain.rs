//! Containment without hooks: on a tokio runtime built *without* the implicit hooks (e.g.
//! `#[tokio::main]`), a sticky `bind` inside a plain task is tagged with that task (the std
//! store's task probe, registered by `localsession_tokio::init` and the spawn helpers): other
//! tasks on the same worker, the `block_on` future, and the thread after the runtime is gone
//! never see it. Before, it leaked into all three.
#![allow(missing_docs)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use common::{current_req, req_session};
use futures::FutureExt as _;
use localsession_std::{bind, default_manager_options, scope};
use localsession_tokio::FutureExt as _;
use tokio::runtime::{Builder, Runtime};

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let guard = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    // Registers tokio's task probe (the default manager may be initialized already).
    let _ = localsession_tokio::init(default_manager_options());
    guard
}

fn runtimes() -> Vec<(&'static str, Runtime)> {
    let mut out = vec![("current_thread", Builder::new_current_thread().enable_all().build().unwrap())];
    for workers in [2, 4] {
        let rt = Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap();
        out.push((if workers == 2 { "2 workers" } else { "4 workers" }, rt));
    }
    out
}

#[test]
fn a_bind_inside_a_plain_task_is_seen_by_no_other_unit() {
    let _serial = serial();
    for (name, rt) in runtimes() {
        let foreign = Arc::new(AtomicUsize::new(0));
        let seen_own = Arc::new(AtomicUsize::new(0));
        let block_on_saw = rt.block_on(async {
            let mut handles = Vec::new();
            for i in 0..400u64 {
                let (foreign, seen_own) = (foreign.clone(), seen_own.clone());
                handles.push(tokio::spawn(async move {
                    let binder = i % 2 == 0;
                    if binder {
                        bind(req_session(i)).unwrap();
                        // Within the poll that bound it, the task sees its binding.
                        if current_req() == Some(i) {
                            seen_own.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    for _ in 0..20 {
                        tokio::task::yield_now().await;
                        match current_req() {
                            None => {}
                            Some(id) if binder && id == i => {}
                            Some(_) => {
                                foreign.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
            for h in handles {
                h.await.unwrap();
            }
            current_req()
        });
        drop(rt);
        assert_eq!(foreign.load(Ordering::Relaxed), 0, "{name}: tasks saw another task's binding");
        assert_eq!(seen_own.load(Ordering::Relaxed), 200, "{name}: a binder did not see its own binding");
        assert_eq!(block_on_saw, None, "{name}: the block_on future saw a task's binding");
        assert_eq!(current_req(), None, "{name}: the thread kept a task's binding after the runtime");
    }
}

#[test]
fn scopes_inside_a_plain_task_restore_the_tasks_own_binding() {
    let _serial = serial();
    for (name, rt) in runtimes() {
        let out = rt.block_on(async {
            tokio::spawn(async {
                bind(req_session(1)).unwrap();
                // A scope and a session-carrying future, polled within this poll.
                let in_scope = scope(req_session(2), current_req);
                let in_future = async { current_req() }.with_session(req_session(3)).now_or_never();
                (in_scope, in_future, current_req())
            })
            .await
            .unwrap()
        });
        drop(rt);
        assert_eq!(out, (Some(2), Some(Some(3)), Some(1)), "{name}");
        assert_eq!(current_req(), None, "{name}");
    }
}

#[test]
fn the_threads_own_binding_stays_visible_outside_tasks() {
    let _serial = serial();
    let rt = Builder::new_current_thread().enable_all().build().unwrap();
    bind(req_session(7)).unwrap();
    // The block_on future is not a task: it sees the thread's binding.
    assert_eq!(rt.block_on(async { current_req() }), Some(7));
    assert_eq!(current_req(), Some(7));
    drop(localsession_std::unbind());
}
