//! `localsession-async-std`: sessions that follow async-std tasks — and smol's.
//!
//! async-std is discontinued upstream (its README recommends smol). This adapter is therefore
//! thin: every helper is the core's `WithSession` bound to the std adapter's thread-local store
//! ([`FutureExt`], re-exported from `localsession-std`), which works on any executor whose
//! workers are OS threads. The same `fut.in_current_session()` serves `smol::spawn`,
//! `async_executor::Executor::spawn` and `async_std::task::spawn` alike (see the tests).
//!
//! Deadlines fire on async-io's timers once [`init`] registered [`ASYNC_IO_CLOCK`].
//!
//! # Examples
//! ```
//! use localsession_core::{Context, SessionCtx};
//! use localsession_std::{current, scope};
//!
//! let s = SessionCtx::new(&Context::background()).with_value("req", 1u32);
//! let v = localsession_async_std::block_on(async move {
//!     let h = scope(s, || localsession_async_std::spawn(async {
//!         async_std::task::yield_now().await;
//!         current().unwrap().value_cloned::<u32, _>(&"req")
//!     }));
//!     h.await
//! });
//! assert_eq!(v, Some(1));
//! ```

use std::future::Future;
use std::io;
use std::time::Duration;

use async_std::task::JoinHandle;
use localsession_core::config::ManagerOptions;
use localsession_core::{AnySession, Clock, Expiry, Instant, WithSession};
pub use localsession_std::FutureExt;
use localsession_std::{THREAD_STORE, ThreadStore};

/// `future` with `session` installed around each poll in the std adapter's thread store, named by
/// its type (`FutureExt` gives the same future through `dyn ContextStore`; here the store's calls
/// around each poll are static).
fn in_thread_store<F: Future>(future: F, session: Option<AnySession>) -> WithSession<F, ThreadStore> {
    WithSession::new_in_store(&THREAD_STORE, future, session)
}

/// `async_std::task::spawn` with the spawner's current session.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_std::{current, scope};
///
/// let map = SessionMap::new().with_value("req", 5u32);
/// let h = scope(map, || localsession_async_std::spawn(async {
///     async_std::task::yield_now().await; // may resume on another worker
///     current().unwrap().value_cloned::<u32, _>(&"req")
/// }));
/// assert_eq!(async_std::task::block_on(h), Some(5));
/// ```
///
/// See also the [crate docs](crate).
pub fn spawn<F, T>(future: F) -> JoinHandle<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    async_std::task::spawn(in_thread_store(future, localsession_std::flow_session()))
}

/// `async_std::task::spawn` with a given session.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// let h = localsession_async_std::spawn_with(SessionMap::new(), async { localsession_std::current().is_some() });
/// assert!(async_std::task::block_on(h));
/// ```
pub fn spawn_with<F, T>(session: impl Into<AnySession>, future: F) -> JoinHandle<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    async_std::task::spawn(in_thread_store(future, Some(session.into())))
}

/// `async_std::task::spawn_blocking` with the spawner's current session (bound for the closure,
/// the blocking thread left clean after).
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// let s = SessionCtx::new(&Context::background()).with_value("k", 2u8);
/// let h = localsession_std::scope(s, || {
///     localsession_async_std::spawn_blocking(|| localsession_std::current().unwrap().value_cloned::<u8, _>(&"k"))
/// });
/// assert_eq!(async_std::task::block_on(h), Some(2));
/// ```
pub fn spawn_blocking<F, T>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    async_std::task::spawn_blocking(localsession_std::in_current_session(f))
}

/// `async_std::task::spawn_local` with the spawner's current session.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// let s = SessionCtx::new(&Context::background());
/// let v = async_std::task::block_on(async move {
///     localsession_std::scope(s, || localsession_async_std::spawn_local(async { localsession_std::current().is_some() })).await
/// });
/// assert!(v);
/// ```
pub fn spawn_local<F, T>(future: F) -> JoinHandle<T>
where
    F: Future<Output = T> + 'static,
    T: 'static,
{
    async_std::task::spawn_local(in_thread_store(future, localsession_std::flow_session()))
}

/// `async_std::task::block_on`, carrying the caller's current session into the future (and into
/// its drop), even if the future binds something else meanwhile. Also under
/// [`without_flow`](localsession_std::without_flow): the future runs on the calling thread, like
/// a synchronous call, and suppression only stops what is spawned from inheriting.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx, SessionMap};
/// use localsession_std::{bind, current, scope};
///
/// scope(SessionCtx::new(&Context::background()), || {
///     let bound_inside = localsession_async_std::block_on(async {
///         bind(SessionMap::new()).unwrap(); // sticks to the future...
///         current().unwrap().as_map().is_some()
///     });
///     assert!(bound_inside);
///     assert!(current().unwrap().as_ctx().is_some()); // ...and the caller's session is back
/// });
/// ```
///
/// See also the [crate docs](crate).
pub fn block_on<F: Future>(future: F) -> F::Output {
    // `current()`, not the flow's session: the future runs here, on the caller's thread, as
    // a synchronous call would, so `without_flow` (which stops what is *spawned* from
    // inheriting) does not take the caller's session away from it.
    async_std::task::block_on(in_thread_store(future, localsession_std::current()))
}

