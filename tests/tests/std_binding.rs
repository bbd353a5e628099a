//! Thread-local binding semantics of `localsession-std`: `bind`/`current`/`unbind`/`with_current`
//! from deep call stacks, the scoped forms (`enter`, `scope`) under panics, `go`/`go_session`/
//! `Builder`/`ScopeExt` inheritance, Go's "a disabled session stays bound", re-binding while a
//! borrow is out, isolation between threads, and the core's global accessor.
//!
//! Nothing here initializes the default manager; the first `bind` registers the thread store as
//! the process-wide default (checked by `core_current_sees_the_std_binding`). Every test runs on
//! its own thread and leaves it unbound.
#![allow(missing_docs)]

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};

use common::DropWatch;
use localsession_std::{
    AnySession, Builder, Context, Key, ScopeExt, SessionCtx, SessionMap, bind, current, enter, go, go_session, scope,
    unbind, with_current,
};

static USER: Key<u64> = Key::new("user");

fn session_for(user: u64) -> SessionCtx {
    SessionCtx::new(&Context::background()).with(&USER, user)
}

fn as_any(s: &SessionCtx) -> AnySession {
    AnySession::from(s.clone())
}

/// The current user, read by a callee that takes no context parameter.
fn current_user() -> Option<u64> {
    current().and_then(|s| s.get_cloned(&USER))
}

/// The same through the borrowing accessor (no clone of the session).
fn current_user_borrowed() -> Option<u64> {
    with_current(|s| s.and_then(|s| s.read_key(&USER, |u| u.copied())))
}

#[inline(never)]
fn handler_level_1() -> (Option<u64>, Option<u64>, Option<u64>) {
    handler_level_2()
}
#[inline(never)]
fn handler_level_2() -> (Option<u64>, Option<u64>, Option<u64>) {
    handler_level_3()
}
#[inline(never)]
fn handler_level_3() -> (Option<u64>, Option<u64>, Option<u64>) {
    handler_level_4()
}
#[inline(never)]
fn handler_level_4() -> (Option<u64>, Option<u64>, Option<u64>) {
    // The core's accessor goes through the registered global store: the same thread slot.
    let via_core = localsession_core::current().and_then(|s| s.get_cloned(&USER));
    (current_user(), current_user_borrowed(), via_core)
}

#[test]
fn deep_callees_read_the_bound_session_without_a_parameter() {
    assert_eq!(handler_level_1(), (None, None, None));

    let s = session_for(7);
    bind(s.clone()).unwrap();
    assert_eq!(handler_level_1(), (Some(7), Some(7), Some(7)));

    // Re-binding replaces the session for every callee.
    bind(session_for(8)).unwrap();
    assert_eq!(handler_level_1(), (Some(8), Some(8), Some(8)));

    let unbound = unbind().expect("a session was bound");
    assert_eq!(unbound.get_cloned(&USER), Some(8), "unbind returns the bound session");
    assert_eq!(handler_level_1(), (None, None, None));
    assert!(unbind().is_none(), "a second unbind finds nothing");
}

#[test]
fn bind_releases_the_replaced_session_and_unbind_hands_it_back() {
    let watch = DropWatch::new();
    bind(SessionCtx::new(&Context::background()).with_value("probe", watch.probe())).unwrap();
    assert_eq!(watch.drops(), 0);
    // The slot held the only handle: replacing it releases the old session.
    bind(session_for(1)).unwrap();
    assert_eq!(watch.drops(), 1, "the replaced session must be released by bind");

    let watch2 = DropWatch::new();
    bind(SessionCtx::new(&Context::background()).with_value("probe", watch2.probe())).unwrap();
    let taken = unbind().expect("bound");
    assert_eq!(watch2.drops(), 0, "unbind hands the session back, it does not drop it");
    drop(taken);
    assert_eq!(watch2.drops(), 1);
    assert!(current().is_none());
}

