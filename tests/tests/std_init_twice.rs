//! The default manager's lifecycle, in one process: `init_default_manager` once (a second call
//! is an error, unlike Go's silent no-op), `manager_options()` keeps the first options, and
//! `reset_default_manager` replaces them and unbinds every earlier binding on every thread; an
//! invalid reset changes nothing.
//!
//! One test: the steps depend on each other's global state.
#![allow(missing_docs)]

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use localsession_core::config::ConfigField;
use localsession_std::{
    AnySession, Context, InitError, ManagerOptions, SessionCtx, ShardedManager, bind, current, default_manager_options,
    enter, init_default_manager, manager_options, reset_default_manager, unbind,
};

/// What a [`Worker`] is asked to do on its thread.
enum Ask {
    /// Report what is current.
    Report,
    /// `unbind()`, then report whether it handed a session back.
    Unbind,
    /// `enter` a fresh session and drop the guard, then report what is current.
    EnterAndLeave,
    /// End the thread.
    Stop,
}

/// A thread that binds its own session, then answers requests, staying alive (with its
/// binding) until told to stop. Answers: `None` nothing bound, `Some(true)` its own session,
/// `Some(false)` something else (for `Unbind`: `Some(true)` if a session came back).
struct Worker {
    ask: mpsc::Sender<Ask>,
    answer: mpsc::Receiver<Option<bool>>,
    handle: JoinHandle<()>,
}

impl Worker {
    fn start(n: u8) -> Worker {
        let (ask, asks) = mpsc::channel::<Ask>();
        let (tell, answer) = mpsc::channel::<Option<bool>>();
        let handle = std::thread::spawn(move || {
            let mine = AnySession::from(SessionCtx::new(&Context::background()).with_value("worker", n));
            bind(mine.clone()).unwrap();
            let report = || current().map(|c| c.ptr_eq(&mine));
            loop {
                let answer = match asks.recv() {
                    Ok(Ask::Report) => report(),
                    Ok(Ask::Unbind) => unbind().map(|_| true),
                    Ok(Ask::EnterAndLeave) => {
                        drop(enter(SessionCtx::new(&Context::background())));
                        report()
                    }
                    Ok(Ask::Stop) | Err(_) => return,
                };
                tell.send(answer).unwrap();
            }
        });
        Worker { ask, answer, handle }
    }

    fn request(&self, ask: Ask) -> Option<bool> {
        self.ask.send(ask).unwrap();
        self.answer.recv_timeout(Duration::from_secs(10)).expect("the worker answers")
    }

    fn current_is_own(&self) -> Option<bool> {
        self.request(Ask::Report)
    }

    fn stop(self) {
        self.ask.send(Ask::Stop).unwrap();
        self.handle.join().unwrap();
    }
}

#[test]
fn init_once_then_reset_replaces_options_and_unbinds_everywhere() {
    // The outcome must not depend on the environment this test runs in.
    // SAFETY: single-threaded at this point: this file has one test and it has not spawned any
    // thread yet, so nothing reads or writes the environment concurrently.
    unsafe { std::env::remove_var(localsession_core::config::ENV_KEY) };

    assert!(manager_options().is_none(), "nothing initialized yet");
    let first = ManagerOptions { shard_number: 7, gc_interval: Some(Duration::from_secs(5)), implicit_transmit: true };
    init_default_manager(first).expect("first init");
    assert_eq!(manager_options(), Some(first));
    // The thread store and the std clock are the process-wide defaults now.
    let store = localsession_core::global_store().expect("a store is registered");
    assert!(std::ptr::addr_eq(store as *const dyn localsession_core::ContextStore, &localsession_std::THREAD_STORE));
    assert!(localsession_core::global_clock().is_some());

    // Second init: an error, and the first options stay.
    assert_eq!(init_default_manager(default_manager_options()), Err(InitError::AlreadyInitialized));
    let second = ManagerOptions { shard_number: 9, ..first };
    let err = init_default_manager(second).unwrap_err();
    assert_eq!(err, InitError::AlreadyInitialized);
    assert!(err.to_string().contains("reset_default_manager"), "the message points to the fix: {err}");
    assert_eq!(manager_options(), Some(first));
    // ShardedManagers made from the default options follow it.
    assert_eq!(ShardedManager::from_default_options().unwrap().store().options(), &first);

    // Bindings on several live threads, and on this one.
    let workers: Vec<Worker> = (0..3).map(Worker::start).collect();
    for w in &workers {
        assert_eq!(w.current_is_own(), Some(true));
    }
    bind(SessionCtx::new(&Context::background())).unwrap();
    assert!(current().is_some());

    // An invalid reset is an error and changes nothing: options, bindings.
    let err = reset_default_manager(ManagerOptions { shard_number: 0, ..first }).unwrap_err();
    match &err {
        InitError::Options(e) => assert_eq!(e.field(), ConfigField::Shards),
        other => panic!("expected InitError::Options, got {other:?}"),
    }
    assert!(std::error::Error::source(&err).is_some(), "the ConfigError is the source");
    let err = reset_default_manager(ManagerOptions { gc_interval: Some(Duration::from_millis(500)), ..first });
    assert!(matches!(err, Err(InitError::Options(e)) if e.field() == ConfigField::GcInterval));
    assert_eq!(manager_options(), Some(first), "a failed reset keeps the options");
    assert!(current().is_some(), "a failed reset keeps this thread's binding");
    for w in &workers {
        assert_eq!(w.current_is_own(), Some(true), "a failed reset keeps other threads' bindings");
    }

    // A valid reset: new options, and every earlier binding is gone — on every thread.
    let reset = ManagerOptions { shard_number: 3, gc_interval: None, implicit_transmit: false };
    reset_default_manager(reset).expect("reset");
    assert_eq!(manager_options(), Some(reset));
    assert!(current().is_none(), "the resetting thread's binding is gone");
    assert!(localsession_core::current().is_none(), "also through the core's accessor");
    // Each worker touches its slot first in a different way: a stale binding comes back through
    // none of them — not `current()`, not `unbind`, not an `enter` guard's restore.
    assert_eq!(workers[0].request(Ask::Unbind), None, "unbind after a reset hands back nothing");
    assert_eq!(workers[1].request(Ask::EnterAndLeave), None, "a guard restores nothing, not the stale binding");
    assert_eq!(workers[2].current_is_own(), None, "a live thread's earlier binding is gone");
    for w in &workers {
        assert_eq!(w.current_is_own(), None, "a live thread's earlier binding is gone");
    }
    // Binding works as before after a reset.
    let after = AnySession::from(SessionCtx::new(&Context::background()));
    bind(after.clone()).unwrap();
    assert!(current().is_some_and(|c| c.ptr_eq(&after)));
    // The manager stays initialized: init is still an error.
    assert_eq!(init_default_manager(reset), Err(InitError::AlreadyInitialized));
    assert_eq!(manager_options(), Some(reset));

    // A second reset unbinds the binding made after the first.
    reset_default_manager(first).unwrap();
    assert!(current().is_none());
    assert_eq!(manager_options(), Some(first));
    for w in workers {
        assert_eq!(w.current_is_own(), None);
        w.stop();
    }
}
