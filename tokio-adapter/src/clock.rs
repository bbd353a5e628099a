//! Deadlines on tokio's timer: [`TokioClock`].
//!
//! `now()` is tokio's `time::Instant` (so paused time in tests moves deadlines too). When the
//! core asks for a deadline to be fired, the clock spawns one small task on the current runtime
//! that sleeps until the deadline — racing the scope's own `done()`, so a scope cancelled early
//! releases its task and memory right away. Outside a runtime it falls back to the std timer
//! thread — and so does a deadline whose task is dropped before it fired: the runtime shut
//! down (its tasks are dropped), or it was built without `enable_time` (`sleep_until` panics in
//! the task). A deadline is never lost: a `done()` parked on another thread or runtime is
//! still woken, and `after_cancel` callbacks still run.

use std::sync::OnceLock;
use std::time::Duration;

use localsession_core::{Clock, Expiry, Instant};
use tokio::time::Instant as TokioInstant;

/// The tokio clock (register it with [`init`](crate::init)).
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use localsession_core::{Context, Instant};
/// use localsession_tokio::TOKIO_CLOCK;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let (ctx, _cancel) = Context::background().with_deadline(Instant::now(&TOKIO_CLOCK) + Duration::from_secs(30));
/// ctx.done().await; // paused time: auto-advances to the deadline
/// assert!(ctx.err().unwrap().is_deadline_exceeded());
/// # }
/// ```
#[derive(Debug)]
pub struct TokioClock {
    origin: OnceLock<(TokioInstant, std::time::Instant)>,
}

/// The one [`TokioClock`].
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use localsession_core::Instant;
/// use localsession_tokio::TOKIO_CLOCK;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let start = Instant::now(&TOKIO_CLOCK);
/// tokio::time::sleep(Duration::from_secs(60)).await; // paused time: returns at once
/// // `now()` is tokio's time, so paused and advanced time moves deadlines too.
/// assert!(Instant::now(&TOKIO_CLOCK).saturating_duration_since(start) >= Duration::from_secs(60));
/// # }
/// ```
pub static TOKIO_CLOCK: TokioClock = TokioClock { origin: OnceLock::new() };

impl TokioClock {
    fn origin(&self) -> (TokioInstant, std::time::Instant) {
        *self.origin.get_or_init(|| (TokioInstant::now(), std::time::Instant::now()))
    }

    /// The core [`Instant`] `d` from now.
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert!(!localsession_tokio::TOKIO_CLOCK.after(Duration::from_secs(5)).has_passed());
    /// # }
    /// ```
    #[must_use]
    pub fn after(&'static self, d: Duration) -> Instant {
        Instant::now(self) + d
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        TokioInstant::now().saturating_duration_since(self.origin().0)
    }

    fn schedule(&self, at: Duration, expiry: Expiry) {
        let (origin, std_origin) = self.origin();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let mut pending = Pending { expiry: Some(expiry), std_at: std_origin + at };
                drop(handle.spawn(async move {
                    let Some(settled) = pending.expiry.as_ref().map(Expiry::settled) else { return };
                    tokio::select! {
                        () = tokio::time::sleep_until(origin + at) => {
                            if let Some(expiry) = pending.expiry.take() {
                                expiry.fire();
                            }
                        }
                        // Settled (cancelled, or fired elsewhere): `Pending` drops it.
                        () = settled => {}
                    }
                }));
            }
            // No runtime here: let the std timer thread fire it at the same wall time.
            Err(_) => fire_on_std_timer(std_origin + at, expiry),
        }
    }
}

/// Hands `expiry` to the std timer thread, to fire at the wall time `at`.
fn fire_on_std_timer(at: std::time::Instant, expiry: Expiry) {
    let std_deadline = localsession_std::STD_CLOCK.after(at.saturating_duration_since(std::time::Instant::now()));
    localsession_std::STD_CLOCK.schedule(std_deadline.since_origin(), expiry);
}

/// The expiry a timer task holds. Dropped with it unfired and unsettled — the runtime shut down
/// and dropped the task, a spawn onto a runtime that is shutting down, `sleep_until` panicking on
/// a runtime without timers — it goes to the std timer thread, which fires it at the same wall
/// time (at once if that has passed). Without this a parked `done()` elsewhere would wait
/// forever: the core arms a scope's timer once.
struct Pending {
    expiry: Option<Expiry>,
    std_at: std::time::Instant,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(expiry) = self.expiry.take()
            && !expiry.is_settled()
        {
            fire_on_std_timer(self.std_at, expiry);
        }
    }
}