#[test]
fn enter_guard_restores_the_previous_binding_on_drop_and_on_panic() {
    let outer = session_for(1);
    bind(outer.clone()).unwrap();
    {
        let _guard = enter(session_for(2));
        assert_eq!(current_user(), Some(2));
        {
            let _inner = enter(session_for(3));
            assert_eq!(current_user(), Some(3));
        }
        assert_eq!(current_user(), Some(2), "inner guard restores the middle binding");
    }
    assert_eq!(current_user(), Some(1));
    assert!(current().unwrap().ptr_eq(&as_any(&outer)), "the very same session comes back");

    // A panic unwinding through the guard restores the previous binding too.
    let watch = DropWatch::new();
    let entered = SessionCtx::new(&Context::background()).with(&USER, 4).with_value("probe", watch.probe());
    let result = catch_unwind(AssertUnwindSafe(|| {
        let _guard = enter(entered);
        assert_eq!(current_user(), Some(4));
        panic!("boom inside enter");
    }));
    assert!(result.is_err());
    assert_eq!(current_user(), Some(1), "the guard restored the outer binding during unwinding");
    assert_eq!(watch.drops(), 1, "the entered session was released by the guard");
    assert!(watch.dropped_while_panicking(), "released while unwinding, not later");

    // Entering with nothing bound restores "nothing".
    unbind();
    {
        let _guard = enter(session_for(5));
        assert_eq!(current_user(), Some(5));
    }
    assert!(current().is_none());
}

#[test]
fn nested_scopes_restore_in_order_also_when_a_panic_unwinds_through_them() {
    let seen = scope(session_for(1), || {
        let mut seen = vec![current_user()];
        seen.push(scope(session_for(2), || {
            let inner = scope(session_for(3), current_user);
            assert_eq!(inner, Some(3));
            current_user()
        }));
        seen.push(current_user());
        seen
    });
    assert_eq!(seen, vec![Some(1), Some(2), Some(1)]);
    assert!(current().is_none());

    // A panic two scopes deep: both scopes restore on the way out.
    let outer = scope(session_for(10), || {
        let r = catch_unwind(|| {
            scope(session_for(11), || {
                scope(session_for(12), || -> () {
                    assert_eq!(current_user(), Some(12));
                    panic!("boom inside nested scopes");
                })
            })
        });
        assert!(r.is_err());
        current_user()
    });
    assert_eq!(outer, Some(10), "both inner scopes were unwound and the outer binding restored");
    assert!(current().is_none());

    // `scope` returns the closure's value and works with any session kind.
    let map = SessionMap::new().with_value("k", 5u8);
    assert_eq!(scope(map, || current().and_then(|s| s.value_cloned::<u8, _>(&"k"))), Some(5));
}

#[test]
fn a_panic_in_go_reaches_join_and_the_binding_is_released_during_unwinding() {
    let watch = DropWatch::new();
    let s = SessionCtx::new(&Context::background()).with(&USER, 9).with_value("probe", watch.probe());
    // The only handle moves into the thread.
    let handle = go_session(s, || {
        assert_eq!(current_user(), Some(9));
        panic!("boom inside go");
    });
    let err = handle.join().expect_err("the panic reaches join()");
    assert_eq!(err.downcast_ref::<&str>().copied(), Some("boom inside go"));
    assert_eq!(watch.drops(), 1, "the panicking thread's session is released");
    // The thread's binding was removed by go()'s guard while unwinding — not left in the slot
    // for thread-local teardown (a pool thread would otherwise keep the request's session).
    assert!(watch.dropped_while_panicking(), "the binding must be removed during unwinding");

    // Same through `go` (inherited session): the caller keeps its binding, the child's is gone.
    let watch2 = DropWatch::new();
    let inherited = SessionCtx::new(&Context::background()).with(&USER, 10).with_value("probe", watch2.probe());
    bind(inherited).unwrap();
    let err = go(|| {
        assert_eq!(current_user(), Some(10));
        panic!("boom inside inherited go");
    })
    .join();
    assert!(err.is_err());
    assert_eq!(current_user(), Some(10), "the parent's binding is untouched");
    assert_eq!(watch2.drops(), 0, "the parent still holds it");
    unbind();
    assert_eq!(watch2.drops(), 1, "the child released its handle: the parent's was the last");
}

