//! Explicit inheritance: spawn helpers and future combinators.
//!
//! Every helper wraps the future in `WithSession` bound to the thread-local store of
//! `localsession-std` (by its type, `WithSession<_, ThreadStore>`: the store's calls around each
//! poll are static): around each poll — on whichever worker polls it — the session is swapped
//! into that worker's slot and swapped out afterwards, so a worker never carries one task's
//! session into the next. Works on any runtime flavour, with or without `tokio_unstable`.
//!
//! The spawn helpers also carry the [`Bridges`] captured where they are called (features
//! `tracing` / `opentelemetry`, each while its switch is on): the spawner's span is entered and
//! the session's OpenTelemetry context attached around each poll, as `.in_current_span()` and
//! OpenTelemetry's `.with_context(..)` would. With nothing captured, the task is the plain
//! `WithSession` future, as before. The `FutureExt` combinators carry the session only.

use std::future::Future;

use localsession_core::{AnySession, WithSession};
pub use localsession_std::FutureExt;
use localsession_std::{Bridges, THREAD_STORE};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

/// `future` with `session` installed around each poll, and the bridges captured here (if any)
/// entered inside that (so that they see the session, and enter nothing once it has ended):
/// spawned with `$spawn`, as one of two future types.
macro_rules! spawn_bridged {
    ($spawn:expr, $session:expr, $future:expr) => {{
        let session: Option<AnySession> = $session;
        // Typed by the store (`WithSession<_, ThreadStore>`): the swaps around each poll are
        // static calls the compiler inlines. Both bridges off (the default): nothing to
        // capture, and no `Bridges` value to build, test and drop on every spawn (two relaxed
        // loads instead).
        let bridges = if Bridges::switched_on() {
            Some(Bridges::capture(session.as_ref())).filter(|bridges| !bridges.is_empty())
        } else {
            None
        };
        match bridges {
            None => $spawn(WithSession::new_in_store(&THREAD_STORE, $future, session)),
            Some(bridges) => $spawn(WithSession::new_in_store(&THREAD_STORE, bridges.wrap($future), session)),
        }
    }};
}

/// `tokio::spawn` with the spawner's current session.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{current, scope};
///
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)] async fn main() {
/// let s = SessionCtx::new(&Context::background()).with_value("user", 9u32);
/// let handle = scope(s, || localsession_tokio::spawn(async {
///     tokio::task::yield_now().await; // may resume on another worker
///     current().unwrap().value_cloned::<u32, _>(&"user")
/// }));
/// assert_eq!(handle.await.unwrap(), Some(9));
/// # }
/// ```
#[track_caller]
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    crate::probe::register();
    spawn_bridged!(tokio::spawn, localsession_std::flow_session(), future)
}

/// `tokio::spawn` with a given session.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let map = SessionMap::new().with_value("k", 5u8);
/// let h = localsession_tokio::spawn_with(map, async { localsession_std::current().is_some() });
/// assert!(h.await.unwrap());
/// # }
/// ```
#[track_caller]
pub fn spawn_with<F>(session: impl Into<AnySession>, future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    crate::probe::register();
    spawn_bridged!(tokio::spawn, Some(session.into()), future)
}

/// `tokio::task::spawn_blocking` with the spawner's current session (bound on the blocking
/// thread for the closure's duration, unbound after, panic or not).
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let s = SessionCtx::new(&Context::background()).with_value("k", 2u8);
/// let h = localsession_std::scope(s, || {
///     localsession_tokio::spawn_blocking(|| localsession_std::current().unwrap().value_cloned::<u8, _>(&"k"))
/// });
/// assert_eq!(h.await.unwrap(), Some(2));
/// # }
/// ```
#[track_caller]
pub fn spawn_blocking<F, R>(f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    tokio::task::spawn_blocking(localsession_std::in_current_session(f))
}

/// `tokio::task::spawn_local` (inside a `LocalSet`) with the spawner's current session.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let local = tokio::task::LocalSet::new();
/// let s = SessionCtx::new(&Context::background()).with_value("k", 3u8);
/// let v = local.run_until(async move {
///     let h = localsession_std::scope(s, || localsession_tokio::spawn_local(async {
///         localsession_std::current().unwrap().value_cloned::<u8, _>(&"k")
///     }));
///     h.await.unwrap()
/// }).await;
/// assert_eq!(v, Some(3));
/// # }
/// ```
#[track_caller]
pub fn spawn_local<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    crate::probe::register();
    spawn_bridged!(tokio::task::spawn_local, localsession_std::flow_session(), future)
}

/// Session-carrying spawns on a [`JoinSet`].
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_tokio::JoinSetExt;
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)] async fn main() {
/// let mut set = tokio::task::JoinSet::new();
/// for i in 0..4u32 {
///     let s = SessionCtx::new(&Context::background()).with_value("i", i);
///     set.spawn_with(s, async { localsession_std::current().unwrap().value_cloned::<u32, _>(&"i").unwrap() });
/// }
/// let mut got: Vec<u32> = set.join_all().await;
/// got.sort();
/// assert_eq!(got, vec![0, 1, 2, 3]);
/// # }
/// ```
pub trait JoinSetExt<T> {
    /// Spawns into the set with the spawner's current session.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_tokio::JoinSetExt;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut set = tokio::task::JoinSet::new();
    /// let map = SessionMap::new().with_value("req", 1u32);
    /// localsession_std::scope(map, || {
    ///     set.spawn_current(async { localsession_std::current().unwrap().value_cloned::<u32, _>(&"req") });
    /// });
    /// assert_eq!(set.join_next().await.unwrap().unwrap(), Some(1));
    /// # }
    /// ```
    fn spawn_current<F>(&mut self, future: F) -> AbortHandle
    where
        F: Future<Output = T> + Send + 'static;

    /// Spawns into the set with a given session.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_tokio::JoinSetExt;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut set = tokio::task::JoinSet::new();
    /// let map = SessionMap::new();
    /// let task = async { localsession_std::current().unwrap().as_map().unwrap().insert("done", true) };
    /// set.spawn_with(map.clone(), task);
    /// set.join_next().await.unwrap().unwrap();
    /// assert!(map.contains(&"done")); // the task wrote into the shared map
    /// # }
    /// ```
    fn spawn_with<F>(&mut self, session: impl Into<AnySession>, future: F) -> AbortHandle
    where
        F: Future<Output = T> + Send + 'static;
}

impl<T: Send + 'static> JoinSetExt<T> for JoinSet<T> {
    fn spawn_current<F>(&mut self, future: F) -> AbortHandle
    where
        F: Future<Output = T> + Send + 'static,
    {
        spawn_bridged!(|f| self.spawn(f), localsession_std::flow_session(), future)
    }

    fn spawn_with<F>(&mut self, session: impl Into<AnySession>, future: F) -> AbortHandle
    where
        F: Future<Output = T> + Send + 'static,
    {
        spawn_bridged!(|f| self.spawn(f), Some(session.into()), future)
    }
}
