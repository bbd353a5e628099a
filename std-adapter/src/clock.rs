//! The std [`Clock`] and one shared timer thread for deadlines.
//!
//! Expiry is observed lazily by `err()`/`is_done()`; the timer only exists for waiters: when a
//! `done()` future is polled or an `after_cancel` callback is registered on a scope with a
//! deadline, the core asks the clock once to fire that scope's [`Expiry`]. All expiries go to
//! one thread (started on first use, named `localsession-timer`) that sleeps on a condition
//! variable until the earliest deadline — no thread per session, unlike Go's
//! `NewSessionCtxWithTimeout`. Expiries whose scope was cancelled meanwhile are purged when the
//! queue grows, so cancelled requests do not pin memory until their deadline.
//!
//! Firing runs the scope's `after_cancel` callbacks on the timer thread. A callback that panics
//! is caught there (the timer thread must survive for every other deadline); the panic message
//! is written to stderr.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant as StdInstant};

use localsession_core::{Clock, Expiry, Instant};

/// Monotonic time from `std::time::Instant`, and a shared timer thread.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use localsession_core::{Context, Instant};
/// use localsession_std::STD_CLOCK;
///
/// let deadline = Instant::now(&STD_CLOCK) + Duration::from_millis(20);
/// let (ctx, _cancel) = Context::background().with_deadline(deadline);
/// assert!(!ctx.is_done());
/// std::thread::sleep(Duration::from_millis(30));
/// assert!(ctx.err().unwrap().is_deadline_exceeded());
/// ```
#[derive(Debug)]
pub struct StdClock {
    origin: OnceLock<StdInstant>,
    timer: OnceLock<&'static Timer>,
}

/// The one [`StdClock`], registered as the global clock by
/// [`init_default_manager`](crate::init_default_manager).
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use localsession_core::Context;
/// use localsession_std::STD_CLOCK;
///
/// let (ctx, _cancel) = Context::background().with_deadline(STD_CLOCK.after(Duration::from_millis(10)));
/// let (tx, rx) = std::sync::mpsc::channel();
/// let _h = ctx.after_cancel(move || tx.send(std::thread::current().name().map(str::to_owned)).unwrap());
/// // Nobody polls `done()`: the shared timer thread fires the deadline.
/// assert_eq!(rx.recv().unwrap().as_deref(), Some("localsession-timer"));
/// ```
pub static STD_CLOCK: StdClock = StdClock { origin: OnceLock::new(), timer: OnceLock::new() };

impl StdClock {
    fn origin(&self) -> StdInstant {
        *self.origin.get_or_init(StdInstant::now)
    }

    /// The core [`Instant`] for a std instant (instants before the clock's origin map to it).
    ///
    /// # Examples
    /// ```
    /// use std::time::{Duration, Instant};
    /// use localsession_std::STD_CLOCK;
    /// let later = Instant::now() + Duration::from_secs(1);
    /// assert!(!STD_CLOCK.instant(later).has_passed());
    /// ```
    #[must_use]
    pub fn instant(&'static self, at: StdInstant) -> Instant {
        Instant::from_clock_time(self, at.saturating_duration_since(self.origin()))
    }

    /// The core [`Instant`] `d` from now.
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// use localsession_std::STD_CLOCK;
    /// assert!(!STD_CLOCK.after(Duration::from_secs(60)).has_passed());
    /// ```
    #[must_use]
    pub fn after(&'static self, d: Duration) -> Instant {
        Instant::now(self) + d
    }

    /// Expiries waiting in the timer queue (for tests and metrics).
    ///
    /// # Examples
    /// ```
    /// use std::time::Duration;
    /// use localsession_core::Context;
    /// use localsession_std::STD_CLOCK;
    ///
    /// assert_eq!(STD_CLOCK.pending_timers(), 0); // nothing waits: the timer thread is not even started
    /// let (ctx, _cancel) = Context::background().with_deadline(STD_CLOCK.after(Duration::from_secs(60)));
    /// let _waiter = ctx.after_cancel(|| {});
    /// assert_eq!(STD_CLOCK.pending_timers(), 1);
    /// ```
    #[must_use]
    pub fn pending_timers(&self) -> usize {
        self.timer.get().map_or(0, |t| t.queue.lock().unwrap_or_else(PoisonError::into_inner).heap.len())
    }

    fn timer(&'static self) -> &'static Timer {
        self.timer.get_or_init(|| {
            let timer: &'static Timer = Box::leak(Box::new(Timer {
                queue: Mutex::new(Queue { heap: BinaryHeap::new(), seq: 0, purge_at: 64 }),
                wake: Condvar::new(),
            }));
            std::thread::Builder::new()
                .name("localsession-timer".into())
                .spawn(move || timer.run(self))
                .expect("failed to start the localsession timer thread");
            timer
        })
    }
}

impl Clock for StdClock {
    fn now(&self) -> Duration {
        self.origin().elapsed()
    }

    fn schedule(&self, at: Duration, expiry: Expiry) {
        // `timer()` needs `&'static self`; the only `StdClock` is the static one.
        STD_CLOCK.timer().push(at, expiry);
    }
}

struct Entry {
    at: Duration,
    seq: u64,
    expiry: Expiry,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Queue {
    heap: BinaryHeap<Reverse<Entry>>,
    seq: u64,
    /// Purge settled expiries when the heap reaches this size.
    purge_at: usize,
}

struct Timer {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer").finish_non_exhaustive()
    }
}

impl Timer {
    fn push(&self, at: Duration, expiry: Expiry) {
        let mut purged = Vec::new();
        {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.seq += 1;
            let seq = q.seq;
            let earliest = q.heap.peek().is_none_or(|Reverse(e)| at < e.at);
            q.heap.push(Reverse(Entry { at, seq, expiry }));
            if q.heap.len() >= q.purge_at {
                // Drop expiries of scopes cancelled meanwhile (outside the lock, below).
                let heap = std::mem::take(&mut q.heap);
                let (settled, live): (Vec<_>, Vec<_>) = heap.into_iter().partition(|Reverse(e)| e.expiry.is_settled());
                q.heap = live.into_iter().collect();
                q.purge_at = (q.heap.len() * 2).max(64);
                purged = settled;
            }
            if earliest {
                self.wake.notify_one();
            }
        }
        drop(purged);
    }

    fn run(&self, clock: &StdClock) -> ! {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = clock.now();
            match q.heap.peek() {
                None => q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner),
                Some(Reverse(e)) if e.at > now => {
                    let wait = e.at - now;
                    q = self.wake.wait_timeout(q, wait).unwrap_or_else(PoisonError::into_inner).0;
                }
                Some(_) => {
                    let Some(Reverse(entry)) = q.heap.pop() else { continue };
                    drop(q);
                    // Each expiry runs its callbacks (user code) in a scope of its own with no
                    // session: a callback's `bind` ends with it, so a later callback — another
                    // request's — never sees it as current.
                    let fire = || {
                        let _scope = localsession_core::enter_option_in(&crate::THREAD_STORE, None);
                        entry.expiry.fire();
                    };
                    if let Err(panic) = catch_unwind(AssertUnwindSafe(fire)) {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "<non-string panic>".to_owned());
                        eprintln!("localsession-timer: an after_cancel callback panicked: {msg}");
                    }
                    q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }
}
