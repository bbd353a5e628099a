//! Why a context is done: Go's `context.Canceled`, `context.DeadlineExceeded`, or a user cause.

use core::fmt;

use alloc::sync::Arc;

/// The reason a [`Context`](crate::Context) (or a session) is done.
///
/// # Examples
/// ```
/// use localsession_core::{Context, ContextError};
///
/// let (ctx, cancel) = Context::background().with_cancel();
/// assert_eq!(ctx.err(), None);
/// cancel.cancel();
/// assert_eq!(ctx.err(), Some(ContextError::Canceled));
/// assert_eq!(ContextError::Canceled.to_string(), "context canceled");
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub enum ContextError {
    /// Cancelled (Go `context.Canceled`), also what `disable()` reports.
    Canceled,
    /// The deadline passed (Go `context.DeadlineExceeded`).
    DeadlineExceeded,
    /// Cancelled with a cause (Go `context.WithCancelCause`).
    Cause(Arc<dyn core::error::Error + Send + Sync>),
}

impl ContextError {
    /// Wraps a user error as a cancellation cause.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::ContextError;
    /// let err = ContextError::cause(std::io::Error::other("shutting down"));
    /// assert_eq!(err.to_string(), "shutting down");
    /// assert!(core::error::Error::source(&err).is_some());
    /// assert_eq!(err, err.clone()); // causes compare by identity:
    /// assert_ne!(err, ContextError::cause(std::io::Error::other("shutting down")));
    /// ```
    #[must_use]
    pub fn cause(err: impl core::error::Error + Send + Sync + 'static) -> Self {
        ContextError::Cause(Arc::new(err))
    }

    /// Whether this is a deadline expiry.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::{Clock, Context, ContextError, Instant};
    /// struct Fixed;
    /// impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(10) } }
    /// static CLOCK: Fixed = Fixed;
    ///
    /// let (ctx, _cancel) = Context::background().with_deadline(Instant::from_clock_time(&CLOCK, Duration::ZERO));
    /// assert!(ctx.err().unwrap().is_deadline_exceeded());
    /// assert!(!ContextError::Canceled.is_deadline_exceeded());
    /// ```
    #[must_use]
    pub fn is_deadline_exceeded(&self) -> bool {
        matches!(self, ContextError::DeadlineExceeded)
    }
}

/// Causes compare by identity (the same `Arc`), the other variants by kind.
impl PartialEq for ContextError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ContextError::Canceled, ContextError::Canceled) => true,
            (ContextError::DeadlineExceeded, ContextError::DeadlineExceeded) => true,
            (ContextError::Cause(a), ContextError::Cause(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}
impl Eq for ContextError {}

impl fmt::Debug for ContextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContextError::Canceled => f.write_str("Canceled"),
            ContextError::DeadlineExceeded => f.write_str("DeadlineExceeded"),
            ContextError::Cause(c) => f.debug_tuple("Cause").field(&format_args!("{c}")).finish(),
        }
    }
}

impl fmt::Display for ContextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContextError::Canceled => f.write_str("context canceled"),
            ContextError::DeadlineExceeded => f.write_str("context deadline exceeded"),
            ContextError::Cause(c) => fmt::Display::fmt(c, f),
        }
    }
}

impl core::error::Error for ContextError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            ContextError::Cause(c) => Some(&**c),
            _ => None,
        }
    }
}
