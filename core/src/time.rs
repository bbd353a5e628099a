//! Time for deadlines: a [`Clock`] the runtime adapters provide, and [`Instant`]s read from it.
//!
//! The core has no OS, so it cannot read time itself. A clock reports monotonic time since an
//! origin of its choosing and may offer a timer ([`Clock::schedule`]). Expiry is observed
//! lazily: [`Context::err`](crate::Context::err) and [`Context::is_done`](crate::Context::is_done)
//! compare the deadline with `now()`, so no thread or timer exists per context. Only when someone
//! waits — a [`Done`](crate::Done) future is polled or an
//! [`after_cancel`](crate::Context::after_cancel) callback is registered on a scope with a
//! deadline — is the clock asked, once per scope, to [`Expiry::fire`] at the deadline; adapters
//! implement that with their runtime's timer (the std adapter with one shared timer thread).
//!
//! One clock serves the process: register it with [`set_global_clock`]; `with_timeout` reads it.

use core::cmp::Ordering;
use core::fmt;
use core::time::Duration;

use crate::global::Global;
use crate::node::NodeRef;

/// A monotonic clock, and optionally a timer.
///
/// # Examples
/// A manual clock, as a test or a kernel with a tick counter would write it:
/// ```
/// use core::sync::atomic::{AtomicU64, Ordering};
/// use core::time::Duration;
/// use localsession_core::{Clock, Context, Instant};
///
/// struct Ticks(AtomicU64);
/// impl Clock for Ticks {
///     fn now(&self) -> Duration {
///         Duration::from_millis(self.0.load(Ordering::Relaxed))
///     }
/// }
/// static CLOCK: Ticks = Ticks(AtomicU64::new(0));
///
/// let deadline = Instant::now(&CLOCK) + Duration::from_millis(5);
/// let (ctx, _cancel) = Context::background().with_deadline(deadline);
/// assert!(!ctx.is_done());
/// CLOCK.0.store(5, Ordering::Relaxed);
/// assert!(ctx.is_done());
/// ```
pub trait Clock: Send + Sync + 'static {
    /// Monotonic time elapsed since this clock's origin.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::{Clock, Instant};
    /// struct Fixed;
    /// impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(10) } }
    /// static CLOCK: Fixed = Fixed;
    ///
    /// assert_eq!(CLOCK.now(), Duration::from_secs(10));
    /// assert_eq!(Instant::now(&CLOCK).since_origin(), CLOCK.now()); // what instants read
    /// ```
    fn now(&self) -> Duration;

    /// Arranges for `expiry.fire()` to be called at or after `at` (a time on this clock).
    ///
    /// The default implementation has no timer: it drops `expiry`, and expiry is then only
    /// observed lazily (by `err()`, `is_done()` and polls of `done()`), so `after_cancel`
    /// callbacks do not run at a deadline. Implementations must not call `expiry.fire()` from
    /// inside `schedule` itself; an already-passed deadline may be fired from the timer.
    ///
    /// # Examples
    /// ```
    /// use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    /// use core::time::Duration;
    /// use localsession_core::{Clock, Context, Instant};
    /// struct Ticks(AtomicU64); // no `schedule`: the default, no timer
    /// impl Clock for Ticks { fn now(&self) -> Duration { Duration::from_millis(self.0.load(Ordering::Relaxed)) } }
    /// static CLOCK: Ticks = Ticks(AtomicU64::new(0));
    /// static RAN: AtomicBool = AtomicBool::new(false);
    ///
    /// let deadline = Instant::from_clock_time(&CLOCK, Duration::from_millis(5));
    /// let (ctx, _cancel) = Context::background().with_deadline(deadline);
    /// let _handle = ctx.after_cancel(|| RAN.store(true, Ordering::SeqCst));
    /// CLOCK.0.store(10, Ordering::Relaxed);
    /// assert!(ctx.err().unwrap().is_deadline_exceeded()); // observed lazily...
    /// assert!(!RAN.load(Ordering::SeqCst)); // ...but nothing fired the callback
    /// ```
    fn schedule(&self, at: Duration, expiry: Expiry) {
        let _ = (at, expiry);
    }
}

/// A point in time on a [`Clock`].
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use localsession_core::{Clock, Instant};
///
/// struct Fixed;
/// impl Clock for Fixed {
///     fn now(&self) -> Duration { Duration::from_secs(10) }
/// }
/// static FIXED: Fixed = Fixed;
///
/// let now = Instant::now(&FIXED);
/// let later = now + Duration::from_secs(2);
/// assert!(later > now);
/// assert_eq!(later.saturating_duration_since(now), Duration::from_secs(2));
/// assert!(now.has_passed());
/// assert!(!later.has_passed());
/// ```
#[derive(Clone, Copy)]
pub struct Instant {
    at: Duration,
    clock: &'static dyn Clock,
}

