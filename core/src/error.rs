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

/// Why a read found no value (see [`SessionExt::try_value_cloned`](crate::SessionExt::try_value_cloned)).
///
/// The key's type is part of the key: a binding under `"k"` (a `&str`) is not found with
/// `String::from("k")`, and reads as [`ReadError::Absent`] naming the key type that was used.
///
/// # Examples
/// ```
/// use localsession_core::{AnySession, Context, ReadError, SessionCtx};
/// let s = AnySession::from(SessionCtx::new(&Context::background()).with_value("n", 1u8));
/// assert_eq!(
///     s.try_value_cloned::<u16, _>(&"n").unwrap_err().to_string(),
///     "the value under this `&str` key is not a `u16`",
/// );
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadError {
    /// Nothing is bound under the key (with this key type).
    Absent {
        /// The type of the key that was looked up.
        key_type: &'static str,
    },
    /// A value is bound under the key, but it is not of the type asked for.
    WrongType {
        /// The type of the key that was looked up.
        key_type: &'static str,
        /// The value type asked for.
        expected: &'static str,
    },
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Absent { key_type } => write!(
                f,
                "nothing is bound under this `{key_type}` key (a key of another type, such as `String` for `&str`, is another key)"
            ),
            ReadError::WrongType { key_type, expected } => {
                write!(f, "the value under this `{key_type}` key is not a `{expected}`")
            }
        }
    }
}

impl core::error::Error for ReadError {}
