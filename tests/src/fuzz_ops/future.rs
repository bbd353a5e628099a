//! [`WithSession`] futures, polled by hand with a counting waker.
//!
//! The inner future is a [`Probe`]: every poll checks that the store's current session is the
//! wrapper's, then does what the operation asks — stay pending, bind or unbind a session
//! inside (which must stick to the future), wake itself, complete, or panic (with
//! [`FuzzPanic`](super::FuzzPanic), caught). Its `Drop` checks the same, since the wrapper
//! drops the inner future inside its session too. After every poll and drop the store must
//! hold what it held before. Futures run on the global store (`with_session`,
//! `in_current_session`, `without_session`) or on `SLOT_STORE`, named through `dyn
//! ContextStore` (`WithSession::new_in`) or by its type (`WithSession::new_in_store`, chosen by
//! the kind byte's top bit).

use core::future::Future;
use core::pin::Pin;
use core::task::{Context as TaskContext, Poll};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::task::{Wake, Waker};

use localsession_core::{FutureExt, SingleSlotStore, WithSession};

use super::{
    AnySession, Arc, ContextStore, Entry, Interp, Ordering, catch_fuzz, fuzz_panic, pick, same_session, stores,
    with_current_in,
};

/// Futures kept at once.
const MAX_FUTURES: usize = 4;

/// What the next poll of a [`Probe`] does, and what it should see.
struct Ctl {
    store: &'static dyn ContextStore,
    /// The session the probe must see as current.
    expect: Option<AnySession>,
    action: u8,
    /// The session to bind inside the poll (action 1).
    bind: Option<AnySession>,
    /// Whether the drop saw the expected session.
    dropped_ok: Option<bool>,
}

impl Ctl {
    fn sees_expected(&self) -> bool {
        with_current_in(self.store, |cur| match (cur, &self.expect) {
            (None, None) => true,
            (Some(a), Some(b)) => a.ptr_eq(b),
            _ => false,
        })
    }
}

struct Probe {
    ctl: Rc<RefCell<Ctl>>,
}

impl Future for Probe {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let (action, bind, store) = {
            let ctl = self.ctl.borrow();
            assert!(ctl.sees_expected(), "inside WithSession::poll: another current session");
            (ctl.action, ctl.bind.clone(), ctl.store)
        };
        match action {
            1 => drop(store.replace(bind).expect("a single slot binds")),
            2 => drop(store.replace(None).expect("a single slot binds")),
            3 => return Poll::Ready(()),
            4 => fuzz_panic(),
            5 => cx.waker().wake_by_ref(),
            _ => {}
        }
        Poll::Pending
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let mut ctl = self.ctl.borrow_mut();
        ctl.dropped_ok = Some(ctl.sees_expected());
    }
}

/// Counts wake-ups.
struct CountWake(AtomicUsize);

impl Wake for CountWake {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A probe's wrapper, by the type its store is named by.
enum Fut {
    Dyn(Pin<Box<WithSession<Probe>>>),
    Typed(Pin<Box<WithSession<Probe, SingleSlotStore>>>),
}

impl Fut {
    fn session(&self) -> Option<&AnySession> {
        match self {
            Fut::Dyn(f) => f.session(),
            Fut::Typed(f) => f.session(),
        }
    }