impl Instant {
    /// The current time of `clock`.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::{Clock, Instant};
    /// struct Fixed;
    /// impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(10) } }
    /// static CLOCK: Fixed = Fixed;
    ///
    /// let now = Instant::now(&CLOCK);
    /// assert_eq!(now.since_origin(), Duration::from_secs(10));
    /// assert!(now.has_passed());
    /// ```
    #[must_use]
    pub fn now(clock: &'static dyn Clock) -> Instant {
        Instant { at: clock.now(), clock }
    }

    /// A given time on `clock`.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::{Clock, Instant};
    /// struct Fixed;
    /// impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(10) } }
    /// static CLOCK: Fixed = Fixed;
    ///
    /// let deadline = Instant::from_clock_time(&CLOCK, Duration::from_secs(12));
    /// assert_eq!(deadline.since_origin(), Duration::from_secs(12));
    /// assert_eq!(deadline.remaining(), Duration::from_secs(2));
    /// ```
    #[must_use]
    pub fn from_clock_time(clock: &'static dyn Clock, since_origin: Duration) -> Instant {
        Instant { at: since_origin, clock }
    }

    /// Time since the clock's origin.
    ///
    /// # Examples
    /// ```
    /// # use core::time::Duration;
    /// # use localsession_core::{Clock, Instant};
    /// # struct Fixed;
    /// # impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(10) } }
    /// # static CLOCK: Fixed = Fixed;
    /// // `CLOCK` always reads 10 s.
    /// let t = Instant::from_clock_time(&CLOCK, Duration::from_secs(3)) + Duration::from_millis(500);
    /// assert_eq!(t.since_origin(), Duration::from_millis(3_500));
    /// ```
    #[must_use]
    pub fn since_origin(&self) -> Duration {
        self.at
    }

    /// The clock this instant belongs to.
    ///
    /// # Examples
    /// ```
    /// # use core::time::Duration;
    /// # use localsession_core::{Clock, Instant};
    /// # struct Fixed;
    /// # impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(10) } }
    /// # static CLOCK: Fixed = Fixed;
    /// // `CLOCK` always reads 10 s.
    /// let deadline = Instant::from_clock_time(&CLOCK, Duration::from_secs(15));
    /// // "Now" on the deadline's own clock, with no global clock needed:
    /// let now = Instant::now(deadline.clock());
    /// assert_eq!(deadline.saturating_duration_since(now), Duration::from_secs(5));
    /// ```
    #[must_use]
    pub fn clock(&self) -> &'static dyn Clock {
        self.clock
    }

    /// Whether the clock has reached this instant.
    ///
    /// # Examples
    /// ```
    /// use core::sync::atomic::{AtomicU64, Ordering};
    /// use core::time::Duration;
    /// use localsession_core::{Clock, Instant};
    /// struct Ticks(AtomicU64);
    /// impl Clock for Ticks { fn now(&self) -> Duration { Duration::from_millis(self.0.load(Ordering::Relaxed)) } }
    /// static CLOCK: Ticks = Ticks(AtomicU64::new(0));
    ///
    /// let at = Instant::from_clock_time(&CLOCK, Duration::from_millis(5));
    /// assert!(!at.has_passed());
    /// CLOCK.0.store(5, Ordering::Relaxed);
    /// assert!(at.has_passed()); // reaching it counts
    /// ```
    #[must_use]
    pub fn has_passed(&self) -> bool {
        self.clock.now() >= self.at
    }

    /// Time left until this instant (zero once it has passed).
    ///
    /// # Examples
    /// ```
    /// # use core::time::Duration;
    /// # use localsession_core::{Clock, Instant};
    /// # struct Fixed;
    /// # impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(10) } }
    /// # static CLOCK: Fixed = Fixed;
    /// // `CLOCK` always reads 10 s.
    /// assert_eq!(Instant::from_clock_time(&CLOCK, Duration::from_secs(12)).remaining(), Duration::from_secs(2));
    /// assert_eq!(Instant::from_clock_time(&CLOCK, Duration::from_secs(8)).remaining(), Duration::ZERO);
    /// ```
    #[must_use]
    pub fn remaining(&self) -> Duration {
        self.at.saturating_sub(self.clock.now())
    }

    /// `self + d`, or `None` on overflow.
    ///
    /// # Examples
    /// ```
    /// # use core::time::Duration;
    /// # use localsession_core::{Clock, Instant};
    /// # struct Fixed;
    /// # impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(10) } }
    /// # static CLOCK: Fixed = Fixed;
    /// // `CLOCK` always reads 10 s.
    /// let now = Instant::now(&CLOCK);
    /// assert_eq!(now.checked_add(Duration::from_secs(1)).unwrap().since_origin(), Duration::from_secs(11));
    /// assert!(now.checked_add(Duration::MAX).is_none());
    /// // `+` saturates instead: a deadline that never comes.
    /// assert_eq!((now + Duration::MAX).since_origin(), Duration::MAX);
    /// ```
    #[must_use]
    pub fn checked_add(&self, d: Duration) -> Option<Instant> {
        self.at.checked_add(d).map(|at| Instant { at, clock: self.clock })
    }

    /// `self - earlier`, or zero if `earlier` is later.
    ///
    /// # Examples
    /// ```
    /// # use core::time::Duration;
    /// # use localsession_core::{Clock, Instant};
    /// # struct Fixed;
    /// # impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(10) } }
    /// # static CLOCK: Fixed = Fixed;
    /// // `CLOCK` always reads 10 s.
    /// let a = Instant::from_clock_time(&CLOCK, Duration::from_secs(3));
    /// let b = Instant::from_clock_time(&CLOCK, Duration::from_secs(5));
    /// assert_eq!(b.saturating_duration_since(a), Duration::from_secs(2));
    /// assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
    /// ```
    #[must_use]
    pub fn saturating_duration_since(&self, earlier: Instant) -> Duration {
        self.at.saturating_sub(earlier.at)
    }
}

