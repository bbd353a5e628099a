//! DESIGN §7 stress: many concurrent requests on a 4-worker runtime, each with its own session
//! (a unique request id; a `SessionMap` for every fourth, a `SessionCtx` otherwise), awaiting at
//! random points — `yield_now`, timers, child tasks, `spawn_blocking` hops — and checking at
//! every point that the current session carries exactly its own id. Afterwards every session is
//! released (a live counter returns to 0) and no runtime thread holds a session.
//!
//! 10 000 requests by default, 100 000 with `LOCALSESSION_STRESS=1`.
#![allow(missing_docs)]

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{CAP, Live, REQ, XorShift, assert_no_worker_holds_a_session, checked_builder, current_req};
use localsession_core::{AnySession, Context, Key, SessionCtx, SessionMap};
use localsession_tokio::JoinSetExt;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet, yield_now};

const WORKERS: usize = 4;
/// Requests in flight at once (bounds memory; plenty for interleaving).
const IN_FLIGHT: usize = 1_000;

static LIVE_KEY: Key<Live> = Key::new("live");

fn requests() -> u64 {
    if common::stress() { 100_000 } else { 10_000 }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `localsession_tokio::spawn`/`JoinSetExt::spawn_with` on a plain runtime.
    Explicit,
    /// Plain `tokio::spawn` on a runtime with the implicit hooks.
    #[cfg(tokio_unstable)]
    Implicit,
}

/// What the requests saw.
#[derive(Default)]
struct Stats {
    checks: AtomicU64,
    /// Reads that found another request's session (isolation broken).
    foreign: AtomicU64,
    /// Reads that found no session (inheritance lost).
    missing: AtomicU64,
    first_failures: Mutex<Vec<String>>,
}

impl Stats {
    fn check(&self, id: u64, at: &str) {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let got = current_req();
        if got == Some(id) {
            return;
        }
        match got {
            None => self.missing.fetch_add(1, Ordering::Relaxed),
            Some(_) => self.foreign.fetch_add(1, Ordering::Relaxed),
        };
        let mut first = self.first_failures.lock().unwrap();
        if first.len() < 5 {
            first.push(format!("request {id} saw {got:?} {at}"));
        }
    }

    fn report(&self) -> String {
        format!(
            "{} checks, {} foreign, {} missing; first: {:#?}",
            self.checks.load(Ordering::Relaxed),
            self.foreign.load(Ordering::Relaxed),
            self.missing.load(Ordering::Relaxed),
            self.first_failures.lock().unwrap()
        )
    }
}

fn request_session(id: u64, live: &'static AtomicIsize) -> AnySession {
    if id.is_multiple_of(4) {
        let map = SessionMap::new();
        map.set(&REQ, id);
        map.set(&LIVE_KEY, Live::new(live));
        map.into()
    } else {
        SessionCtx::new(&Context::background()).with(&REQ, id).with(&LIVE_KEY, Live::new(live)).into()
    }
}

fn spawn_child<F>(mode: Mode, future: F) -> JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    match mode {
        Mode::Explicit => localsession_tokio::spawn(future),
        #[cfg(tokio_unstable)]
        Mode::Implicit => tokio::spawn(future),
    }
}

type BoxFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// One await point chosen by `rng`, then a check. (Children take further steps, but no
/// grandchildren: `depth` > 0 only yields or sleeps.)
fn random_step<'a>(rng: &'a mut XorShift, id: u64, mode: Mode, stats: &'a Arc<Stats>, depth: u32) -> BoxFuture<'a> {
    Box::pin(random_step_inner(rng, id, mode, stats, depth))
}

async fn random_step_inner(rng: &mut XorShift, id: u64, mode: Mode, stats: &Arc<Stats>, depth: u32) {
    match rng.below(if depth == 0 { 4 } else { 2 }) {
        0 => {
            yield_now().await;
            stats.check(id, "after yield_now");
        }
        1 => {
            tokio::time::sleep(Duration::from_micros(rng.below(2_000))).await;
            stats.check(id, "after sleep");
        }
        2 => {
            let children: Vec<_> = (0..rng.below(4))
                .map(|_| {
                    let (stats, seed) = (Arc::clone(stats), rng.next_u64());
                    spawn_child(mode, async move {
                        stats.check(id, "in a child, first poll");
                        let mut rng = XorShift::new(seed);
                        for _ in 0..1 + rng.below(2) {
                            random_step(&mut rng, id, mode, &stats, depth + 1).await;
                        }
                    })
                })
                .collect();
            for child in children {
                child.await.expect("child task");
            }
            stats.check(id, "after joining children");
        }
        _ => {
            let in_blocking = Arc::clone(stats);
            localsession_tokio::spawn_blocking(move || in_blocking.check(id, "in spawn_blocking"))
                .await
                .expect("blocking job");
            stats.check(id, "after spawn_blocking");
        }
    }
}

