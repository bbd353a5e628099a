//! The seed program of Go's `cloudwego/localsession` README, ported line for line.
//!
//! A session is bound on the main thread ("g0"), carried into threads with [`go`] and
//! [`go_session`], derived with `with_value` (which never changes the current session), then
//! disabled from g0 — which every thread observes as invalid.
//!
//! Go's channels map to: `sig2` (unbuffered, many senders) -> `mpsc::sync_channel(0)`;
//! `close(sig)` (wakes every receiver) -> a gate (a flag under a mutex and a condition variable).
//! Go's goroutines print as they go, so its output order changes from run to run. Here each thread
//! sends what it observed through `sig2` instead of an empty struct, and g0 prints the reports in
//! thread order at the two points where Go's g0 waits for all three; at the end g0 joins the threads
//! in order. The output is therefore the same on every run, and every line says what it shows.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
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

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Ctx => "SessionCtx is immutable: with_value derived a new session",
            Kind::Map => "SessionMap is shared: with_value updated the map every holder sees",
        }
    }
}

/// Go's `close(sig)`: once opened, every waiter passes.
#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.cv.notify_all();
    }

    fn wait(&self) {
        let guard = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        drop(self.cv.wait_while(guard, |open| !*open).unwrap_or_else(PoisonError::into_inner));
    }
}

/// What a thread sends through `sig2` (Go sends `struct{}{}`): its number and what it observed.
type Report = (u8, Vec<String>);

/// Go's `GetCurSession()`: the current session, which must exist.
fn get_cur_session() -> AnySession {
    current().expect("can't get current session!")
}

