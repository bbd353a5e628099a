//! The span bridge is opt-in: with the feature on and the switch never turned on, spawned
//! threads do not enter the spawner's span (as with plain `std::thread::spawn`).
#![cfg(feature = "tracing")]
#![allow(missing_docs)]

use localsession_std::{carries_spans, go, in_current_session};
use tracing::info_span;

#[path = "support/span_parents.rs"]
mod support;
use support::{PARENTS, install_capture};

#[test]
fn without_the_switch_spawns_do_not_enter_the_spawners_span() {
    install_capture();
    assert!(!carries_spans());
    info_span!("off_request").in_scope(|| {
        go(|| drop(info_span!("off_go"))).join().unwrap();
        std::thread::spawn(in_current_session(|| drop(info_span!("off_job")))).join().unwrap();
        drop(info_span!("off_same_thread"));
    });
    let parents = PARENTS.lock().unwrap().clone();
    assert!(parents.contains(&("off_go", None)), "{parents:?}");
    assert!(parents.contains(&("off_job", None)), "{parents:?}");
    // The capture works: a span on the spawner's own thread has its parent.
    assert!(parents.contains(&("off_same_thread", Some("off_request"))), "{parents:?}");
}
