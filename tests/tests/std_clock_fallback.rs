//! A std program that never calls an init function still has a clock once it uses the std
//! adapter: `with_timeout` works (no `NoClockError`), timers fire; and an adapter's init can
//! still register its own clock afterwards. Its own process: the clock slots are process-wide.
#![allow(missing_docs)]

use std::sync::mpsc;
use std::time::Duration;

use localsession_core::{Clock, Context, SessionCtx, SessionMap, global_clock, registered_clock};
use localsession_std::{InitError, STD_CLOCK, bind, register_adapter_clock, unbind};

struct Other;
impl Clock for Other {
    fn now(&self) -> Duration {
        Duration::from_secs(1)
    }
}
static OTHER: Other = Other;

#[test]
fn using_the_std_adapter_provides_a_clock_that_an_init_can_still_replace() {
    // Nothing used yet: the core has no clock (this is what a core-only program sees).
    assert!(global_clock().is_none());
    assert!(SessionMap::with_timeout(Duration::from_secs(1)).is_err());

    // The first use of the std adapter offers its clock.
    bind(SessionCtx::new(&Context::background())).unwrap();
    unbind();
    let clock = global_clock().expect("the std adapter's clock after its first bind");
    assert!(std::ptr::addr_eq(clock as *const dyn Clock, &STD_CLOCK as *const dyn Clock));
    assert!(registered_clock().is_none(), "offered as the fallback, not registered");

    let map = SessionMap::with_timeout(Duration::from_secs(60)).expect("no NoClockError in a std program");
    assert!(map.is_valid());
    let (ctx, _cancel) = Context::background().with_timeout(Duration::from_millis(20)).expect("a clock");
    let (tx, rx) = mpsc::channel();
    let _h = ctx.after_cancel(move || tx.send(()).unwrap());
    rx.recv_timeout(Duration::from_secs(10)).expect("the std timer fires the deadline");
    assert!(ctx.err().unwrap().is_deadline_exceeded());

    // An adapter's init still registers its own clock, which then wins.
    assert_eq!(register_adapter_clock(&OTHER), Ok(()));
    assert_eq!(global_clock().unwrap().now(), Duration::from_secs(1));
    assert_eq!(register_adapter_clock(&STD_CLOCK), Err(InitError::ForeignClock));
}
