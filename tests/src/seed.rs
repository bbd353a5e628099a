//! The seed program of Go's `cloudwego/localsession` README, ported line for line.
//!
//! A session is bound on the main thread ("g0"), carried into threads with [`go`] and
//! [`go_session`], derived with `with_value` (which never changes the current session), then
//! disabled from g0 — which every thread observes as invalid.
//!
//! Go's channels map to: `sig2` (unbuffered, many senders) -> `mpsc::sync_channel(0)`;
//! `close(sig)` (wakes every receiver) -> [`Gate::open`].

use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use localsession_core::{AnySession, Context, SessionCtx, SessionMap};
use localsession_std::{bind, current, go, go_session, unbind};

/// Which of Go's two session implementations the program runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `NewSessionCtx`: immutable; `with_value` derives a new session.
    Ctx,
    /// `NewSessionMap`: one shared map; `with_value` updates it for every holder.
    Map,
}

/// Go's `close(sig)`: once opened, every waiter passes.
#[derive(Debug, Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    /// Opens the gate for every current and future waiter.
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.cv.notify_all();
    }

    /// Waits until the gate is open.
    pub fn wait(&self) {
        let guard = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        drop(self.cv.wait_while(guard, |open| !*open).unwrap_or_else(PoisonError::into_inner));
    }
}

/// Go's `GetCurSession()`: the current session, which must exist.
fn get_cur_session() -> AnySession {
    current().expect("can't get current session!")
}

fn get(s: &AnySession, key: &'static str) -> Option<&'static str> {
    s.value_cloned::<&'static str, _>(&key)
}

/// Runs the seed program; `println` receives what Go prints ("g1 done", ..., "g0 done").
///
/// # Panics
/// When one of the program's assertions fails (Go's `ASSERT` panics too).
pub fn run(kind: Kind, println: impl Fn(&str) + Send + Sync + 'static) {
    let println = Arc::new(println);
    let ctx = Context::background();
    let (key, v) = ("a", "b");
    let (key2, v2) = ("c", "d");
    let sig = Arc::new(Gate::default());
    let (sig2, sig2_rx) = sync_channel::<()>(0);

    // initialize new session with context
    let session: AnySession = match kind {
        Kind::Ctx => SessionCtx::new(&ctx).into(),
        Kind::Map => SessionMap::new_in(&ctx).into(),
    };

    // set specific key-value and update session
    let start = session.with_value(key, v);

    // set current session
    bind(start.clone());

    // pass to new goroutine...
    let (sig_g1, sig2_g1, out_g1) = (sig.clone(), sig2.clone(), println.clone());
    go(move || {
        // read specific key under current session
        let val = get(&get_cur_session(), key); // val exists
        assert_eq!(val, Some(v));

        // set specific key-value under current session
        // NOTICE: current session won't change here (for SessionCtx)
        let next = get_cur_session().with_value(key2, v2);
        let val2 = get(&get_cur_session(), key2);
        match kind {
            Kind::Ctx => assert_eq!(val2, None),     // val2 == nil
            Kind::Map => assert_eq!(val2, Some(v2)), // the map is shared
        }

        // pass both parent session and new session to sub goroutine
        let (sig_g2, sig2_g2, out_g2) = (sig_g1.clone(), sig2_g1.clone(), out_g1.clone());
        go_session(next.clone(), move || {
            // read specific key under current session
            assert_eq!(get(&get_cur_session(), key), Some(v)); // val exists
            assert_eq!(get(&get_cur_session(), key2), Some(v2)); // val2 exists
            send(&sig2_g2);

            sig_g2.wait();
            assert!(!get_cur_session().is_valid()); // current session is invalid

            out_g2("g2 done");
            send(&sig2_g2);
        });

        let (sig_g3, sig2_g3, out_g3) = (sig_g1.clone(), sig2_g1.clone(), out_g1.clone());
        go(move || {
            // read specific key under current session
            assert_eq!(get(&get_cur_session(), key), Some(v)); // val exists
            match kind {
                Kind::Ctx => assert_eq!(get(&get_cur_session(), key2), None), // val2 == nil
                Kind::Map => assert_eq!(get(&get_cur_session(), key2), Some(v2)),
            }
            send(&sig2_g3);

            sig_g3.wait();
            assert!(!get_cur_session().is_valid()); // current session is invalid

            out_g3("g3 done");
            send(&sig2_g3);
        });

        bind(next.clone());
        let val2 = get(&get_cur_session(), key2); // val2 exists
        assert_eq!(val2, Some(v2));
        send(&sig2_g1);

        sig_g1.wait();
        assert!(!next.is_valid()); // next is invalid

        out_g1("g1 done");
        send(&sig2_g1);
    });

    recv(&sig2_rx);
    recv(&sig2_rx);
    recv(&sig2_rx);

    let val2 = get(&get_cur_session(), key2);
    match kind {
        Kind::Ctx => assert_eq!(val2, None), // val2 == nil
        Kind::Map => assert_eq!(val2, Some(v2)),
    }

    // initiatively ends the session,
    // then all the inherited session (including next) will be disabled
    session.disable();
    sig.open();

    assert!(!start.is_valid()); // start is invalid

    recv(&sig2_rx);
    recv(&sig2_rx);
    recv(&sig2_rx);
    println("g0 done");

    unbind();
}

fn send(tx: &SyncSender<()>) {
    tx.send(()).expect("g0 is waiting");
}

fn recv(rx: &std::sync::mpsc::Receiver<()>) {
    rx.recv().expect("a goroutine exited before signalling");
}