/// `async_std::task::Builder` that hands a session to the task.
///
/// By default the task gets the spawner's current session; [`session`](Builder::session) gives
/// it another, [`no_session`](Builder::no_session) none.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// let s = SessionCtx::new(&Context::background()).with_value(1u8, 1u8);
/// let h = localsession_async_std::Builder::new()
///     .name("worker".into())
///     .session(s)
///     .spawn(async { localsession_std::current().is_some() })
///     .unwrap();
/// assert!(async_std::task::block_on(h));
/// ```
#[derive(Debug)]
pub struct Builder {
    inner: async_std::task::Builder,
    session: Option<Option<AnySession>>,
}

impl Builder {
    /// A builder whose tasks inherit the spawner's session.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, scope};
    ///
    /// let map = SessionMap::new().with_value("k", 1u8);
    /// let h = scope(map, || {
    ///     localsession_async_std::Builder::new().spawn(async { current().unwrap().value_cloned::<u8, _>(&"k") })
    /// });
    /// assert_eq!(async_std::task::block_on(h.unwrap()), Some(1)); // inherited from the spawner
    /// ```
    #[must_use]
    pub fn new() -> Builder {
        Builder { inner: async_std::task::Builder::new(), session: None }
    }

    /// Names the task.
    ///
    /// # Examples
    /// ```
    /// let h = localsession_async_std::Builder::new()
    ///     .name("fetch".into())
    ///     .spawn(async { async_std::task::current().name().map(str::to_owned) })
    ///     .unwrap();
    /// assert_eq!(async_std::task::block_on(h).as_deref(), Some("fetch"));
    /// ```
    #[must_use]
    pub fn name(self, name: String) -> Builder {
        Builder { inner: self.inner.name(name), ..self }
    }

    /// Runs the task with `session` instead of the spawner's.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::current;
    ///
    /// let map = SessionMap::new();
    /// let h = localsession_async_std::Builder::new()
    ///     .session(map.clone())
    ///     .spawn(async { current().unwrap().as_map().unwrap().insert("seen", true) })
    ///     .unwrap();
    /// async_std::task::block_on(h);
    /// assert!(map.contains(&"seen")); // the task wrote into the shared map
    /// ```
    #[must_use]
    pub fn session(self, session: impl Into<AnySession>) -> Builder {
        Builder { session: Some(Some(session.into())), ..self }
    }

    /// Runs the task with no session.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, scope};
    ///
    /// let h = scope(SessionMap::new(), || {
    ///     localsession_async_std::Builder::new().no_session().spawn(async { current().is_none() })
    /// });
    /// assert!(async_std::task::block_on(h.unwrap()));
    /// ```
    #[must_use]
    pub fn no_session(self) -> Builder {
        Builder { session: Some(None), ..self }
    }

    fn wrap<F: Future>(session: Option<Option<AnySession>>, future: F) -> WithSession<F, ThreadStore> {
        in_thread_store(future, session.unwrap_or_else(localsession_std::flow_session))
    }

    /// Spawns the task.
    ///
    /// # Errors
    /// As `async_std::task::Builder::spawn`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::current;
    ///
    /// let map = SessionMap::new().with_value("k", 2u8);
    /// let h = localsession_async_std::Builder::new()
    ///     .session(map)
    ///     .spawn(async { current().unwrap().value_cloned::<u8, _>(&"k") })?;
    /// assert_eq!(async_std::task::block_on(h), Some(2));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn spawn<F, T>(self, future: F) -> io::Result<JoinHandle<T>>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.inner.spawn(Self::wrap(self.session, future))
    }

    /// Spawns a task on the current thread.
    ///
    /// # Errors
    /// As `async_std::task::Builder::local`.
    ///
    /// # Examples
    /// ```
    /// use std::rc::Rc;
    /// use localsession_core::SessionMap;
    /// use localsession_std::current;
    ///
    /// let v = async_std::task::block_on(async {
    ///     let shared = Rc::new(5); // `!Send`: needs a task on this thread
    ///     let task = async move { (*shared, current().is_some()) };
    ///     localsession_async_std::Builder::new().session(SessionMap::new()).local(task).unwrap().await
    /// });
    /// assert_eq!(v, (5, true));
    /// ```
    pub fn local<F, T>(self, future: F) -> io::Result<JoinHandle<T>>
    where
        F: Future<Output = T> + 'static,
        T: 'static,
    {
        self.inner.local(Self::wrap(self.session, future))
    }

    /// Blocks on the future with the session (as `async_std::task::Builder::blocking`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::current;
    ///
    /// let v = localsession_async_std::Builder::new()
    ///     .session(SessionMap::new().with_value("k", 3u8))
    ///     .blocking(async { current().unwrap().value_cloned::<u8, _>(&"k") });
    /// assert_eq!(v, Some(3));
    /// assert!(current().is_none()); // nothing left bound on this thread
    /// ```
    pub fn blocking<F: Future>(self, future: F) -> F::Output {
        self.inner.blocking(Self::wrap(self.session, future))
    }
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

