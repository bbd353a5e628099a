//! Spawning OS threads that carry a session: Go's `Go` and `GoSession`; wrapping closures for
//! pools.
//!
//! A new thread binds the session before running `f` and unbinds it when `f` returns or panics
//! (a guard dropped during unwinding), so the thread never outlives its job with the session.
//! A panic in `f` reaches the `JoinHandle`, exactly as with `std::thread::spawn`.
//!
//! A wrapped closure ([`in_current_session`], [`with_session`]) may run on a pool thread *or
//! inline on the caller's thread* (`rayon::join` runs its first closure inline, a job queue may
//! run a job on the thread that submitted it): it restores exactly what that thread had bound
//! before, also on panic. A `bind` inside the closure ends with the closure (Go: a goroutine's
//! binding ends with the goroutine).
//!
//! Every wrapper also captures the [`Bridges`] where it is created (the spawner's span, the
//! session's OpenTelemetry context, each while its bridge is on) and enters them inside the
//! session's install, for the closure's run.

use std::io;
use std::thread::{JoinHandle, Scope, ScopedJoinHandle};

use localsession_core::AnySession;

use crate::bridge::Bridges;
use crate::store::THREAD_STORE;

/// Binds a session on a thread spawned for one closure, and unbinds when dropped (also while
/// unwinding), whatever the closure bound itself (Go: the goroutine's binding ends with it).
struct ThreadBinding;

impl ThreadBinding {
    fn fresh(session: Option<AnySession>) -> ThreadBinding {
        // Install exactly `session` (none included). A failure means teardown, where nothing
        // can be bound.
        drop(THREAD_STORE.swap(session));
        ThreadBinding
    }
}

impl Drop for ThreadBinding {
    fn drop(&mut self) {
        // The session `f` ran with comes back here and is dropped outside the slot.
        drop(THREAD_STORE.swap(None));
    }
}

/// `f` on a thread spawned for it: `session` bound, nothing bound afterwards.
fn wrap_fresh<F, T>(session: Option<AnySession>, f: F) -> impl FnOnce() -> T + Send
where
    F: FnOnce() -> T + Send,
{
    let bridges = Bridges::capture(session.as_ref());
    move || {
        let _binding = ThreadBinding::fresh(session);
        let _bridges = bridges.enter();
        f()
    }
}

/// `f` on whatever thread calls it: `session` bound, the previous binding restored afterwards.
fn wrap_inline<F, T>(session: Option<AnySession>, f: F) -> impl FnOnce() -> T + Send
where
    F: FnOnce() -> T + Send,
{
    let bridges = Bridges::capture(session.as_ref());
    move || {
        // A scope (the core's `EnterGuard`): restores exactly what was bound before — its owner
        // tag included — unless the manager was reset meanwhile, also while unwinding.
        let _scope = localsession_core::enter_option_in(&THREAD_STORE, session);
        let _bridges = bridges.enter();
        f()
    }
}

/// Wraps `f` so that it runs with the session current *now* (none while the flow is suppressed,
/// see [`without_flow`](crate::without_flow)), on whatever thread later calls it. Afterwards
/// that thread has exactly what it had bound before (panic or not): a pool thread stays empty,
/// and a caller that runs the job inline keeps its own session. For thread pools and blocking
/// pools (rayon, `spawn_blocking`, a job queue).
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx, SessionMap};
/// use localsession_std::{current, in_current_session, scope};
///
/// let s = SessionCtx::new(&Context::background()).with_value("job", 4u8);
/// let job = scope(s, || in_current_session(|| current().unwrap().value_cloned::<u8, _>(&"job")));
/// let seen = std::thread::spawn(job).join().unwrap(); // a plain thread: the job carries it
/// assert_eq!(seen, Some(4));
///
/// // Run inline (as `rayon::join` runs its first closure), the caller keeps its binding:
/// let caller = SessionMap::new().with_value("who", "caller");
/// let who = scope(caller, || {
///     in_current_session(|| ())(); // the job ran here, with the caller's own session
///     current().unwrap().value_cloned::<&str, _>(&"who")
/// });
/// assert_eq!(who, Some("caller"));
/// ```
pub fn in_current_session<F, T>(f: F) -> impl FnOnce() -> T + Send
where
    F: FnOnce() -> T + Send,
{
    wrap_inline(crate::flow_session(), f)
}

/// Wraps `f` so that it runs with `session` bound (or none), on whatever thread calls it.
/// Afterwards that thread has exactly what it had bound before (panic or not).
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_std::{current, scope, with_session};
/// let job = with_session(Some(SessionMap::new().into()), || current().is_some());
/// assert!(std::thread::spawn(job).join().unwrap());
///
/// // Inline with `None`: the closure sees nothing, the caller's session comes back after.
/// let kept = scope(SessionMap::new(), || {
///     assert!(with_session(None, || current().is_none())());
///     current().is_some()
/// });
/// assert!(kept);
/// ```
pub fn with_session<F, T>(session: Option<AnySession>, f: F) -> impl FnOnce() -> T + Send
where
    F: FnOnce() -> T + Send,
{
    wrap_inline(session, f)
}

