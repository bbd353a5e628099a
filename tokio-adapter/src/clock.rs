//! Deadlines on tokio's timer: [`TokioClock`].
//!
//! `now()` is tokio's `time::Instant` (so paused time in tests moves deadlines too). When the
//! core asks for a deadline to be fired, the clock spawns one small task on the current runtime
//! that sleeps until the deadline — racing the scope's own `done()`, so a scope cancelled early
//! releases its task and memory right away. Outside a runtime it falls back to the std timer
//! thread.

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
                drop(handle.spawn(async move {
                    let settled = expiry.settled();
                    tokio::select! {
                        () = tokio::time::sleep_until(origin + at) => expiry.fire(),
                        () = settled => {}
                    }
                }));
            }
            Err(_) => {
                // No runtime here: let the std timer thread fire it at the same wall time.
                let std_at = (std_origin + at).saturating_duration_since(std::time::Instant::now());
                let std_deadline = localsession_std::STD_CLOCK.after(std_at);
                localsession_std::STD_CLOCK.schedule(std_deadline.since_origin(), expiry);
            }
        }
    }
}
