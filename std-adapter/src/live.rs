//! A live-session counter for leak tests (feature `live-count`).
//!
//! Counts sessions currently held in thread slots of [`ThreadStore`](crate::ThreadStore). After
//! a workload has ended and its threads have unbound (or exited), it returns to its starting
//! value; a leak shows up as a count that keeps growing. Without the feature the hooks compile
//! to nothing and [`live_sessions`] reports `None`.

#[cfg(feature = "live-count")]
use std::sync::atomic::{AtomicIsize, Ordering};

#[cfg(feature = "live-count")]
static LIVE: AtomicIsize = AtomicIsize::new(0);

#[inline]
pub(crate) fn on_bind(bound: bool) {
    #[cfg(feature = "live-count")]
    if bound {
        LIVE.fetch_add(1, Ordering::Relaxed);
    }
    let _ = bound;
}

#[inline]
pub(crate) fn on_unbind(was_bound: bool) {
    #[cfg(feature = "live-count")]
    if was_bound {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
    let _ = was_bound;
}

/// Sessions currently bound in thread slots, with the `live-count` feature; `None` without it.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_std::{live_sessions, scope};
///
/// let before = live_sessions();
/// let during = scope(SessionMap::new(), live_sessions);
/// match (before, during) {
///     (Some(before), Some(during)) => assert_eq!(during, before + 1), // feature `live-count`
///     (None, None) => {} // without the `live-count` feature nothing is counted
///     _ => unreachable!(),
/// }
/// ```
#[must_use]
pub fn live_sessions() -> Option<isize> {
    #[cfg(feature = "live-count")]
    {
        Some(LIVE.load(Ordering::Relaxed))
    }
    #[cfg(not(feature = "live-count"))]
    {
        None
    }
}