impl Instant {
    /// Whether both instants are certainly on the same clock (the same clock object). Compares
    /// the clocks' addresses, not their vtables: the same clock can be reached through two
    /// vtables (codegen units, crates, and miri duplicate them), which must not make a child
    /// scope report its own, later deadline. Zero-sized clocks can share an address with
    /// another zero-sized clock, so for them the vtables must match too. Callers treat "not the
    /// same" as "keep both deadlines", which is always correct, only slower.
    #[allow(ambiguous_wide_pointer_comparisons)]
    pub(crate) fn same_clock(&self, other: &Instant) -> bool {
        core::ptr::addr_eq(self.clock, other.clock)
            && (core::mem::size_of_val(self.clock) != 0 || core::ptr::eq(self.clock, other.clock))
    }
}

impl core::ops::Add<Duration> for Instant {
    type Output = Instant;
    /// Saturates at `Duration::MAX` (a deadline that never comes) instead of overflowing.
    fn add(self, d: Duration) -> Instant {
        Instant { at: self.at.saturating_add(d), clock: self.clock }
    }
}

/// Instants compare by time; instants of different clocks are not meant to be compared (one
/// clock serves a process).
impl PartialEq for Instant {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Instant {}
impl PartialOrd for Instant {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Instant {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.cmp(&other.at)
    }
}

impl fmt::Debug for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Instant").field(&self.at).finish()
    }
}

/// A scope's pending expiry, handed to [`Clock::schedule`].
///
/// Holds the scope alive until it is fired or dropped; timers may drop entries whose scope is
/// already [settled](Expiry::is_settled) to free memory early.
///
/// # Examples
/// A clock whose "timer" is a queue that the program drains itself:
/// ```
/// use std::sync::Mutex;
/// use core::time::Duration;
/// use localsession_core::{Clock, Context, Expiry, Instant};
///
/// struct Manual(Mutex<Vec<(Duration, Expiry)>>);
/// impl Clock for Manual {
///     fn now(&self) -> Duration { Duration::ZERO }
///     fn schedule(&self, at: Duration, expiry: Expiry) { self.0.lock().unwrap().push((at, expiry)); }
/// }
/// static CLOCK: Manual = Manual(Mutex::new(Vec::new()));
///
/// let (ctx, _cancel) = Context::background().with_deadline(Instant::from_clock_time(&CLOCK, Duration::from_secs(1)));
/// let (tx, rx) = std::sync::mpsc::channel();
/// let _handle = ctx.after_cancel(move || tx.send("expired").unwrap()); // a waiter: the clock gets the expiry
/// let (at, expiry) = CLOCK.0.lock().unwrap().pop().unwrap();
/// assert_eq!(at, Duration::from_secs(1));
/// expiry.fire(); // the "timer" reached the deadline
/// assert_eq!(rx.try_recv(), Ok("expired"));
/// ```
///
/// The handle is defined here because [`Clock::schedule`] takes it; what firing does is the
/// cancel scope's business, so its methods are implemented in [`scope`](crate::scope), next to
/// the cancellation they run (this module does not name the scope module).
pub struct Expiry {
    /// A scope node (only the scope module makes an `Expiry`).
    pub(crate) scope: NodeRef,
}

static GLOBAL_CLOCK: Global<dyn Clock> = Global::new();

