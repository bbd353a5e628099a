//! The seed program on tokio tasks, with the explicit helpers (any build, no `tokio_unstable`).
//!
//! Run with `cargo run -p localsession-examples --features tokio --example tokio_seed`.
//! A session is carried into tasks with `localsession_tokio::spawn` (the spawner's session) and
//! `spawn_with` (a given one); the tasks hop between two workers at every `.await`, and every one of
//! them sees the session the main task disables as invalid. The tasks are awaited in order, so the
//! output is the same on every run.

use localsession_core::{AnySession, Context, SessionCtx};
use localsession_std::{current, default_manager_options, scope};
use tokio::sync::watch;

fn get(key: &'static str) -> Option<&'static str> {
    current().and_then(|s| s.value_cloned::<&'static str, _>(&key))
}

fn valid() -> bool {
    current().is_some_and(|s| s.is_valid())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        localsession_tokio::init(default_manager_options()).expect("first init");
        let session: AnySession = SessionCtx::new(&Context::background()).into();
        let start = session.with_value("a", "b");
        let next = start.with_value("c", "d");
        println!("main: start = session.with_value(\"a\", \"b\"); next = start.with_value(\"c\", \"d\")");
        let (disabled_tx, disabled) = watch::channel(false);

        // `spawn` inside `scope(start, ..)`: the task gets the spawner's current session, start.
        let mut rx1 = disabled.clone();
        let t1 = scope(start.clone(), || {
            localsession_tokio::spawn(async move {
                tokio::task::yield_now().await; // may resume on the other worker
                let before = format!(
                    "t1: spawn() carried the spawner's session (start): a = {:?}, c = {:?}",
                    get("a"),
                    get("c")
                );
                rx1.wait_for(|d| *d).await.expect("main is alive");
                (before, format!("t1: after the disable, its session is_valid() = {}", valid()))
            })
        });
        // `spawn_with(next, ..)`: the task gets the given session.
        let mut rx2 = disabled.clone();
        let t2 = localsession_tokio::spawn_with(next.clone(), async move {
            tokio::task::yield_now().await;
            let before = format!("t2: spawn_with(next) carried next: a = {:?}, c = {:?}", get("a"), get("c"));
            rx2.wait_for(|d| *d).await.expect("main is alive");
            (before, format!("t2: after the disable, its session is_valid() = {}", valid()))
        });

        tokio::task::yield_now().await;
        session.disable();
        println!("main: session.disable(): start and next derive from it, so both are invalid now");
        disabled_tx.send(true).expect("the tasks are alive");
        for task in [t1, t2] {
            let (before, after) = task.await.expect("task panicked");
            println!("{before}");
            println!("{after}");
        }
        println!("main done: both tasks saw the disabled session as invalid");
    });
}
