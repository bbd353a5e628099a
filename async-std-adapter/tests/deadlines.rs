//! Deadlines on async-io timers, after `init` registered the async-io clock (own process).
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant as StdInstant};

use localsession_core::{Context, ContextError, SessionCtx, SessionMap};

#[test]
fn timeouts_fire_on_async_io_timers() {
    localsession_async_std::init(localsession_std::default_manager_options()).unwrap();
    let s = SessionCtx::with_timeout(&Context::background(), Duration::from_millis(30)).unwrap();
    assert!(s.is_valid());
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let _handle = s.export().after_cancel(move || f.store(true, Ordering::SeqCst));
    async_std::task::block_on(s.done());
    assert_eq!(s.err(), Some(ContextError::DeadlineExceeded));
    let cap = StdInstant::now() + Duration::from_secs(10);
    while !fired.load(Ordering::SeqCst) {
        assert!(StdInstant::now() < cap, "after_cancel did not fire within 10 s of the deadline");
        std::thread::sleep(Duration::from_millis(5));
    }
    let map = SessionMap::with_timeout(Duration::from_millis(10)).unwrap();
    async_std::task::block_on(map.done());
    assert!(!map.is_valid());
}