/// Deadlines on async-io's timers.
///
/// `now()` is `std::time::Instant`; a deadline that someone waits for is fired by a small
/// detached task (on async-std's executor) awaiting an `async_io::Timer`, raced against the
/// scope's own `done()` so that an early cancel releases it.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use localsession_core::{Context, Instant};
/// use localsession_async_std::ASYNC_IO_CLOCK;
///
/// let (ctx, _cancel) = Context::background().with_deadline(Instant::now(&ASYNC_IO_CLOCK) + Duration::from_millis(20));
/// async_std::task::block_on(ctx.done());
/// assert!(ctx.err().unwrap().is_deadline_exceeded());
/// ```
#[derive(Debug)]
pub struct AsyncIoClock {
    origin: std::sync::OnceLock<std::time::Instant>,
}

/// The one [`AsyncIoClock`].
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use localsession_core::{Context, Instant};
/// use localsession_async_std::ASYNC_IO_CLOCK;
///
/// let deadline = Instant::now(&ASYNC_IO_CLOCK) + Duration::from_millis(10);
/// let (ctx, _cancel) = Context::background().with_deadline(deadline);
/// let (tx, rx) = std::sync::mpsc::channel();
/// let _h = ctx.after_cancel(move || tx.send(()).unwrap());
/// // Nobody polls `done()`: a detached task awaiting an async-io timer fires the deadline.
/// rx.recv_timeout(Duration::from_secs(10)).unwrap();
/// assert!(ctx.err().unwrap().is_deadline_exceeded());
/// ```
pub static ASYNC_IO_CLOCK: AsyncIoClock = AsyncIoClock { origin: std::sync::OnceLock::new() };

impl AsyncIoClock {
    fn origin(&self) -> std::time::Instant {
        *self.origin.get_or_init(std::time::Instant::now)
    }
}

impl Clock for AsyncIoClock {
    fn now(&self) -> Duration {
        self.origin().elapsed()
    }

    fn schedule(&self, at: Duration, expiry: Expiry) {
        let when = self.origin() + at;
        drop(async_std::task::spawn(async move {
            let settled = expiry.settled();
            let fired = futures_lite::future::or(
                async {
                    async_io::Timer::at(when).await;
                    true
                },
                async {
                    settled.await;
                    false
                },
            )
            .await;
            if fired {
                expiry.fire();
            }
        }));
    }
}

/// The core [`Instant`] `d` from now on [`ASYNC_IO_CLOCK`].
///
/// # Examples
/// ```
/// use std::time::Duration;
/// assert!(!localsession_async_std::after(Duration::from_secs(1)).has_passed());
/// ```
#[must_use]
pub fn after(d: Duration) -> Instant {
    Instant::now(&ASYNC_IO_CLOCK) + d
}

/// Registers [`ASYNC_IO_CLOCK`] as the process-wide clock, then initializes the std default
/// manager (the thread-local store async-std's workers use).
///
/// # Errors
/// As [`localsession_std::init_default_manager`], and
/// [`InitError::ForeignClock`](localsession_std::InitError::ForeignClock) if another clock was
/// registered before.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use localsession_core::Context;
///
/// localsession_async_std::init(localsession_std::default_manager_options()).unwrap();
/// // Timeouts now fire on async-io's timers:
/// let (ctx, _cancel) = Context::background().with_timeout(Duration::from_millis(10)).unwrap();
/// async_std::task::block_on(ctx.done());
/// assert!(ctx.err().unwrap().is_deadline_exceeded());
/// ```
pub fn init(opts: ManagerOptions) -> Result<(), localsession_std::InitError> {
    localsession_std::register_adapter_clock(&ASYNC_IO_CLOCK)?;
    localsession_std::init_default_manager(opts)
}