/// Spawns a thread that runs `f` with the caller's current session (Go `Go`).
///
/// # Panics
/// As `std::thread::spawn`: if the OS fails to create the thread (use [`Builder`] to get the
/// error instead).
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{bind, current, go, unbind};
///
/// bind(SessionCtx::new(&Context::background()).with_value("req", 1u32)).unwrap();
/// let seen = go(|| current().and_then(|s| s.value_cloned::<u32, _>(&"req"))).join().unwrap();
/// assert_eq!(seen, Some(1));
/// unbind();
/// ```
pub fn go<F, T>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::spawn(wrap_fresh(crate::flow_session(), f))
}

/// Spawns a thread that runs `f` with `session` bound (Go `GoSession`).
///
/// # Panics
/// As `std::thread::spawn`: if the OS fails to create the thread.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{current, go_session};
///
/// let s = SessionCtx::new(&Context::background()).with_value("k", "v");
/// let v = go_session(s, || current().unwrap().value_cloned::<&str, _>(&"k")).join().unwrap();
/// assert_eq!(v, Some("v"));
/// ```
pub fn go_session<F, T>(session: impl Into<AnySession>, f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::spawn(wrap_fresh(Some(session.into()), f))
}

/// `std::thread::Builder` that hands a session to the new thread.
///
/// By default the thread gets the spawner's current session (as [`go`]); [`session`](Builder::session)
/// gives it another one, [`no_session`](Builder::no_session) none.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{current, Builder};
///
/// let s = SessionCtx::new(&Context::background()).with_value(1u8, 2u8);
/// let h = Builder::new()
///     .name("worker".into())
///     .stack_size(256 * 1024)
///     .session(s)
///     .spawn(|| (std::thread::current().name().map(str::to_owned), current().is_some()))
///     .unwrap();
/// assert_eq!(h.join().unwrap(), (Some("worker".to_owned()), true));
/// ```
#[derive(Debug)]
pub struct Builder {
    inner: std::thread::Builder,
    session: SessionChoice,
}

#[derive(Debug)]
enum SessionChoice {
    Inherit,
    Given(AnySession),
    None,
}

impl Builder {
    /// A builder whose threads inherit the spawner's session.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, scope, Builder};
    ///
    /// let map = SessionMap::new().with_value("k", 1u8);
    /// let h = scope(map, || Builder::new().spawn(|| current().unwrap().value_cloned::<u8, _>(&"k"))).unwrap();
    /// assert_eq!(h.join().unwrap(), Some(1)); // inherited from the spawner
    /// ```
    #[must_use]
    pub fn new() -> Builder {
        Builder { inner: std::thread::Builder::new(), session: SessionChoice::Inherit }
    }

    /// Names the thread.
    ///
    /// # Examples
    /// ```
    /// use localsession_std::Builder;
    /// let h = Builder::new().name("indexer".into()).spawn(|| std::thread::current().name().map(str::to_owned));
    /// assert_eq!(h.unwrap().join().unwrap().as_deref(), Some("indexer"));
    /// ```
    #[must_use]
    pub fn name(self, name: String) -> Builder {
        Builder { inner: self.inner.name(name), ..self }
    }

    /// Sets the thread's stack size.
    ///
    /// # Examples
    /// ```
    /// use localsession_std::Builder;
    /// // Deep recursion (4 000 frames of over 1 KiB each) needs more than the default 2 MiB stack:
    /// fn depth(n: u32) -> u32 {
    ///     let frame = std::hint::black_box([0u8; 1024]);
    ///     if n == 0 { u32::from(frame[0]) } else { 1 + depth(n - 1) }
    /// }
    /// let h = Builder::new().stack_size(32 * 1024 * 1024).spawn(|| depth(4_000)).unwrap();
    /// assert_eq!(h.join().unwrap(), 4_000);
    /// ```
    #[must_use]
    pub fn stack_size(self, size: usize) -> Builder {
        Builder { inner: self.inner.stack_size(size), ..self }
    }

    /// Runs the thread with `session` bound instead of the spawner's.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, scope, Builder};
    ///
    /// let spawner = SessionMap::new().with_value("who", "spawner");
    /// let given = SessionMap::new().with_value("who", "given");
    /// let who = || current().unwrap().value_cloned::<&str, _>(&"who");
    /// let h = scope(spawner, || Builder::new().session(given).spawn(who));
    /// assert_eq!(h.unwrap().join().unwrap(), Some("given"));
    /// ```
    #[must_use]
    pub fn session(self, session: impl Into<AnySession>) -> Builder {
        Builder { session: SessionChoice::Given(session.into()), ..self }
    }