#[test]
fn go_unbinds_even_what_the_child_bound_itself() {
    let watch = DropWatch::new();
    let probe = watch.probe();
    let (tx, rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let h = go(move || {
        bind(SessionCtx::new(&Context::background()).with_value("probe", probe)).unwrap();
        tx.send(()).unwrap();
        // Keep the thread alive until the test lets it end.
        done_rx.recv().unwrap();
    });
    rx.recv().unwrap();
    assert_eq!(watch.drops(), 0);
    done_tx.send(()).unwrap();
    h.join().unwrap();
    assert_eq!(watch.drops(), 1, "the child's own binding ends with it (Go: the goroutine's binding ends)");
}

#[test]
fn go_inherits_go_session_and_builder_choose_the_session() {
    let parent = session_for(1);
    bind(parent.clone()).unwrap();

    // go: the caller's session, the very same one.
    let same = go({
        let parent = as_any(&parent);
        move || current().is_some_and(|s| s.ptr_eq(&parent))
    });
    assert!(same.join().unwrap(), "go() hands the caller's own session to the child");

    // The child's re-binding stays in the child.
    go(|| {
        bind(session_for(99)).unwrap();
        assert_eq!(current_user(), Some(99));
    })
    .join()
    .unwrap();
    assert_eq!(current_user(), Some(1), "a child's bind never reaches the parent");

    // go_session: the given session, not the caller's.
    assert_eq!(go_session(session_for(2), current_user).join().unwrap(), Some(2));

    // Builder: inherit by default, a given session, or none.
    let b = Builder::new().name("inherit".into()).spawn(current_user).unwrap();
    assert_eq!(b.join().unwrap(), Some(1));
    let b = Builder::new().session(session_for(3)).spawn(current_user).unwrap();
    assert_eq!(b.join().unwrap(), Some(3));
    let b = Builder::new().no_session().spawn(|| current().is_none()).unwrap();
    assert!(b.join().unwrap(), "Builder::no_session starts the thread with nothing bound");
    let b = Builder::default().stack_size(128 * 1024).spawn(current_user).unwrap();
    assert_eq!(b.join().unwrap(), Some(1));

    // Nothing bound in the caller: the child gets nothing.
    unbind();
    assert!(go(|| current().is_none()).join().unwrap());
    // A session given to a thread spawned with nothing bound is still visible there.
    assert_eq!(go_session(session_for(4), || go(current_user).join().unwrap()).join().unwrap(), Some(4));
}

#[test]
fn scoped_threads_inherit_or_get_the_given_session() {
    let parent = session_for(1);
    bind(parent.clone()).unwrap();
    let borrowed_local = String::from("stack data");
    let (a, b, c, d) = std::thread::scope(|sc| {
        let a = sc.go(|| (current_user(), borrowed_local.len()));
        let b = sc.go_session(session_for(2), current_user);
        let c = Builder::new().no_session().spawn_scoped(sc, current_user).unwrap();
        let d = Builder::new().session(SessionMap::new().with(&USER, 3)).spawn_scoped(sc, current_user).unwrap();
        (a.join().unwrap(), b.join().unwrap(), c.join().unwrap(), d.join().unwrap())
    });
    assert_eq!(a, (Some(1), borrowed_local.len()));
    assert_eq!(b, Some(2));
    assert_eq!(c, None);
    assert_eq!(d, Some(3));
    assert_eq!(current_user(), Some(1), "scoped children leave the parent's binding alone");
    unbind();
}

#[test]
fn a_disabled_session_stays_visible_until_unbound() {
    let s = session_for(1);
    let derived = s.with_value("more", 1u8);
    bind(derived.clone()).unwrap();
    assert!(current().unwrap().is_valid());
    assert!(s.disable(), "first disable");
    // Go parity: still bound and readable, but invalid.
    let cur = current().expect("a disabled session stays bound");
    assert!(cur.ptr_eq(&as_any(&derived)));
    assert!(!cur.is_valid());
    assert_eq!(cur.get_cloned(&USER), Some(1), "values stay readable");
    assert!(with_current(|c| c.is_some_and(|c| !c.is_valid())));
    // The backup API only recovers from a *valid* session.
    assert!(localsession_core::backed_up_ctx().is_none());
    unbind();
    assert!(current().is_none());

    // A disabled SessionMap: the same.
    let m = SessionMap::new().with_value("k", 1u8);
    bind(m.clone()).unwrap();
    m.disable();
    assert!(current().is_some_and(|c| !c.is_valid() && c.value_cloned::<u8, _>(&"k") == Some(1)));
    unbind();
}

#[test]
fn binding_inside_with_current_keeps_the_borrowed_view_alive() {
    let watch = DropWatch::new();
    // The slot holds the only handle of the old session.
    bind(SessionCtx::new(&Context::background()).with(&USER, 1).with_value("probe", watch.probe())).unwrap();
    let seen = with_current(|old| {
        let old = old.expect("bound");
        bind(session_for(2)).unwrap();
        // The slot changed, the borrow did not.
        assert_eq!(current_user(), Some(2));
        assert_eq!(old.get_cloned(&USER), Some(1), "the borrowed view still reads the old values");
        unbind();
        assert!(current().is_none());
        bind(session_for(3)).unwrap();
        // Nested borrow while the outer one is out, and a replace inside it.
        let nested = with_current(|mid| {
            bind(session_for(4)).unwrap();
            mid.and_then(|m| m.get_cloned(&USER))
        });
        assert_eq!(nested, Some(3));
        assert_eq!(watch.drops(), 0, "the old session is kept alive while borrowed");
        old.read_key(&USER, |u| u.copied())
    });
    assert_eq!(seen, Some(1));
    assert_eq!(watch.drops(), 1, "released once the last borrow returned");
    assert_eq!(current_user(), Some(4));
    unbind();
}

#[test]
fn values_of_one_thread_never_show_in_another() {
    let barrier = Arc::new(Barrier::new(2));
    let a = {
        let barrier = Arc::clone(&barrier);
        std::thread::spawn(move || {
            bind(session_for(1)).unwrap();
            barrier.wait(); // A is bound
            barrier.wait(); // B has looked
            let mine = current_user();
            unbind();
            mine
        })
    };
    let b = {
        let barrier = Arc::clone(&barrier);
        std::thread::spawn(move || {
            barrier.wait(); // A is bound
            let seen = (current().is_none(), localsession_core::current().is_none());
            // B binds its own; A's must not change.
            bind(session_for(2)).unwrap();
            let mine = current_user();
            barrier.wait();
            unbind();
            (seen, mine)
        })
    };
    assert_eq!(a.join().unwrap(), Some(1), "B's bind did not reach A");
    assert_eq!(b.join().unwrap(), ((true, true), Some(2)), "B sees nothing of A's binding");
    // Nor does the test thread.
    assert!(current().is_none());
}

#[test]
fn core_current_sees_the_std_binding() {
    let s = session_for(5);
    bind(s.clone()).unwrap();
    // `bind` registered the thread store as the process-wide default (no init in this file).
    let store = localsession_core::global_store().expect("bind registers the thread store");
    assert!(
        std::ptr::addr_eq(store as *const dyn localsession_core::ContextStore, &localsession_std::THREAD_STORE),
        "the registered store is the std thread store"
    );
    let via_core = localsession_core::current().expect("the core sees the binding");
    assert!(via_core.ptr_eq(&as_any(&s)));
    // And the other way round: the core's unbind acts on the same slot.
    let taken = localsession_core::unbind().expect("bound");
    assert!(taken.ptr_eq(&as_any(&s)));
    assert!(current().is_none());
    // The core's scope too.
    assert_eq!(localsession_core::scope(session_for(6), current_user), Some(6));
    assert!(current().is_none());
}

/// One binding API: the std crate's `bind`, `unbind`, `current`, `with_current`, `enter`,
/// `scope` and `backup_ctx` have the core's signatures (each pair coerces to one function-pointer
/// type, so code can switch between them without edits) and act on the same store.
#[test]
fn the_std_and_core_binding_functions_are_one_api() {
    use localsession_core::BindError;
    type Bind = fn(SessionCtx) -> Result<(), BindError>;
    type Current = fn() -> Option<AnySession>;
    type Unbind = fn() -> Option<AnySession>;
    type Enter = fn(SessionCtx) -> localsession_std::EnterGuard;
    type Scope = fn(SessionCtx, fn() -> Option<u64>) -> Option<u64>;
    type WithCurrent = fn(fn(Option<&AnySession>) -> bool) -> bool;
    type Backup = fn(&Context);
    let binds: [Bind; 2] = [localsession_core::bind, localsession_std::bind];
    let currents: [Current; 2] = [localsession_core::current, localsession_std::current];
    let unbinds: [Unbind; 2] = [localsession_core::unbind, localsession_std::unbind];
    let enters: [Enter; 2] = [localsession_core::enter, localsession_std::enter];
    let scopes: [Scope; 2] = [localsession_core::scope, localsession_std::scope];
    let with_currents: [WithCurrent; 2] = [localsession_core::with_current, localsession_std::with_current];
    let backups: [Backup; 2] = [localsession_core::backup_ctx, localsession_std::backup_ctx];

    // Register the thread store (what any std function does first), then check every pairing:
    // what one function of a pair binds, each `current` sees and each `unbind` takes.
    localsession_std::bind(session_for(0)).unwrap();
    assert!(unbind().is_some());
    for (b, bind) in binds.iter().enumerate() {
        for current in currents {
            for unbind in unbinds {
                let s = session_for(10 + b as u64);
                bind(s.clone()).unwrap();
                assert!(current().is_some_and(|c| c.ptr_eq(&as_any(&s))), "bind #{b}");
                assert!(with_currents.iter().all(|w| w(|c| c.is_some())));
                assert!(unbind().is_some_and(|c| c.ptr_eq(&as_any(&s))));
                assert!(current().is_none());
            }
        }
    }
    for (e, enter) in enters.iter().enumerate() {
        {
            let _guard = enter(session_for(20 + e as u64));
            assert!(currents.iter().all(|c| c().and_then(|s| s.get_cloned(&USER)) == Some(20 + e as u64)));
        }
        assert!(currents.iter().all(|c| c().is_none()));
    }
    for scope in scopes {
        assert_eq!(scope(session_for(30), current_user), Some(30));
    }
    for backup in backups {
        backup(&Context::background());
        assert!(localsession_std::backed_up_ctx().is_some() && localsession_core::backed_up_ctx().is_some());
        localsession_std::clear_ctx();
        assert!(current().is_none());
    }
}

/// The one case where the std `bind` fails: the thread's storage is gone (a thread-local
/// destructor that binds, running after the store's slot was destroyed). The error names the
/// reason and hands the session back: nothing is dropped silently.
#[cfg(target_os = "linux")]
#[test]
fn a_bind_during_thread_teardown_returns_the_session() {
    struct BindsOnDrop(mpsc::Sender<Result<(), String>>);
    impl Drop for BindsOnDrop {
        fn drop(&mut self) {
            let s = session_for(77);
            let outcome = match bind(s.clone()) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let back = e.to_string();
                    let session = e.into_session().expect("the session comes back");
                    assert!(session.ptr_eq(&as_any(&s)));
                    Err(back)
                }
            };
            let _ = self.0.send(outcome);
        }
    }
    thread_local! {
        static LATE: std::cell::RefCell<Option<BindsOnDrop>> = const { std::cell::RefCell::new(None) };
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Registered first, so destroyed after the store's slot (destructors run in reverse
        // order of registration on Linux).
        LATE.with(|l| *l.borrow_mut() = Some(BindsOnDrop(tx)));
        bind(session_for(1)).unwrap();
    })
    .join()
    .unwrap();
    let outcome = rx.recv().expect("the destructor ran");
    let reason = outcome.expect_err("the store's slot was already destroyed");
    assert!(reason.contains("torn down"), "{reason}");
}
