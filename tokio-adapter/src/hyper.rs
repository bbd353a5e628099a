//! A hyper executor that spawns with no session (feature `hyper`).
//!
//! hyper-util's pooled client (`hyper_util::client::legacy::Client`) spawns a connection task
//! when a request needs a new connection, from inside that request — and keeps the connection,
//! and its task, in the pool for later requests. With `hyper_util::rt::TokioExecutor` in
//! implicit mode, that task inherits the first request's session and pins it for as long as
//! the connection lives. [`NoSessionExecutor`] spawns every task with no session instead.

use std::future::Future;

use hyper::rt::Executor;
use hyper_util::rt::TokioExecutor;
use localsession_std::FutureExt;

/// `hyper_util::rt::TokioExecutor`, but the tasks it spawns run with no session (see the
/// [module docs](self)); use it for `hyper_util::client::legacy::Client::builder` and for
/// hyper-util's server connection builders.
///
/// # Examples
/// ```
/// use hyper::rt::Executor;
/// use localsession_core::SessionMap;
/// use localsession_tokio::hyper::NoSessionExecutor;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // As hyper-util's client does when it opens a connection during a request:
/// let (tx, rx) = tokio::sync::oneshot::channel();
/// localsession_std::scope(SessionMap::new().with_value("tenant", "acme"), || {
///     NoSessionExecutor::new().execute(async move { tx.send(localsession_std::current().is_none()).unwrap() });
/// });
/// assert!(rx.await.unwrap()); // the connection task does not carry the request's session
/// // With hyper-util's pooled client:
/// // Client::builder(NoSessionExecutor::new()).build_http::<Body>()
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct NoSessionExecutor {
    inner: TokioExecutor,
}

impl NoSessionExecutor {
    /// The executor.
    ///
    /// # Examples
    /// ```
    /// use hyper::rt::Executor;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (tx, rx) = tokio::sync::oneshot::channel();
    /// localsession_tokio::hyper::NoSessionExecutor::new().execute(async move { tx.send(7).unwrap() });
    /// assert_eq!(rx.await.unwrap(), 7);
    /// # }
    /// ```
    #[must_use]
    pub fn new() -> Self {
        NoSessionExecutor { inner: TokioExecutor::new() }
    }
}

impl<Fut> Executor<Fut> for NoSessionExecutor
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        // `without_flow`: in implicit mode the spawn hook must not record the caller's session
        // either (the `WithSession` wrapper alone would only hide it during polls).
        localsession_std::without_flow(|| self.inner.execute(fut.without_session()));
    }
}
