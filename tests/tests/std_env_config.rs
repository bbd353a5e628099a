//! `CLOUDWEGO_SESSION_CONFIG_KEY` (Go's variable and format, Kitex's guide: `true,10,1h`)
//! overrides the options given to `init_default_manager` — and to `reset_default_manager`.
//!
//! Global state: the environment and the default manager; one test in this file.
#![allow(missing_docs)]

use std::time::Duration;

use localsession_core::config::ENV_KEY;
use localsession_std::{
    ManagerOptions, ShardedManager, default_manager_options, init_default_manager, manager_options,
    reset_default_manager,
};

#[test]
fn the_environment_variable_overrides_the_options() {
    // SAFETY: single-threaded at this point: this file has one test and it has not spawned any
    // thread yet, so nothing reads or writes the environment concurrently.
    unsafe { std::env::set_var(ENV_KEY, "true,10,1h") };

    let expected =
        ManagerOptions { implicit_transmit: true, shard_number: 10, gc_interval: Some(Duration::from_secs(3600)) };
    init_default_manager(default_manager_options()).expect("a valid variable");
    assert_eq!(manager_options(), Some(expected));
    // What the default options feed into.
    let sharded = ShardedManager::from_default_options().unwrap();
    assert_eq!(sharded.store().options(), &expected);
    assert_eq!(sharded.store().shard_lens().len(), 10);
    drop(sharded);

    // A reset reads the variable again: it still wins over the options passed in.
    let passed = ManagerOptions { implicit_transmit: false, shard_number: 3, gc_interval: None };
    reset_default_manager(passed).unwrap();
    assert_eq!(manager_options(), Some(expected));

    // Field by field: empty fields keep the options passed in.
    // SAFETY: as above; no thread of this test is alive (the GC thread of `sharded` was joined
    // by its drop, and the std clock's timer thread never started: no deadline was used).
    unsafe { std::env::set_var(ENV_KEY, ",25") };
    reset_default_manager(passed).unwrap();
    assert_eq!(manager_options(), Some(ManagerOptions { shard_number: 25, ..passed }));
    // SAFETY: as above.
    unsafe { std::env::set_var(ENV_KEY, " false , , 90s ") };
    reset_default_manager(passed).unwrap();
    assert_eq!(manager_options(), Some(ManagerOptions { gc_interval: Some(Duration::from_secs(90)), ..passed }));
}
