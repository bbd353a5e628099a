//! Deadlines on tokio's timer ([`localsession_tokio::TOKIO_CLOCK`]).
//!
//! `localsession_tokio::init` is process-global (it registers the clock), so these tests live in
//! their own binary, and every test calls [`setup`] before touching any session: the first bind
//! anywhere in the process would otherwise register the std clock first.
#![allow(missing_docs)]

mod common;

use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use common::{CAP, DropCounted, REQ, current_req, eventually, wait_until};
use localsession_core::{Clock, Context, SessionCtx, global_clock};
use localsession_std::{current, default_manager_options, scope};
use localsession_tokio::TOKIO_CLOCK;
use tokio::sync::oneshot;
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_secs(10);

fn setup() {
    static INIT: Once = Once::new();
    INIT.call_once(|| localsession_tokio::init(default_manager_options()).expect("first init in this process"));
    let clock = global_clock().expect("init registers a clock");
    assert!(
        std::ptr::addr_eq(clock as *const dyn Clock, &TOKIO_CLOCK as *const _),
        "init did not register TOKIO_CLOCK as the global clock"
    );
}

/// Awaits `f`, failing (instead of hanging) if the deadline timer never fires: with paused time
/// the runtime auto-advances to this one-hour guard when nothing else is pending. Paused time
/// only moves to the next timer, so `f` completing before the guard's instant means a timer woke
/// it — a lazy check at the guard's wake-up (`done()` observes expiry on poll) does not count.
async fn within_virtual_hour<F: std::future::Future>(f: F) -> F::Output {
    const GUARD: Duration = Duration::from_secs(3600);
    let start = Instant::now();
    let out = tokio::time::timeout(GUARD, f).await.expect("the deadline never fired on tokio's timer");
    assert!(start.elapsed() < GUARD, "only the guard's wake-up completed it: the deadline timer never fired");
    out
}

#[tokio::test(start_paused = true)]
async fn with_timeout_expires_on_tokios_timer() {
    setup();
    let start = Instant::now();
    let session = SessionCtx::with_timeout(&Context::background(), TIMEOUT).expect("a clock is registered");
    assert!(session.is_valid());
    assert_eq!(session.err(), None);

    // Paused time: the runtime auto-advances to the timer the clock armed for `done()`.
    within_virtual_hour(session.done()).await;
    assert!(start.elapsed() >= TIMEOUT, "done() resolved before the deadline ({:?} of virtual time)", start.elapsed());
    assert!(!session.is_valid());
    assert!(session.err().expect("expired").is_deadline_exceeded(), "err() = {:?}", session.err());
}

#[tokio::test(start_paused = true)]
async fn a_task_waits_for_its_inherited_sessions_deadline() {
    setup();
    let session = SessionCtx::with_timeout(&Context::background(), TIMEOUT).unwrap().with(&REQ, 5);
    let task = scope(session, || {
        localsession_tokio::spawn(async {
            let mine = current().expect("inherited");
            assert!(mine.is_valid());
            within_virtual_hour(mine.as_ctx().expect("a SessionCtx").done()).await;
            // Still bound, now invalid.
            (current_req(), current().unwrap().is_valid())
        })
    });
    assert_eq!(task.await.unwrap(), (Some(5), false));
}

#[tokio::test(start_paused = true)]
async fn after_cancel_fires_from_the_timer_task() {
    setup();
    let start = Instant::now();
    let session = SessionCtx::with_timeout(&Context::background(), TIMEOUT).unwrap();
    let (tx, rx) = oneshot::channel();
    let _registration = session.export().after_cancel(move || {
        // Runs where the deadline fires: inside the clock's timer task.
        let _ = tx.send((tokio::task::try_id().is_some(), Instant::now()));
    });
    let (in_task, at) = within_virtual_hour(rx).await.expect("the after_cancel callback ran");
    assert!(in_task, "the callback did not run in a tokio task (the clock's timer task)");
    assert!(at >= start + TIMEOUT, "the callback ran before the deadline");
    assert!(session.err().expect("expired").is_deadline_exceeded());
}

