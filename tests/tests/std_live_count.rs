//! Leak check with `localsession-std`'s `live-count` feature: after 100 000 bind / go / disable /
//! unbind cycles across threads, no session is left in any thread slot.
//!
//! Needs the tests crate's `live-count` feature (which enables `localsession-std/live-count`):
//! `cargo test -p localsession-tests --features live-count --test std_live_count`. Without it
//! this file compiles to nothing.
//!
//! Global state: the process-wide live counter; one test in this file.
// Until `live-count` is declared in tests/Cargo.toml, cargo's check-cfg flags the gate below.
#![cfg(feature = "live-count")]
#![allow(missing_docs)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use common::{DropWatch, EVENTUALLY, wait_until};

use localsession_std::{
    AnySession, Context, Key, SessionCtx, SessionMap, bind, current, enter, go, go_session, live_sessions, scope,
    unbind,
};

const THREADS: usize = 8;
const CYCLES: usize = 12_500;
/// Every this many cycles, a cycle also hands its session to a `go()` child.
const GO_EVERY: usize = 100;

static N: Key<usize> = Key::new("n");

/// Every session object made by the cycles carries a probe, so that besides the slot counter
/// the test checks that the sessions themselves are freed (the counter only sees the slots).
fn one_cycle(t: usize, c: usize, watch: &DropWatch, probes: &AtomicUsize) {
    probes.fetch_add(1, Ordering::Relaxed);
    let s: AnySession = if c.is_multiple_of(2) {
        SessionCtx::new(&Context::background()).with(&N, c).with_value("probe", watch.probe()).into()
    } else {
        SessionMap::new().with(&N, c).with_value("probe", watch.probe()).into()
    };
    bind(s.clone()).unwrap();
    // A scoped rebind on top, restored on drop.
    {
        let _guard = enter(s.with(&N, c + 1));
        assert_eq!(current().and_then(|x| x.get_cloned(&N)), Some(c + 1));
    }
    if c.is_multiple_of(GO_EVERY) {
        // Inherited by a child, and a grandchild with its own session.
        probes.fetch_add(1, Ordering::Relaxed);
        let probe = watch.probe();
        let child = go(move || {
            let inherited = current().and_then(|x| x.get_cloned(&N));
            let own = SessionMap::new().with(&N, t).with_value("probe", probe);
            let grand = go_session(own, || current().and_then(|x| x.get_cloned(&N)));
            (inherited, grand.join().unwrap())
        });
        assert_eq!(child.join().unwrap(), (Some(c), Some(t)));
    }
    if c.is_multiple_of(3) {
        // Go parity: disabled but still bound until unbound.
        assert!(s.disable());
        assert!(current().is_some_and(|x| !x.is_valid()));
    }
    if c.is_multiple_of(7) {
        // Replaced by another bind before the unbind.
        bind(SessionCtx::new(&Context::background())).unwrap();
    }
    let nested = scope(SessionMap::new(), || current().is_some());
    assert!(nested);
    assert!(unbind().is_some());
}

#[test]
fn no_session_outlives_its_binding() {
    assert_eq!(live_sessions(), Some(0), "fresh process");
    let watch = DropWatch::new();
    let probes = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (start, watch, probes) = (Arc::clone(&start), watch.clone(), Arc::clone(&probes));
            std::thread::spawn(move || {
                start.wait();
                for c in 0..CYCLES {
                    one_cycle(t, c, &watch, &probes);
                }
                assert!(current().is_none());
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a worker failed");
    }
    assert_eq!(live_sessions(), Some(0), "every binding was released");
    let made = probes.load(Ordering::Relaxed);
    assert_eq!(made, THREADS * CYCLES + THREADS * CYCLES / GO_EVERY);
    // SessionMap versions are reclaimed through crossbeam-epoch: allow for deferred drops.
    wait_until("every session made by the cycles is freed", EVENTUALLY, || watch.drops() == made);

    // Threads that end with a session still bound release it with their thread-local slot.
    let leftovers: Vec<_> = (0..THREADS)
        .map(|t| std::thread::spawn(move || bind(SessionCtx::new(&Context::background()).with(&N, t))))
        .collect();
    for h in leftovers {
        h.join().unwrap().unwrap();
    }
    assert_eq!(live_sessions(), Some(0), "bindings of ended threads are released");

    // And the counter does count: this thread's binding shows until unbound.
    bind(SessionMap::new()).unwrap();
    assert_eq!(live_sessions(), Some(1));
    unbind();
    assert_eq!(live_sessions(), Some(0));
}