    /// Runs the thread with no session bound.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, scope, Builder};
    ///
    /// let h = scope(SessionMap::new(), || Builder::new().no_session().spawn(|| current().is_none())).unwrap();
    /// assert!(h.join().unwrap());
    /// ```
    #[must_use]
    pub fn no_session(self) -> Builder {
        Builder { session: SessionChoice::None, ..self }
    }

    fn resolve(session: SessionChoice) -> Option<AnySession> {
        match session {
            SessionChoice::Inherit => crate::flow_session(),
            SessionChoice::Given(s) => Some(s),
            SessionChoice::None => None,
        }
    }

    /// Spawns the thread.
    ///
    /// # Errors
    /// The OS error if the thread could not be created (the session is dropped).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, Builder};
    ///
    /// let map = SessionMap::new();
    /// let h = Builder::new().session(map.clone()).spawn(|| current().unwrap().as_map().unwrap().insert("done", 1))?;
    /// h.join().unwrap();
    /// assert!(map.contains(&"done")); // the thread wrote into the shared map
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn spawn<F, T>(self, f: F) -> io::Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.inner.spawn(wrap_fresh(Self::resolve(self.session), f))
    }

    /// Spawns a scoped thread (see [`std::thread::scope`]).
    ///
    /// # Errors
    /// The OS error if the thread could not be created.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionCtx};
    /// use localsession_std::{current, Builder};
    /// let s = SessionCtx::new(&Context::background());
    /// let local = 5;
    /// std::thread::scope(|scope| {
    ///     let h = Builder::new().session(s).spawn_scoped(scope, || current().is_some() && local == 5).unwrap();
    ///     assert!(h.join().unwrap());
    /// });
    /// ```
    pub fn spawn_scoped<'scope, 'env, F, T>(
        self,
        scope: &'scope Scope<'scope, 'env>,
        f: F,
    ) -> io::Result<ScopedJoinHandle<'scope, T>>
    where
        F: FnOnce() -> T + Send + 'scope,
        T: Send + 'scope,
    {
        self.inner.spawn_scoped(scope, wrap_fresh(Self::resolve(self.session), f))
    }
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

/// Session-carrying spawns on a [`std::thread::Scope`].
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{bind, current, unbind, ScopeExt};
///
/// bind(SessionCtx::new(&Context::background()).with_value("k", 1u8)).unwrap();
/// let mut results = Vec::new();
/// std::thread::scope(|scope| {
///     let a = scope.go(|| current().and_then(|s| s.value_cloned::<u8, _>(&"k")));
///     results.push(a.join().unwrap());
/// });
/// assert_eq!(results, vec![Some(1)]);
/// unbind();
/// ```
pub trait ScopeExt<'scope> {
    /// Spawns a scoped thread with the caller's current session.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, ScopeExt};
    ///
    /// let lines = vec!["a", "b", "c"]; // borrowed by the scoped thread
    /// let map = SessionMap::new().with_value("req", 7u32);
    /// let (n, req) = localsession_std::scope(map, || {
    ///     let job = || (lines.len(), current().unwrap().value_cloned::<u32, _>(&"req"));
    ///     std::thread::scope(|s| s.go(job).join().unwrap())
    /// });
    /// assert_eq!((n, req), (3, Some(7)));
    /// ```
    fn go<F, T>(&'scope self, f: F) -> ScopedJoinHandle<'scope, T>
    where
        F: FnOnce() -> T + Send + 'scope,
        T: Send + 'scope;

    /// Spawns a scoped thread with `session` bound.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{current, ScopeExt};
    ///
    /// let maps = [SessionMap::new(), SessionMap::new()];
    /// std::thread::scope(|s| {
    ///     for (i, map) in maps.iter().enumerate() {
    ///         s.go_session(map.clone(), move || current().unwrap().as_map().unwrap().insert("worker", i));
    ///     }
    /// });
    /// assert_eq!(maps[1].value::<usize, _>(&"worker").as_deref(), Some(&1));
    /// ```
    fn go_session<F, T>(&'scope self, session: impl Into<AnySession>, f: F) -> ScopedJoinHandle<'scope, T>
    where
        F: FnOnce() -> T + Send + 'scope,
        T: Send + 'scope;
}

impl<'scope, 'env> ScopeExt<'scope> for Scope<'scope, 'env> {
    fn go<F, T>(&'scope self, f: F) -> ScopedJoinHandle<'scope, T>
    where
        F: FnOnce() -> T + Send + 'scope,
        T: Send + 'scope,
    {
        self.spawn(wrap_fresh(crate::flow_session(), f))
    }

    fn go_session<F, T>(&'scope self, session: impl Into<AnySession>, f: F) -> ScopedJoinHandle<'scope, T>
    where
        F: FnOnce() -> T + Send + 'scope,
        T: Send + 'scope,
    {
        self.spawn(wrap_fresh(Some(session.into()), f))
    }
}
