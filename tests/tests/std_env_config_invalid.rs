//! A malformed `CLOUDWEGO_SESSION_CONFIG_KEY` is an error naming the variable, the field and the
//! value (Go silently falls back to defaults), and leaves the default manager uninitialized, so
//! a later `init_default_manager` with a good environment succeeds. Each field is exercised end
//! to end: a failed init changes nothing, so one process serves every case in turn.
//!
//! Global state: the environment and the default manager; one test in this file.
#![allow(missing_docs)]

use std::time::Duration;

use localsession_core::config::{ConfigField, ENV_KEY};
use localsession_std::{
    Context, InitError, ManagerOptions, SessionCtx, bind, current, default_manager_options, init_default_manager,
    manager_options, reset_default_manager,
};

/// Sets the variable, runs `init_default_manager`, and returns the configuration error.
fn init_with_env(value: &str) -> localsession_core::ConfigError {
    // SAFETY: the only test of this file calls this before it spawns any thread, so nothing
    // reads or writes the environment concurrently.
    unsafe { std::env::set_var(ENV_KEY, value) };
    match init_default_manager(default_manager_options()) {
        Err(InitError::Env(e)) => e,
        other => panic!("{ENV_KEY}={value:?}: expected InitError::Env, got {other:?}"),
    }
}

#[track_caller]
fn check(value: &str, field: ConfigField, bad: &str, label: &str) {
    let e = init_with_env(value);
    assert_eq!(e.field(), field, "{value:?}");
    assert_eq!(e.value(), bad, "{value:?}");
    let shown = InitError::Env(e).to_string();
    for part in [ENV_KEY, label, &format!("{bad:?}")] {
        assert!(shown.contains(part), "{value:?}: the message {shown:?} should name {part:?}");
    }
    assert!(manager_options().is_none(), "{value:?}: the manager stays uninitialized");
}

#[test]
fn a_malformed_variable_is_a_clear_error_and_initializes_nothing() {
    // The first invalid field is reported: the implicit flag.
    check("tru,0,500ms", ConfigField::Implicit, "tru", "implicit");
    // Each field on its own.
    check(",0", ConfigField::Shards, "0", "shard number");
    check(",,500ms", ConfigField::GcInterval, "500ms", "GC interval");
    check("true,ten", ConfigField::Shards, "ten", "shard number");
    check(",,10x", ConfigField::GcInterval, "10x", "GC interval");
    check("true,10,1h,extra", ConfigField::Format, "true,10,1h,extra", "session config");
    // The GC interval's parse error is reachable through `source()`.
    let e = init_with_env(",,10x");
    assert!(std::error::Error::source(&e).is_some());
    assert!(std::error::Error::source(&InitError::Env(e)).is_some());

    // Nothing was registered either way: binding still works on the thread store.
    bind(SessionCtx::new(&Context::background())).unwrap();
    assert!(current().is_some());

    // With the variable removed, init succeeds (the failures did not leave it half-initialized).
    // SAFETY: as in `init_with_env`: still no other thread.
    unsafe { std::env::remove_var(ENV_KEY) };
    init_default_manager(default_manager_options()).expect("init after the variable is fixed");
    assert_eq!(manager_options(), Some(default_manager_options()));

    // A reset with a malformed variable fails too and changes nothing.
    // SAFETY: as above.
    unsafe { std::env::set_var(ENV_KEY, "yes") };
    let opts = ManagerOptions { shard_number: 2, gc_interval: Some(Duration::from_secs(2)), implicit_transmit: false };
    assert!(matches!(reset_default_manager(opts), Err(InitError::Env(e)) if e.field() == ConfigField::Implicit));
    assert_eq!(manager_options(), Some(default_manager_options()));
    assert!(current().is_some(), "a failed reset keeps the bindings");
}
