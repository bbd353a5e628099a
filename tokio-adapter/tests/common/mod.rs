//! Helpers shared by the integration tests of `localsession-tokio` (each test file uses a part).
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::time::Duration;

use localsession_core::{Context, Key, SessionCtx};
use localsession_std::with_current;

/// The request id every test session carries.
pub(crate) static REQ: Key<u64> = Key::new("req");

/// How long an eventual condition may take before the test fails.
pub(crate) const CAP: Duration = Duration::from_secs(5);

/// A fresh session (own validity scope) carrying request id `id`.
pub(crate) fn req_session(id: u64) -> SessionCtx {
    SessionCtx::new(&Context::background()).with(&REQ, id)
}

/// The request id of the session bound on this thread right now (inside a task: the task's).
pub(crate) fn current_req() -> Option<u64> {
    with_current(|s| s.and_then(|s| s.read_key(&REQ, |v| v.copied())))
}

/// Yields and sleeps 1 ms, so that a task on a multi-thread runtime may resume on another worker.
pub(crate) async fn hop() {
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// A session value whose drop is observable: counts drops in a static counter.
pub(crate) struct DropCounted(pub(crate) &'static AtomicUsize);

impl Drop for DropCounted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A session value counted while alive: +1 on creation, -1 on drop.
pub(crate) struct Live(&'static AtomicIsize);

impl Live {
    pub(crate) fn new(counter: &'static AtomicIsize) -> Live {
        counter.fetch_add(1, Ordering::SeqCst);
        Live(counter)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs a closure on drop (to observe what a future sees while it is dropped).
pub(crate) struct OnDrop<F: FnMut()>(pub(crate) F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Polls `cond` (async, tokio sleeps of 5 ms) until it holds; fails after [`CAP`] of wall time.
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < CAP, "not within {CAP:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `f`, failing after [`CAP`] instead of hanging (e.g. on a barrier a panicked task never
/// reaches).
pub(crate) async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(CAP, f).await {
        Ok(out) => out,
        Err(_) => panic!("not within {CAP:?}: {what}"),
    }
}

/// Blocking version of [`eventually`] (outside a runtime).
pub(crate) fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < CAP, "not within {CAP:?}: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Checks, with plain `tokio::spawn` tasks (no session helpers), that no worker of the current
/// runtime has a session left in its slot. Only meaningful on a runtime **without** the implicit
/// hooks (those swap the slot around every poll); there, see [`LeftoverCheck`].
///
/// Must be called from outside the workers (the `block_on` future of a `#[tokio::test]`), so the
/// probes go through the injection queue and can spread.
///
/// 1. `workers` probes that each block their worker until all have arrived, so every worker
///    runs one (each reads its slot first);
/// 2. 200 probes with yields in between reads, on whichever worker.
pub(crate) async fn assert_no_worker_holds_a_session(workers: usize) {
    let arrived = Arc::new(AtomicUsize::new(0));
    let probes: Vec<_> = (0..workers)
        .map(|_| {
            let arrived = Arc::clone(&arrived);
            tokio::spawn(async move {
                let seen = current_req_or_any();
                arrived.fetch_add(1, Ordering::SeqCst);
                let start = std::time::Instant::now();
                // Block this worker until every probe runs on a worker of its own.
                while arrived.load(Ordering::SeqCst) < workers && start.elapsed() < CAP {
                    std::thread::sleep(Duration::from_millis(1));
                }
                (std::thread::current().id(), seen)
            })
        })
        .collect();
    let mut threads = HashSet::new();
    for probe in probes {
        let (thread, seen) = probe.await.expect("probe task");
        assert_eq!(seen, None, "a worker ({thread:?}) still holds a session between tasks");
        threads.insert(thread);
    }
    assert_eq!(threads.len(), workers, "the blocking probes did not reach every worker");

    let probes: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                let mut seen = vec![current_req_or_any()];
                for _ in 0..(i % 3) {
                    tokio::task::yield_now().await;
                    seen.push(current_req_or_any());
                }
                seen
            })
        })
        .collect();
    for probe in probes {
        let seen = probe.await.expect("probe task");
        assert!(seen.iter().all(Option::is_none), "a plain task saw a session left on its worker: {seen:?}");
    }
}

/// `Some(id)` (or `Some(u64::MAX)` for a session without a request id) if a session is bound.
fn current_req_or_any() -> Option<u64> {
    with_current(|s| s.map(|s| s.read_key(&REQ, |v| v.copied()).unwrap_or(u64::MAX)))
}

/// Counts worker threads that go idle (park) or stop with a session in their slot. Installed on
/// a runtime builder; works with or without the implicit hooks, because parking and stopping
/// happen outside any task poll.
#[derive(Clone, Default)]
pub(crate) struct LeftoverCheck(Arc<AtomicUsize>);

impl LeftoverCheck {
    pub(crate) fn install(&self, builder: &mut tokio::runtime::Builder) {
        let park = self.clone();
        builder.on_thread_park(move || park.check());
        let stop = self.clone();
        builder.on_thread_stop(move || stop.check());
    }

    fn check(&self) {
        if with_current(|s| s.is_some()) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Call after the runtime was dropped (its threads stopped).
    pub(crate) fn assert_clean(&self) {
        let n = self.0.load(Ordering::SeqCst);
        assert_eq!(n, 0, "{n} times a runtime thread parked or stopped with a session still in its slot");
    }
}

/// A multi-thread runtime builder with `workers` workers, all drivers, and a [`LeftoverCheck`].
pub(crate) fn checked_builder(workers: usize) -> (tokio::runtime::Builder, LeftoverCheck) {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers).enable_all();
    let check = LeftoverCheck::default();
    check.install(&mut builder);
    (builder, check)
}

/// A tiny deterministic RNG (xorshift64).
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> XorShift {
        // Spread small seeds; never zero.
        XorShift(seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Seeded as given (no spreading): the same sequence as a bare xorshift64 from `seed`.
    pub(crate) fn raw(seed: u64) -> XorShift {
        XorShift(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `LOCALSESSION_STRESS=1` selects the long runs.
pub(crate) fn stress() -> bool {
    std::env::var("LOCALSESSION_STRESS").is_ok_and(|v| v == "1")
}

static COUNTED_MADE: AtomicUsize = AtomicUsize::new(0);
static COUNTED_DROPPED: AtomicUsize = AtomicUsize::new(0);

/// A session value whose making and dropping are counted process-wide (per test binary): with
/// the runtime idle, [`outstanding`] back at its baseline means no session value was leaked.
pub(crate) struct Counted;

impl Counted {
    pub(crate) fn new() -> Counted {
        COUNTED_MADE.fetch_add(1, Ordering::SeqCst);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        COUNTED_DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

/// [`Counted`] values made and not yet dropped.
pub(crate) fn outstanding() -> usize {
    COUNTED_MADE.load(Ordering::SeqCst) - COUNTED_DROPPED.load(Ordering::SeqCst)
}