/// Registers the process-wide clock used by `with_timeout`. Adapters call this when they are
/// initialized; it can be set once.
///
/// # Errors
/// [`SetGlobalClockError`] if a clock was registered already.
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use localsession_core::{Clock, set_global_clock, global_clock};
/// struct Zero;
/// impl Clock for Zero { fn now(&self) -> Duration { Duration::ZERO } }
/// static ZERO: Zero = Zero;
///
/// // Each doctest is its own process, so this is the first registration.
/// assert!(set_global_clock(&ZERO).is_ok());
/// assert!(set_global_clock(&ZERO).is_err());
/// assert!(global_clock().is_some());
/// ```
pub fn set_global_clock(clock: &'static dyn Clock) -> Result<(), SetGlobalClockError> {
    GLOBAL_CLOCK.set(clock).map_err(|()| SetGlobalClockError(()))
}

/// A clock used while none is registered: see [`set_fallback_clock`].
static FALLBACK_CLOCK: Global<dyn Clock> = Global::new();

/// Offers `clock` as the process-wide clock for as long as none is registered with
/// [`set_global_clock`]; returns whether it was taken (the first offer wins).
///
/// The std adapter offers its clock as soon as it is used (its first `bind`, `enter`, `go`,
/// ...), so that `with_timeout` works in every std program without an init call, while an
/// adapter's init (tokio's clock, which follows `tokio::time::pause`) can still register its own
/// clock later. Deadlines taken before that keep the clock they were taken on (they merge
/// correctly with later ones: see [`Instant`]).
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use localsession_core::{Clock, global_clock, set_fallback_clock, set_global_clock};
/// struct Zero;
/// impl Clock for Zero { fn now(&self) -> Duration { Duration::ZERO } }
/// struct Ten;
/// impl Clock for Ten { fn now(&self) -> Duration { Duration::from_secs(10) } }
/// static ZERO: Zero = Zero;
/// static TEN: Ten = Ten;
///
/// assert!(set_fallback_clock(&ZERO));
/// assert_eq!(global_clock().unwrap().now(), Duration::ZERO); // used while nothing is registered
/// assert!(set_global_clock(&TEN).is_ok()); // a registration still succeeds...
/// assert_eq!(global_clock().unwrap().now(), Duration::from_secs(10)); // ...and wins
/// ```
pub fn set_fallback_clock(clock: &'static dyn Clock) -> bool {
    FALLBACK_CLOCK.set(clock).is_ok()
}

/// The process-wide clock: the one registered with [`set_global_clock`], else the fallback
/// offered with [`set_fallback_clock`] (the std adapter's, once it is used).
///
/// # Examples
/// ```
/// // Nothing registered in this process.
/// assert!(localsession_core::global_clock().is_none());
/// ```
#[must_use]
pub fn global_clock() -> Option<&'static dyn Clock> {
    GLOBAL_CLOCK.get().or_else(|| FALLBACK_CLOCK.get())
}

/// The clock registered with [`set_global_clock`], ignoring the fallback.
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use localsession_core::{Clock, registered_clock, set_fallback_clock};
/// struct Zero;
/// impl Clock for Zero { fn now(&self) -> Duration { Duration::ZERO } }
/// static ZERO: Zero = Zero;
/// set_fallback_clock(&ZERO);
/// assert!(registered_clock().is_none());
/// ```
#[must_use]
pub fn registered_clock() -> Option<&'static dyn Clock> {
    GLOBAL_CLOCK.get()
}

/// The error of a second [`set_global_clock`].
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use localsession_core::{set_global_clock, Clock};
/// struct Zero;
/// impl Clock for Zero { fn now(&self) -> Duration { Duration::ZERO } }
/// static FIRST: Zero = Zero;
/// static SECOND: Zero = Zero;
/// set_global_clock(&FIRST).unwrap();
/// let err = set_global_clock(&SECOND).unwrap_err();
/// assert_eq!(err.to_string(), "a global clock has already been set");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetGlobalClockError(());

impl fmt::Display for SetGlobalClockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a global clock has already been set")
    }
}

impl core::error::Error for SetGlobalClockError {}

/// `with_timeout` needs a clock and none is registered.
///
/// Register one with [`set_global_clock`] (the std, tokio and async-std adapters do when they
/// are initialized), or use `with_deadline` with an [`Instant`] of your clock.
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use localsession_core::{Context, SessionMap};
/// // No clock is registered in this doctest's process:
/// let err = Context::background().with_timeout(Duration::from_secs(1)).unwrap_err();
/// assert!(err.to_string().starts_with("no clock is registered"));
/// assert_eq!(SessionMap::with_timeout(Duration::from_secs(1)).unwrap_err(), err);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoClockError(pub(crate) ());

impl fmt::Display for NoClockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "no clock is registered: call localsession_core::set_global_clock (or initialize a \
             runtime adapter) before using a timeout, or pass a deadline from your clock",
        )
    }
}

impl core::error::Error for NoClockError {}