async fn request(id: u64, mode: Mode, stats: Arc<Stats>) {
    stats.check(id, "on first poll");
    let mut rng = XorShift::new(id);
    for _ in 0..2 + rng.below(4) {
        random_step(&mut rng, id, mode, &stats, 0).await;
    }
}

struct Outcome {
    stats: Arc<Stats>,
    /// Live sessions once the requests have ended (polled down to 0 for up to [`CAP`] when
    /// `wait_for_release`).
    live_after: isize,
}

fn run(mode: Mode, live: &'static AtomicIsize, wait_for_release: bool) -> Outcome {
    let (mut builder, leftovers) = checked_builder(WORKERS);
    builder.max_blocking_threads(8);
    #[cfg(tokio_unstable)]
    if mode == Mode::Implicit {
        localsession_tokio::enable_implicit_sessions(&mut builder);
    }
    let rt = builder.build().unwrap();
    let stats = Arc::new(Stats::default());
    rt.block_on(async {
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut set = JoinSet::new();
        for id in 0..requests() {
            let permit = Arc::clone(&in_flight).acquire_owned().await.unwrap();
            let session = request_session(id, live);
            let stats = Arc::clone(&stats);
            let handler = async move {
                request(id, mode, stats).await;
                drop(permit);
            };
            match mode {
                Mode::Explicit => drop(set.spawn_with(session, handler)),
                #[cfg(tokio_unstable)]
                Mode::Implicit => drop(localsession_std::scope(session, || set.spawn(handler))),
            }
            while let Some(done) = set.try_join_next() {
                done.expect("request task");
            }
        }
        while let Some(done) = set.join_next().await {
            done.expect("request task");
        }
        if mode == Mode::Explicit {
            // (With the implicit hooks, plain probe tasks get their own slot contents swapped
            // in, so they cannot see a leftover; the park/stop check below covers both.)
            assert_no_worker_holds_a_session(WORKERS).await;
        }
    });
    let start = std::time::Instant::now();
    while wait_for_release && live.load(Ordering::SeqCst) != 0 && start.elapsed() < CAP {
        std::thread::sleep(Duration::from_millis(5));
    }
    let live_after = live.load(Ordering::SeqCst);
    eprintln!("{mode:?}, {} requests: {}; live after: {live_after}", requests(), stats.report());
    drop(rt);
    leftovers.assert_clean();
    assert_eq!(current_req(), None, "the test thread kept a session");
    Outcome { stats, live_after }
}

#[test]
fn explicit_requests_are_isolated_and_released() {
    static LIVE: AtomicIsize = AtomicIsize::new(0);
    let Outcome { stats, live_after } = run(Mode::Explicit, &LIVE, true);
    let s = &stats;
    assert!(s.checks.load(Ordering::Relaxed) >= 3 * requests(), "too few checks ran: {}", s.report());
    assert_eq!(s.foreign.load(Ordering::Relaxed), 0, "a request saw another's session: {}", s.report());
    assert_eq!(s.missing.load(Ordering::Relaxed), 0, "a request lost its session: {}", s.report());
    assert_eq!(live_after, 0, "sessions still alive {CAP:?} after the last request ended");
}

/// The full stress on the implicit hooks: plain `tokio::spawn` children, timers included. It
/// caught both implicit-mode ordering bugs (see `tests/implicit.rs`): polls that ran without
/// their session (`missing` > 0), and sessions that stayed in the implicit table
/// (`live_after` > 0). The implicit table is process-wide: the implicit runs of this file take
/// turns.
#[cfg(tokio_unstable)]
static IMPLICIT_RUNS: Mutex<()> = Mutex::new(());

#[cfg(tokio_unstable)]
#[test]
fn implicit_requests_are_isolated_and_released() {
    static LIVE: AtomicIsize = AtomicIsize::new(0);
    let _turn = IMPLICIT_RUNS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = localsession_tokio::implicit_task_sessions();
    let Outcome { stats, live_after } = run(Mode::Implicit, &LIVE, true);
    let s = &stats;
    assert!(s.checks.load(Ordering::Relaxed) >= 3 * requests(), "too few checks ran: {}", s.report());
    assert_eq!(s.foreign.load(Ordering::Relaxed), 0, "a request saw another's session: {}", s.report());
    assert_eq!(s.missing.load(Ordering::Relaxed), 0, "a request lost its session: {}", s.report());
    assert_eq!(live_after, 0, "sessions still alive {CAP:?} after the last request ended");
    common::wait_until("the implicit table is back where it was", || {
        localsession_tokio::implicit_task_sessions() == before
    });
}
