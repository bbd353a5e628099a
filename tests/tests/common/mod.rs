//! Helpers shared by the integration tests of this package (not a test target itself: cargo only
//! builds `tests/*.rs` as targets, and each file includes this module with `mod common;`).
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A generous cap for "eventually" conditions: the machines are shared and noisy, so this is a
/// hang detector, never a performance assertion.
pub(crate) const EVENTUALLY: Duration = Duration::from_secs(10);

/// A value to put in a session: counts its drops, so a test can observe when the last handle of
/// the session is released, and records whether it was dropped while its thread was unwinding.
#[derive(Debug)]
pub(crate) struct DropProbe {
    drops: Arc<AtomicUsize>,
    dropped_while_panicking: Arc<AtomicBool>,
}

/// The observer side of a [`DropProbe`].
#[derive(Debug, Clone, Default)]
pub(crate) struct DropWatch {
    drops: Arc<AtomicUsize>,
    dropped_while_panicking: Arc<AtomicBool>,
}

impl DropWatch {
    pub(crate) fn new() -> DropWatch {
        DropWatch::default()
    }

    /// A probe reporting to this watch.
    pub(crate) fn probe(&self) -> DropProbe {
        DropProbe { drops: Arc::clone(&self.drops), dropped_while_panicking: Arc::clone(&self.dropped_while_panicking) }
    }

    /// How many probes of this watch were dropped.
    pub(crate) fn drops(&self) -> usize {
        self.drops.load(Ordering::SeqCst)
    }

    /// Whether a probe was dropped while its thread was panicking (during unwinding).
    pub(crate) fn dropped_while_panicking(&self) -> bool {
        self.dropped_while_panicking.load(Ordering::SeqCst)
    }
}

impl Drop for DropProbe {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dropped_while_panicking.store(true, Ordering::SeqCst);
        }
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// Polls `cond` until it holds; panics naming `what` if it does not within `cap`.
#[track_caller]
pub(crate) fn wait_until(what: &str, cap: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < cap, "timed out after {cap:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `futures::executor::block_on(fut)` on a helper thread; panics naming `what` if the future
/// has not resolved within `cap` (the helper thread is then left blocked, the test fails).
#[track_caller]
pub(crate) fn block_on_within<F>(what: &str, cap: Duration, fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // The receiver is gone only if the test already failed.
        let _ = tx.send(futures::executor::block_on(fut));
    });
    match rx.recv_timeout(cap) {
        Ok(out) => out,
        Err(_) => panic!("timed out after {cap:?} waiting until {what}"),
    }
}

/// Runs `body` in a child process — this test binary, filtered to the test `name` — for tests
/// that may abort the process (a stack overflow) or that read or change process-wide state
/// (counters, the global clock): a crash then fails that one test, and the rest of the binary
/// is unaffected. `name` is the test's path as the harness prints it (`module::test` inside a
/// module).
pub(crate) fn in_child_process(name: &str, body: impl FnOnce()) {
    const CHILD_ENV: &str = "LOCALSESSION_TEST_CHILD";
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        body();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
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