#[tokio::test(start_paused = true)]
async fn a_scope_cancelled_before_its_deadline_releases_its_timer_task() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    setup();
    let start = Instant::now();
    // The value sits *below* the deadline scope, so the armed timer task (which holds the scope)
    // keeps it alive until the task ends.
    let base = Context::background().with_value("guard", DropCounted(&DROPS));
    let session = SessionCtx::with_timeout(&base, TIMEOUT).unwrap();
    drop(base);
    let fired = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&fired);
    // Arms the timer; the registration handle (which also holds the scope) is dropped.
    drop(session.export().after_cancel(move || flag.store(true, Ordering::SeqCst)));
    tokio::task::yield_now().await;
    assert_eq!(DROPS.load(Ordering::SeqCst), 0);

    assert!(session.disable());
    assert!(fired.load(Ordering::SeqCst), "after_cancel runs on disable");
    drop(session);
    // Only the timer task can hold the value now. Poll in 1 ms steps of virtual time (each
    // sleep auto-advances just to itself), far short of the 10 s deadline.
    let mut steps = 0;
    while DROPS.load(Ordering::SeqCst) == 0 && steps < 2_000 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        steps += 1;
    }
    assert_eq!(
        DROPS.load(Ordering::SeqCst),
        1,
        "the timer task of a cancelled scope still holds it after {:?} of virtual time (deadline {TIMEOUT:?})",
        start.elapsed()
    );
    assert!(start.elapsed() < TIMEOUT);
}

/// Control for the test above: without a cancel, the timer task holds the scope until the
/// deadline, and releases it when it fires.
#[tokio::test(start_paused = true)]
async fn an_armed_timer_holds_its_scope_until_the_deadline() {
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    setup();
    let base = Context::background().with_value("guard", DropCounted(&DROPS));
    let session = SessionCtx::with_timeout(&base, TIMEOUT).unwrap();
    drop(base);
    drop(session.export().after_cancel(|| {}));
    drop(session);
    for _ in 0..100 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(DROPS.load(Ordering::SeqCst), 0, "nothing but the armed timer task should hold the scope");
    tokio::time::sleep(TIMEOUT).await;
    eventually("the fired timer task releases the scope", || DROPS.load(Ordering::SeqCst) == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_fire_for_tasks_on_a_multi_thread_runtime() {
    setup();
    let session = SessionCtx::with_timeout(&Context::background(), Duration::from_millis(50)).unwrap();
    let waiters: Vec<_> = (0..16)
        .map(|_| {
            scope(session.fork(), || {
                localsession_tokio::spawn(async {
                    tokio::task::yield_now().await;
                    current().unwrap().as_ctx().unwrap().done().await;
                    current().unwrap().as_ctx().unwrap().err()
                })
            })
        })
        .collect();
    for waiter in waiters {
        let err = tokio::time::timeout(CAP, waiter).await.expect("done() resolved").unwrap();
        assert!(err.expect("expired").is_deadline_exceeded());
    }
}

/// Outside a runtime, the tokio clock hands the deadline to the std timer thread.
#[test]
fn outside_a_runtime_the_deadline_fires_on_the_std_timer() {
    setup();
    let session = SessionCtx::with_timeout(&Context::background(), Duration::from_millis(20)).unwrap();
    let (tx, rx) = mpsc::channel();
    let _registration = session.export().after_cancel(move || {
        let _ = tx.send(tokio::runtime::Handle::try_current().is_ok());
    });
    let in_runtime = rx.recv_timeout(CAP).expect("after_cancel fired without a runtime");
    assert!(!in_runtime);
    wait_until("the session is invalid", || !session.is_valid());
    assert!(session.err().unwrap().is_deadline_exceeded());
}