    fn poll(&mut self, cx: &mut TaskContext<'_>) -> Poll<()> {
        match self {
            Fut::Dyn(f) => f.as_mut().poll(cx),
            Fut::Typed(f) => f.as_mut().poll(cx),
        }
    }
}

pub(super) struct FutEntry {
    fut: Fut,
    session: Option<Entry>,
    ctl: Rc<RefCell<Ctl>>,
    wakes: Arc<CountWake>,
}

impl Interp {
    pub(super) fn fut_new(&mut self, s: u8, kind: u8) {
        if self.futures.len() >= MAX_FUTURES {
            return;
        }
        let typed = kind & 0x80 != 0;
        let kind = kind % 5;
        let store = usize::from(kind >= 3);
        if store == 0 && !stores::global_ours() {
            return;
        }
        let entry = pick(s, self.sessions.len()).map(|i| self.sessions[i].clone());
        let ctl = Rc::new(RefCell::new(Ctl {
            store: stores::store(store),
            expect: None,
            action: 0,
            bind: None,
            dropped_ok: None,
        }));
        let probe = Probe { ctl: Rc::clone(&ctl) };
        let on_slot = |probe: Probe, session: Option<AnySession>| {
            if typed {
                Fut::Typed(Box::pin(WithSession::new_in_store(&stores::SLOT_STORE, probe, session)))
            } else {
                Fut::Dyn(Box::pin(WithSession::new_in(&stores::SLOT_STORE, probe, session)))
            }
        };
        let (fut, session) = match (kind, entry) {
            (0, Some(e)) => (Fut::Dyn(Box::pin(probe.with_session(e.real.clone()))), Some(e)),
            (1, _) => (Fut::Dyn(Box::pin(probe.in_current_session())), self.stores.current(0).cloned()),
            (2, _) => (Fut::Dyn(Box::pin(probe.without_session())), None),
            (3, Some(e)) => (on_slot(probe, Some(e.real.clone())), Some(e)),
            (4, _) => (on_slot(probe, None), None),
            // No session to wrap: nothing made (the probe's drop sees nothing to check).
            (_, None) => return,
            _ => unreachable!("kind < 5"),
        };
        same_session(fut.session(), session.as_ref(), "WithSession::session() when made");
        let wakes = Arc::new(CountWake(AtomicUsize::new(0)));
        self.futures.push(FutEntry { fut, session, ctl, wakes });
    }

    pub(super) fn fut_poll(&mut self, i: u8, action: u8, s: u8) {
        let Some(i) = pick(i, self.futures.len()) else { return };
        let action = action % 6;
        let bind = pick(s, self.sessions.len()).map(|j| self.sessions[j].clone());
        if action == 1 && bind.is_none() {
            return;
        }
        let f = &mut self.futures[i];
        {
            let mut ctl = f.ctl.borrow_mut();
            ctl.expect = f.session.as_ref().map(|e| e.real.clone());
            ctl.action = action;
            ctl.bind = bind.as_ref().map(|e| e.real.clone());
        }
        let waker = Waker::from(Arc::clone(&f.wakes));
        let wakes_before = f.wakes.0.load(Ordering::Relaxed);
        let polled = catch_fuzz(|| f.fut.poll(&mut TaskContext::from_waker(&waker)));
        match (action, polled) {
            (3, Ok(Poll::Ready(()))) => {
                let f = self.futures.swap_remove(i);
                assert_eq!(f.ctl.borrow().dropped_ok, Some(true), "the finished inner future dropped in its session");
                assert_eq!(f.fut.session().is_some(), f.session.is_some(), "session kept after completion");
            }
            (4, Err(())) => {}
            (3 | 4, r) => panic!("action {action}: poll gave {:?}", r.map(|p| p.is_ready())),
            (_, Ok(Poll::Pending)) => {
                match action {
                    1 => f.session = bind,
                    2 => f.session = None,
                    _ => {}
                }
                let woken = f.wakes.0.load(Ordering::Relaxed) - wakes_before;
                assert_eq!(woken, usize::from(action == 5), "wake-ups by poll action {action}");
            }
            (_, r) => panic!("action {action}: poll gave {:?}", r.map(|p| p.is_ready())),
        }
        if let Some(f) = self.futures.get(i).filter(|_| action != 3) {
            same_session(f.fut.session(), f.session.as_ref(), "WithSession::session() after a poll");
        }
        self.check_stores("after polling a WithSession");
    }

    pub(super) fn fut_drop(&mut self, i: u8) {
        let Some(i) = pick(i, self.futures.len()) else { return };
        let f = self.futures.swap_remove(i);
        drop_future(f);
        self.check_stores("after dropping a WithSession");
    }

    pub(super) fn finish_futures(&mut self) {
        while let Some(f) = self.futures.pop() {
            drop_future(f);
            self.check_stores("after dropping a WithSession at the end");
        }
    }
}

/// Drops an unfinished future: the inner future's drop must see the wrapper's session.
fn drop_future(f: FutEntry) {
    f.ctl.borrow_mut().expect = f.session.as_ref().map(|e| e.real.clone());
    let FutEntry { fut, ctl, .. } = f;
    drop(fut);
    assert_eq!(ctl.borrow().dropped_ok, Some(true), "the inner future dropped in its session");
}
