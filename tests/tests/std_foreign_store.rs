//! Another store registered as the process-wide default first: `init_default_manager` (and
//! `reset_default_manager`) report `InitError::ForeignStore` — every time, the manager is not
//! left half-initialized — while the std free functions keep acting on the thread-local store,
//! and the core's accessors on the foreign one.
//!
//! Global state: the process-wide store; one test in this file.
#![allow(missing_docs)]

use localsession_core::{ContextStore, SingleSlotStore, set_global_store};
use localsession_std::{
    AnySession, Context, InitError, SessionCtx, bind, current, default_manager_options, go, init_default_manager,
    manager_options, reset_default_manager, scope, unbind,
};

static FOREIGN: SingleSlotStore = SingleSlotStore::new();

#[test]
fn a_foreign_global_store_is_reported_and_std_functions_stay_thread_local() {
    // SAFETY: single-threaded at this point: this file has one test and it has not spawned any
    // thread yet, so nothing reads or writes the environment concurrently.
    unsafe { std::env::remove_var(localsession_core::config::ENV_KEY) };
    set_global_store(&FOREIGN).expect("nothing registered yet");

    assert_eq!(init_default_manager(default_manager_options()), Err(InitError::ForeignStore));
    // The failed init rolled back: a second try reports the same conflict, not "already
    // initialized", and there are no options.
    assert_eq!(init_default_manager(default_manager_options()), Err(InitError::ForeignStore));
    assert_eq!(reset_default_manager(default_manager_options()), Err(InitError::ForeignStore));
    assert!(manager_options().is_none());
    let shown = InitError::ForeignStore.to_string();
    assert!(shown.contains("another context store"), "{shown}");

    // The std functions act on the thread-local store...
    let mine = AnySession::from(SessionCtx::new(&Context::background()).with_value("who", "std"));
    bind(mine.clone()).unwrap();
    assert!(current().is_some_and(|c| c.ptr_eq(&mine)));
    assert_eq!(go(|| current().and_then(|c| c.value_cloned::<&str, _>(&"who"))).join().unwrap(), Some("std"));
    // ...and the core's accessors on the registered (foreign) store, which stays empty.
    assert!(localsession_core::current().is_none(), "the foreign store holds nothing");
    FOREIGN.with_current(&mut |s| assert!(s.is_none()));
    let theirs = AnySession::from(SessionCtx::new(&Context::background()).with_value("who", "foreign"));
    localsession_core::bind(theirs.clone()).expect("the foreign store accepts binds");
    assert!(localsession_core::current().is_some_and(|c| c.ptr_eq(&theirs)));
    assert!(current().is_some_and(|c| c.ptr_eq(&mine)), "a core bind does not reach the thread store");
    // The backup functions go through the registered store, too.
    assert!(localsession_core::backed_up_ctx().is_some_and(|c| c.value::<&str, _>(&"who") == Some(&"foreign")));

    // Scoped forms of the std crate: the thread store as well.
    assert_eq!(
        scope(SessionCtx::new(&Context::background()).with_value("who", "scoped"), || {
            (
                current().and_then(|c| c.value_cloned::<&str, _>(&"who")),
                localsession_core::current().is_some_and(|c| c.ptr_eq(&theirs)),
            )
        }),
        (Some("scoped"), true)
    );
    assert!(current().is_some_and(|c| c.ptr_eq(&mine)));

    assert!(unbind().is_some_and(|c| c.ptr_eq(&mine)));
    assert!(localsession_core::unbind().is_some_and(|c| c.ptr_eq(&theirs)));
    assert!(current().is_none() && localsession_core::current().is_none());
}