fn get(s: &AnySession, key: &'static str) -> Option<&'static str> {
    s.value_cloned::<&'static str, _>(&key)
}

/// Runs the seed program and passes its output, one explained line at a time, to `println`.
///
/// `println` is only called on the calling thread (g0), in the same order on every run: g0's
/// setup, then the reports of g1, g2 and g3 (in that order) from before the disable, g0's checks
/// and the disable, the reports of g1, g2 and g3 from after it, and `g0 done`.
///
/// # Panics
/// When one of the program's assertions fails (Go's `ASSERT` panics too).
pub fn run(kind: Kind, mut println: impl FnMut(&str)) {
    let ctx = Context::background();
    let (key, v) = ("a", "b");
    let (key2, v2) = ("c", "d");
    let sig = Arc::new(Gate::default());
    let (sig2, sig2_rx) = sync_channel::<Report>(0);

    // initialize new session with context
    let session: AnySession = match kind {
        Kind::Ctx => SessionCtx::new(&ctx).into(),
        Kind::Map => SessionMap::new_in(&ctx).into(),
    };

    // set specific key-value and update session
    let start = session.with_value(key, v);

    // set current session
    bind(start.clone()).unwrap();
    println(&format!(
        "g0: bound start = session.with_value(\"a\", \"b\") on the main thread: a = {:?}",
        get(&get_cur_session(), key)
    ));

    // pass to new goroutine...
    let (sig_g1, sig2_g1) = (sig.clone(), sig2.clone());
    let g1 = go(move || {
        let mut before = Vec::new();
        // read specific key under current session
        let val = get(&get_cur_session(), key); // val exists
        assert_eq!(val, Some(v));
        before.push(format!("g1: go() carried g0's session (start) into the new thread: a = {val:?}"));

        // set specific key-value under current session
        // NOTICE: current session won't change here (for SessionCtx)
        let next = get_cur_session().with_value(key2, v2);
        let val2 = get(&get_cur_session(), key2);
        match kind {
            Kind::Ctx => assert_eq!(val2, None),     // val2 == nil
            Kind::Map => assert_eq!(val2, Some(v2)), // the map is shared
        }
        before.push(format!(
            "g1: next = current.with_value(\"c\", \"d\"); the current session is still start: c = {val2:?} ({})",
            kind.describe()
        ));

        // pass both parent session and new session to sub goroutine
        let (sig_g2, sig2_g2) = (sig_g1.clone(), sig2_g1.clone());
        let g2 = go_session(next.clone(), move || {
            // read specific key under current session
            let (a, c) = (get(&get_cur_session(), key), get(&get_cur_session(), key2));
            assert_eq!(a, Some(v)); // val exists
            assert_eq!(c, Some(v2)); // val2 exists
            send(&sig2_g2, 2, format!("g2: go_session(next) carried next into the new thread: a = {a:?}, c = {c:?}"));

            sig_g2.wait();
            let valid = get_cur_session().is_valid();
            assert!(!valid); // current session is invalid

            send(
                &sig2_g2,
                2,
                format!(
                    "g2 done: its session (next) is_valid() = {valid}, because next derives from the disabled session"
                ),
            );
        });

        let (sig_g3, sig2_g3) = (sig_g1.clone(), sig2_g1.clone());
        let g3 = go(move || {
            // read specific key under current session
            let (a, c) = (get(&get_cur_session(), key), get(&get_cur_session(), key2));
            assert_eq!(a, Some(v)); // val exists
            match kind {
                Kind::Ctx => assert_eq!(c, None), // val2 == nil
                Kind::Map => assert_eq!(c, Some(v2)),
            }
            send(
                &sig2_g3,
                3,
                format!(
                    "g3: go() carried g1's current session (still start) into the new thread: a = {a:?}, c = {c:?}"
                ),
            );

            sig_g3.wait();
            let valid = get_cur_session().is_valid();
            assert!(!valid); // current session is invalid

            send(
                &sig2_g3,
                3,
                format!(
                    "g3 done: its session (start) is_valid() = {valid}, because start derives from the disabled session"
                ),
            );
        });

        bind(next.clone()).unwrap();
        let val2 = get(&get_cur_session(), key2); // val2 exists
        assert_eq!(val2, Some(v2));
        before.push(format!("g1: bound next on its own thread: c = {val2:?}"));
        sig2_g1.send((1, before)).expect("g0 is waiting");

        sig_g1.wait();
        let valid = next.is_valid();
        assert!(!valid); // next is invalid

        send(
            &sig2_g1,
            1,
            format!("g1 done: next.is_valid() = {valid}, because next derives from the disabled session"),
        );
        // Join the children in order, so that g0's join of g1 waits for all three threads.
        g2.join().expect("g2 panicked");
        g3.join().expect("g3 panicked");
    });

    print_in_order(&sig2_rx, &mut println);

    let val2 = get(&get_cur_session(), key2);
    match kind {
        Kind::Ctx => assert_eq!(val2, None), // val2 == nil
        Kind::Map => assert_eq!(val2, Some(v2)),
    }
    println(&format!(
        "g0: the main thread's session is still start: c = {val2:?} ({})",
        match kind {
            Kind::Ctx => "g1's with_value and bind changed nothing here",
            Kind::Map => "the map is shared, so g1's with_value is visible here",
        }
    ));

    // initiatively ends the session,
    // then all the inherited session (including next) will be disabled
    session.disable();
    sig.open();

    let valid = start.is_valid();
    assert!(!valid); // start is invalid
    println(&format!("g0: session.disable(); start, derived from it, is_valid() = {valid}; g0 releases the threads"));

    print_in_order(&sig2_rx, &mut println);
    g1.join().expect("g1 panicked");
    println("g0 done: every thread saw the disabled session as invalid, and all three have ended");

    unbind();
}

/// One thread's report of one line.
fn send(tx: &SyncSender<Report>, from: u8, line: String) {
    tx.send((from, vec![line])).expect("g0 is waiting");
}

/// Receives the reports of g1, g2 and g3 (Go's three `<-sig2`) and prints them in thread order.
fn print_in_order(rx: &Receiver<Report>, println: &mut impl FnMut(&str)) {
    let mut reports: Vec<Report> = (0..3).map(|_| rx.recv().expect("a goroutine exited before signalling")).collect();
    reports.sort_by_key(|(from, _)| *from);
    for line in reports.iter().flat_map(|(_, lines)| lines) {
        println(line);
    }
}
