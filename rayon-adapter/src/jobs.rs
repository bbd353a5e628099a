//! `join`, `scope`, `spawn` and pool jobs that carry the caller's session.
//!
//! Every wrapper captures [`localsession_std::flow_session`] where it is called and installs it
//! around the job with a scope: when the job ends (returns or panics), its thread has exactly
//! what it had bound before. That matters in two places:
//! - inline runs: `rayon::join` runs its first closure on the calling thread, and a blocked
//!   worker runs other jobs on its own stack; the caller's binding survives them;
//! - leaks: a `bind` inside a wrapped job ends with the job, so no later job on that worker sees
//!   it. A *plain* `pool.spawn(|| bind(x))` still leaks into its worker (rayon has no per-job
//!   hook to clean up after it); submit jobs through [`spawn_in`] / [`install`] instead.

use localsession_core::AnySession;
use localsession_std::Bridges;
use rayon::{Scope, ThreadPool};

use crate::install::Installed;

/// `rayon::join` whose closures both run with the caller's session; the thread that runs each
/// one (the caller itself, for `a`) keeps its own binding afterwards, also on panic.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_std::{bind, current, scope};
///
/// let caller = SessionMap::new().with_value("who", "caller");
/// let who = || current().and_then(|s| s.value_cloned::<&str, _>(&"who"));
/// let (a, b, after) = scope(caller, || {
///     let (a, b) = localsession_rayon::join(
///         || {
///             let a = who();
///             bind(SessionMap::new().with_value("who", "job")).unwrap(); // ends with this closure
///             a
///         },
///         who,
///     );
///     (a, b, who())
/// });
/// assert_eq!((a, b, after), (Some("caller"), Some("caller"), Some("caller")));
/// ```
pub fn join<A, B, RA, RB>(a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    let session = localsession_std::flow_session();
    let for_b = session.clone();
    let bridges = Bridges::capture(session.as_ref());
    rayon::join(in_session(session, bridges.clone(), a), in_session(for_b, bridges, b))
}

