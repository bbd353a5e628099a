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
    in_child_within(name, Duration::from_secs(600), body);
}

/// [`in_child_process`], killing the child after `cap`: for tests whose failure mode is a
/// thread spinning forever (a deadlock) as well as a process abort.
pub(crate) fn in_child_within(name: &str, cap: Duration, body: impl FnOnce()) {
    const CHILD_ENV: &str = "LOCALSESSION_TEST_CHILD";
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        body();
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child test process");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if started.elapsed() > cap {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("the child's output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match status {
        None => panic!("HANG: child `{name}` did not finish within {cap:?}\n--- stderr ---\n{stderr}"),
        Some(status) => assert!(
            status.success() && stdout.contains("1 passed"),
            "child process for `{name}` failed: {status:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        ),
    }
}

/// Runs `f` on a helper thread and waits at most `cap` for it: a hang fails the test naming
/// `what` (the helper thread is left behind), a panic in `f` is re-raised here.
#[track_caller]
pub(crate) fn within<R: Send + 'static>(what: &str, cap: Duration, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(());
        out
    });
    match rx.recv_timeout(cap) {
        Ok(()) => match handle.join().expect("the helper catches panics") {
            Ok(r) => r,
            Err(payload) => std::panic::resume_unwind(payload),
        },
        Err(_) => panic!("HANG: {what} did not finish within {cap:?} (deadlock?)"),
    }
}

/// `f`, its panic caught (and returned).
pub(crate) fn silently<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
}

/// Counts values made and dropped: `made == dropped` at the end means nothing leaked and nothing
/// was dropped twice (a double drop shows as `dropped > made`).
#[derive(Default, Debug)]
pub(crate) struct Tracker {
    made: AtomicUsize,
    dropped: AtomicUsize,
}

impl Tracker {
    pub(crate) fn new() -> Arc<Tracker> {
        Arc::new(Tracker::default())
    }
    pub(crate) fn made(&self) -> usize {
        self.made.load(Ordering::SeqCst)
    }
    pub(crate) fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
    /// A new counted value.
    pub(crate) fn token(self: &Arc<Self>) -> Token {
        self.made.fetch_add(1, Ordering::SeqCst);
        Token(Arc::clone(self))
    }
    #[track_caller]
    pub(crate) fn assert_balanced(&self, what: &str) {
        let (m, d) = (self.made(), self.dropped());
        assert_eq!(m, d, "{what}: {m} made, {d} dropped (leak or double drop)");
    }
}

/// One counted value of a [`Tracker`] (the tracker it counts for).
#[derive(Debug)]
pub(crate) struct Token(pub(crate) Arc<Tracker>);

impl Drop for Token {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

/// A tiny deterministic generator (no dependency): xorshift64, seeded as given.
#[derive(Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform-ish in `0..n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A cancellation cause that says which caller gave it (`ContextError::cause(Cause(n))`).
#[derive(Debug)]
pub(crate) struct Cause(pub(crate) u64);

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cause {}", self.0)
    }
}

impl std::error::Error for Cause {}
