//! Spawning long-lived work with no session: connection tasks, buffer workers, refreshers.
//!
//! Work that outlives the request that happens to start it must not carry that request's
//! session: it would act — read, log, or send downstream — with that request's identity on
//! behalf of every later request. [`spawn_without_session`] spawns a task that runs with no
//! session at every poll, and suppresses the flow while spawning
//! ([`localsession_std::without_flow`]) so that the implicit mode's spawn hook records nothing
//! either.

use std::future::Future;

use localsession_std::FutureExt;
use tokio::task::JoinHandle;

/// `tokio::spawn` with **no** session, whatever the spawner has bound — also in implicit mode,
/// where a plain `tokio::spawn` would inherit it. For tasks that outlive the request that
/// starts them: a `tower::buffer::Buffer` worker, a connection task, a cache refresher.
///
/// # Examples
/// The safe way to build a `tower::buffer::Buffer` lazily inside a handler: its worker serves
/// every later request, so it must not keep this one's session.
/// ```
/// use std::convert::Infallible;
/// use localsession_core::SessionMap;
/// use localsession_std::{current, scope};
/// use tower::buffer::Buffer;
/// use tower::{Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let inner = tower::service_fn(|_req: ()| async { Ok::<_, Infallible>(current().is_none()) });
/// let mut buffered = scope(SessionMap::new().with_value("tenant", "acme"), || {
///     let (svc, worker) = Buffer::pair(inner, 16);
///     localsession_tokio::spawn_without_session(worker); // not `tokio::spawn(worker)`
///     svc
/// });
/// let worker_had_no_session = buffered.ready().await.unwrap().call(()).await.unwrap();
/// assert!(worker_had_no_session);
/// # }
/// ```
#[track_caller]
pub fn spawn_without_session<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    localsession_std::without_flow(|| tokio::spawn(future.without_session()))
}