/// `rayon::scope` whose body runs with the caller's session. Spawns made in the scope with
/// [`ScopeExt::spawn_in_current_session`] carry the session current where they are spawned;
/// plain `s.spawn` jobs carry nothing.
///
/// # Examples
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use localsession_core::SessionMap;
/// use localsession_rayon::ScopeExt;
/// use localsession_std::{current, scope};
///
/// let seen = AtomicUsize::new(0);
/// scope(SessionMap::new(), || {
///     localsession_rayon::scope(|s| {
///         for _ in 0..8 {
///             s.spawn_in_current_session(|_| {
///                 if current().is_some() {
///                     seen.fetch_add(1, Ordering::Relaxed);
///                 }
///             });
///         }
///     })
/// });
/// assert_eq!(seen.load(Ordering::Relaxed), 8);
/// ```
pub fn scope<'scope, OP, R>(op: OP) -> R
where
    OP: FnOnce(&Scope<'scope>) -> R + Send,
    R: Send,
{
    let session = localsession_std::flow_session();
    let bridges = Bridges::capture(session.as_ref());
    rayon::scope(move |s| {
        let _installed = Installed::new(session, bridges);
        op(s)
    })
}

/// Session-carrying spawns on a [`rayon::Scope`].
///
/// # Examples
/// ```
/// use std::sync::Mutex;
/// use localsession_core::SessionMap;
/// use localsession_rayon::ScopeExt;
/// use localsession_std::current;
///
/// let seen = Mutex::new(Vec::new());
/// rayon::scope(|s| {
///     s.spawn_with_session(Some(SessionMap::new().into()), |_| seen.lock().unwrap().push(current().is_some()));
///     s.spawn_with_session(None, |_| seen.lock().unwrap().push(current().is_some()));
/// });
/// let mut seen = seen.into_inner().unwrap();
/// seen.sort();
/// assert_eq!(seen, vec![false, true]);
/// ```
pub trait ScopeExt<'scope> {
    /// Spawns `body` in the scope with the session current *now*, on the thread running the
    /// scope's body (none while the flow is suppressed). A plain `rayon::scope` called from
    /// outside the pool runs its body on a worker that has no session: open the scope with
    /// [`scope`] to carry the caller's.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_rayon::ScopeExt;
    /// use localsession_std::{current, scope};
    ///
    /// let mut seen = None;
    /// scope(SessionMap::new().with_value("k", 1u8), || {
    ///     localsession_rayon::scope(|s| {
    ///         s.spawn_in_current_session(|_| seen = current().and_then(|c| c.value_cloned::<u8, _>(&"k")))
    ///     })
    /// });
    /// assert_eq!(seen, Some(1));
    /// ```
    fn spawn_in_current_session<BODY>(&self, body: BODY)
    where
        BODY: FnOnce(&Scope<'scope>) + Send + 'scope;

    /// Spawns `body` in the scope with `session` (or none).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_rayon::ScopeExt;
    /// use localsession_std::current;
    ///
    /// let mut seen = false;
    /// rayon::scope(|s| s.spawn_with_session(Some(SessionMap::new().into()), |_| seen = current().is_some()));
    /// assert!(seen);
    /// ```
    fn spawn_with_session<BODY>(&self, session: Option<AnySession>, body: BODY)
    where
        BODY: FnOnce(&Scope<'scope>) + Send + 'scope;
}

impl<'scope> ScopeExt<'scope> for Scope<'scope> {
    fn spawn_in_current_session<BODY>(&self, body: BODY)
    where
        BODY: FnOnce(&Scope<'scope>) + Send + 'scope,
    {
        self.spawn_with_session(localsession_std::flow_session(), body);
    }

    fn spawn_with_session<BODY>(&self, session: Option<AnySession>, body: BODY)
    where
        BODY: FnOnce(&Scope<'scope>) + Send + 'scope,
    {
        let bridges = Bridges::capture(session.as_ref());
        self.spawn(move |s| {
            let _installed = Installed::new(session, bridges);
            body(s);
        });
    }
}

/// `rayon::spawn` (the global pool) with the caller's session; the worker has nothing of the
/// job's left bound when the job ends, panic or not.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_std::{current, scope};
///
/// let (tx, rx) = std::sync::mpsc::channel();
/// scope(SessionMap::new().with_value("req", 9u32), || {
///     localsession_rayon::spawn(move || tx.send(current().and_then(|s| s.value_cloned::<u32, _>(&"req"))).unwrap())
/// });
/// assert_eq!(rx.recv().unwrap(), Some(9));
/// ```
pub fn spawn<F>(f: F)
where
    F: FnOnce() + Send + 'static,
{
    rayon::spawn(in_flow_session(f));
}

/// `pool.spawn` with the caller's session; whatever the job binds ends with it, so later jobs
/// on that worker see nothing of it.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_std::{bind, current};
///
/// let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
/// let (tx, rx) = std::sync::mpsc::channel();
/// localsession_rayon::spawn_in(&pool, || bind(SessionMap::new()).unwrap()); // a leaked bind...
/// pool.spawn(move || tx.send(current().is_none()).unwrap()); // ...that a later plain job never sees
/// assert!(rx.recv().unwrap());
/// ```
pub fn spawn_in<F>(pool: &ThreadPool, f: F)
where
    F: FnOnce() + Send + 'static,
{
    pool.spawn(in_flow_session(f));
}

/// `pool.install` with the caller's session: `f` runs on one of the pool's workers (or inline if
/// the caller is one) with the caller's session, and the worker keeps nothing of it afterwards.
/// Parallel iterators created inside `f` with `.in_current_session()` carry that session on.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
/// use localsession_rayon::ParallelIteratorExt;
/// use localsession_std::{current, scope};
/// use rayon::prelude::*;
///
/// let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
/// let missing = scope(SessionMap::new(), || {
///     localsession_rayon::install(&pool, || (0..1000).into_par_iter().filter(|_| current().is_none()).in_current_session().count())
/// });
/// assert_eq!(missing, 0);
/// ```
pub fn install<F, R>(pool: &ThreadPool, f: F) -> R
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    pool.install(in_flow_session(f))
}

/// `f` with the caller's session and bridges (see [`in_session`]).
fn in_flow_session<F, R>(f: F) -> impl FnOnce() -> R + Send
where
    F: FnOnce() -> R + Send,
{
    let session = localsession_std::flow_session();
    let bridges = Bridges::capture(session.as_ref());
    in_session(session, bridges, f)
}

/// `f` with `session` (and `bridges`) installed for its run, the thread's previous binding
/// restored after.
fn in_session<F, R>(session: Option<AnySession>, bridges: Bridges, f: F) -> impl FnOnce() -> R + Send
where
    F: FnOnce() -> R + Send,
{
    move || {
        let _installed = Installed::new(session, bridges);
        f()
    }
}
