//! Regression: an `enter` guard (or a `scope`) opened before `reset_default_manager` used to
//! restore, when it ended after the reset, the binding that was current before the reset:
//! ```text
//! bind(a);
//! let guard = enter(b);
//! reset_default_manager(opts)?;   // current() is None here, as documented
//! drop(guard);                    // current() was `a` again
//! ```
//! Fixed by `ContextStore::generation`: guards (and `WithSession`, checked here for both of its
//! store types) made before a reset leave the slot empty instead of restoring a binding of the
//! old generation.
//!
//! Global state: the default manager (resets); one test in this file.
#![allow(missing_docs)]

use localsession_core::WithSession;
use localsession_std::{
    AnySession, Context, FutureExt, ManagerOptions, SessionCtx, THREAD_STORE, bind, current, enter,
    reset_default_manager, scope, unbind,
};

fn session(n: u8) -> AnySession {
    SessionCtx::new(&Context::background()).with_value("n", n).into()
}

fn options() -> ManagerOptions {
    ManagerOptions { shard_number: 1, gc_interval: None, implicit_transmit: false }
}

#[test]
fn reported_bug_a_guard_opened_before_a_reset_must_not_restore_a_pre_reset_binding() {
    // SAFETY: single-threaded at this point: this file has one test and it has not spawned any
    // thread yet, so nothing reads or writes the environment concurrently.
    unsafe { std::env::remove_var(localsession_core::config::ENV_KEY) };

    // A thread that is inside `scope` while another thread resets the manager.
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (reset_tx, reset_rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        bind(session(1)).unwrap();
        let inside = scope(session(2), || {
            entered_tx.send(()).unwrap();
            reset_rx.recv().unwrap();
            current().is_none()
        });
        (inside, current().and_then(|c| c.value_cloned::<u8, _>(&"n")))
    });
    entered_rx.recv().unwrap();
    reset_default_manager(options()).unwrap();
    reset_tx.send(()).unwrap();

    // The same on this thread, with `enter`.
    bind(session(1)).unwrap();
    let guard = enter(session(2));
    reset_default_manager(options()).unwrap();
    assert!(current().is_none(), "documented: the reset unbinds everything");
    drop(guard);
    let here = current().and_then(|c| c.value_cloned::<u8, _>(&"n"));
    unbind();

    let (inside, there) = worker.join().unwrap();
    assert!(inside, "documented: the reset unbinds the scoped session too");
    assert_eq!(here, None, "BUG: the guard restored session 1, bound before the reset");
    assert_eq!(there, None, "BUG: the scope restored session 1, bound before the reset");

    // A `WithSession` polled across a reset, for the store named by its type (the tokio spawn
    // helpers' `WithSession<_, ThreadStore>`) and through `dyn ContextStore` (`FutureExt`): after
    // the poll the thread holds neither the future's session nor its own binding from before.
    for typed in [true, false] {
        bind(session(1)).unwrap();
        let body = async {
            let had = current().and_then(|c| c.value_cloned::<u8, _>(&"n"));
            reset_default_manager(options()).unwrap();
            (had, current().is_none())
        };
        let (had, cleared) = if typed {
            poll_once(WithSession::new_in_store(&THREAD_STORE, body, Some(session(3))))
        } else {
            poll_once(body.with_session(session(3)))
        };
        let after = current().and_then(|c| c.value_cloned::<u8, _>(&"n"));
        unbind();
        assert_eq!(had, Some(3), "typed store {typed}: the future runs with its session");
        assert!(cleared, "typed store {typed}: documented: the reset unbinds the future's session");
        assert_eq!(after, None, "typed store {typed}: WithSession restored session 1, bound before the reset");
    }

    // A reset that lands after a closing guard checked the generation and before its exchange
    // (a race found by `adversary_concurrency.rs`, `after_reset_returns_no_thread_reads_a_session_bound_before_it`):
    // the store's own scope calls reach that window deterministically. The exchange that closes
    // the scope must not restore the binding saved before the reset (it did, and re-stamped the
    // slot with the new generation, so it read as current), nor hand the pre-reset scope's
    // session back to the caller as still usable.
    let drops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    bind(counted(1, &drops)).unwrap();
    let mut inner = Some(counted(2, &drops));
    let token = THREAD_STORE.enter_scope_in_place(&mut inner).unwrap();
    // `inner` now holds session 1 (what the scope will restore).
    reset_default_manager(options()).unwrap();
    THREAD_STORE.exit_scope_in_place(&mut inner, token);
    let restored = current().and_then(|c| c.value_cloned::<u8, _>(&"n"));
    assert_eq!(restored, None, "BUG: closing the scope after the reset restored session 1, bound before it");
    assert!(inner.is_none(), "the pre-reset scope's session is not handed back: {inner:?}");
    assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 2, "both pre-reset sessions were dropped");
}

/// A session whose value counts its drop.
fn counted(n: u8, drops: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> AnySession {
    struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Count {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    SessionCtx::new(&Context::background())
        .with_value("n", n)
        .with_value("count", std::sync::Arc::new(Count(drops.clone())))
        .into()
}

/// Polls a future that completes in its first poll.
fn poll_once<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("the future was meant to complete in one poll"),
    }
}
