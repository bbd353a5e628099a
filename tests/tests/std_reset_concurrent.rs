//! `reset_default_manager` racing `bind`/`current` on other threads (DESIGN §4: "safe under
//! concurrent `current()`/`bind()`"): no panic, no torn read — a thread only ever sees nothing
//! or its own session — and once the resets stop, a reset unbinds everything and the next bind
//! sticks.
#![allow(missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use localsession_std::{
    AnySession, Context, Key, ManagerOptions, SessionCtx, bind, current, manager_options, reset_default_manager,
    with_current,
};

const THREADS: usize = 4;
const RACE_FOR: Duration = Duration::from_millis(500);

static OWNER: Key<usize> = Key::new("owner");

fn options(shards: usize) -> ManagerOptions {
    ManagerOptions { shard_number: shards, gc_interval: None, implicit_transmit: false }
}

#[test]
fn reset_races_bind_and_current_without_torn_reads() {
    // SAFETY: single-threaded at this point: this file has one test and it has not spawned any
    // thread yet, so nothing reads or writes the environment concurrently.
    unsafe { std::env::remove_var(localsession_core::config::ENV_KEY) };
    reset_default_manager(options(1)).expect("reset initializes the manager");

    let stop = Arc::new(AtomicBool::new(false));
    // All workers stopped binding / the final reset is done / the final check is done.
    let quiet = Arc::new(Barrier::new(THREADS + 1));
    let reset_done = Arc::new(Barrier::new(THREADS + 1));
    let saw_none = Arc::new(AtomicU64::new(0));

    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let (stop, quiet, reset_done, saw_none) =
                (Arc::clone(&stop), Arc::clone(&quiet), Arc::clone(&reset_done), Arc::clone(&saw_none));
            std::thread::spawn(move || {
                let mut binds = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // A fresh session each round, so a stale or foreign one cannot pass for it.
                    let mine = AnySession::from(SessionCtx::new(&Context::background()).with(&OWNER, i));
                    bind(mine.clone()).unwrap();
                    binds += 1;
                    for _ in 0..8 {
                        match current() {
                            None => {
                                // A reset landed after the bind: it stays gone until the next bind.
                                saw_none.fetch_add(1, Ordering::Relaxed);
                                assert!(current().is_none(), "thread {i}: a reset binding came back");
                                break;
                            }
                            Some(cur) => {
                                assert!(cur.ptr_eq(&mine), "thread {i}: current() is not the session it bound");
                                assert_eq!(cur.get_cloned(&OWNER), Some(i), "thread {i}: torn read");
                            }
                        }
                        let borrowed = with_current(|c| c.map(|c| c.ptr_eq(&mine)));
                        assert_ne!(borrowed, Some(false), "thread {i}: with_current saw a foreign session");
                    }
                }
                quiet.wait();
                reset_done.wait();
                // The last reset happened after this thread's last bind.
                assert!(current().is_none(), "thread {i}: binding survived the final reset");
                let last = AnySession::from(SessionCtx::new(&Context::background()).with(&OWNER, i));
                bind(last.clone()).unwrap();
                assert!(current().is_some_and(|c| c.ptr_eq(&last)), "thread {i}: the bind after the reset sticks");
                binds
            })
        })
        .collect();

    let started = Instant::now();
    let mut resets = 0usize;
    while started.elapsed() < RACE_FOR {
        let shards = 1 + resets % 16;
        reset_default_manager(options(shards)).expect("reset");
        resets += 1;
        let now = manager_options().expect("initialized");
        assert!((1..=16).contains(&now.shard_number), "options are one of those set: {now:?}");
    }
    stop.store(true, Ordering::Relaxed);
    quiet.wait();
    reset_default_manager(options(42)).expect("final reset");
    reset_done.wait();

    let binds: Vec<u64> = workers.into_iter().map(|w| w.join().expect("a worker failed")).collect();
    assert_eq!(manager_options(), Some(options(42)));
    assert!(resets > 0);
    assert!(binds.iter().all(|&b| b > 0), "every worker bound at least once: {binds:?}");
    eprintln!(
        "{resets} resets raced {} binds; a reset was observed {} times",
        binds.iter().sum::<u64>(),
        saw_none.load(Ordering::Relaxed)
    );
}
