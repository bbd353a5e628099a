//! Bridges: what a unit of work carries besides its session — the spawner's `tracing` span
//! (feature `tracing`) and the session's OpenTelemetry context (feature `opentelemetry`).
//!
//! # What is carried, and from where
//!
//! - **The span** is captured where the unit is *created* — on the spawning thread, by
//!   [`go`](crate::go), [`Builder`](crate::Builder), [`in_current_session`](crate::in_current_session),
//!   the tokio and rayon adapters' wrappers and tokio's spawn hook — with `Span::current()`, and
//!   entered around every run or poll of the unit. A span tree then looks exactly as if every
//!   spawn had been written `.in_current_span()` (tracing's `Instrument`), also for spawns in
//!   library code you do not control (tokio's implicit mode). The span is *not* a session value:
//!   spans change inside a request far more often than its session, and the span a child belongs
//!   under is the one open where it was spawned.
//! - **The OpenTelemetry context** is a session value ([`OTEL_CONTEXT`](crate::OTEL_CONTEXT)):
//!   the request's context is put into its session once, at the root, and is
//!   `opentelemetry::Context::current()` wherever that session is installed — attached around
//!   every poll or run, detached after. A span started deep in a spawned task gets the request's
//!   span as its parent, and the request's baggage is visible there.
//!
//! # Opt-in, and free when off
//!
//! Each bridge needs its cargo feature *and* its runtime switch ([`set_carry_spans`],
//! [`set_carry_otel_context`]); both switches start off. With a switch off, a unit's creation
//! and each of its polls cost one relaxed load of the switch and nothing else; with the
//! feature off, [`Bridges`] is a zero-sized type and every call compiles to nothing. The
//! switches are process-wide, read where a unit is created (span) or installed (context), so a
//! unit created while a switch was on keeps what it captured.
//!
//! A unit spawned while the flow is suppressed ([`without_flow`](crate::without_flow)) captures
//! no span either: work that outlives its request must not stay under the request's span, as it
//! must not keep its session. And a unit whose session has *ended* (disabled when its request
//! completed, cancelled, past its deadline) enters neither its span nor its context any more:
//! a leftover task (a worker built lazily inside a request) that goes on to serve later requests
//! does not log them under the first request's span or trace them in its trace. The
//! [`SessionFieldsLayer`](crate::SessionFieldsLayer) likewise records no field of an ended
//! session.
//!
//! # Compared with doing it by hand
//! `tracing::Instrument::in_current_span` and OpenTelemetry's `FutureExt::with_context` do the
//! same for one future each, at each spawn you write. The bridges do it for every unit the
//! adapters carry a session into — threads, tokio tasks (explicit helpers and, in implicit
//! mode, plain `tokio::spawn`), rayon jobs — from one switch. They cost the same per poll
//! (enter + exit, attach + detach); see the P9 rows of `docs/performance.md`.

use core::marker::PhantomData;
use core::pin::Pin;
use core::task::{Context as TaskContext, Poll};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
#[cfg(any(feature = "tracing", feature = "opentelemetry"))]
use std::sync::atomic::{AtomicBool, Ordering};

use localsession_core::AnySession;

#[cfg(feature = "tracing")]
static CARRY_SPANS: AtomicBool = AtomicBool::new(false);
#[cfg(feature = "opentelemetry")]
static CARRY_OTEL: AtomicBool = AtomicBool::new(false);

/// Turns the span bridge on or off, process-wide, and returns whether it was on. While on,
/// every unit the adapters create captures the spawner's current span and enters it around
/// each run or poll (see the [crate docs](crate#bridges)).
///
/// # Examples
/// ```
/// use localsession_std::{carries_spans, go, set_carry_spans};
/// use tracing::Span;
///
/// tracing::subscriber::set_global_default(tracing_subscriber::registry()).unwrap();
/// set_carry_spans(true);
/// let request = tracing::info_span!("request");
/// let seen = request.in_scope(|| go(|| Span::current().id()).join().unwrap());
/// assert_eq!(seen, request.id()); // the thread ran inside the spawner's span
/// assert!(carries_spans());
/// set_carry_spans(false);
/// ```
#[cfg(feature = "tracing")]
#[cfg_attr(docsrs, doc(cfg(feature = "tracing")))]
pub fn set_carry_spans(on: bool) -> bool {
    // Relaxed: a switch, not a synchronization point; a unit sees either setting.
    CARRY_SPANS.swap(on, Ordering::Relaxed)
}

/// Whether the span bridge is on (see [`set_carry_spans`]).
///
/// # Examples
/// ```
/// assert!(!localsession_std::carries_spans()); // off until switched on
/// ```
#[cfg(feature = "tracing")]
#[cfg_attr(docsrs, doc(cfg(feature = "tracing")))]
#[inline]
#[must_use]
pub fn carries_spans() -> bool {
    CARRY_SPANS.load(Ordering::Relaxed)
}

/// Turns the OpenTelemetry context bridge on or off, process-wide, and returns whether it was
/// on. While on, wherever the adapters install a session that holds an
/// [`OTEL_CONTEXT`](crate::OTEL_CONTEXT), that context is attached (it is
/// `opentelemetry::Context::current()`) until the session is swapped out again.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{go_session, set_carry_otel_context, OTEL_CONTEXT};
///
/// #[derive(Debug, PartialEq)]
/// struct Tenant(&'static str);
/// set_carry_otel_context(true);
/// let otel = opentelemetry::Context::new().with_value(Tenant("acme"));
/// let session = SessionCtx::new(&Context::background()).with(&OTEL_CONTEXT, otel);
/// let seen = go_session(session, || opentelemetry::Context::map_current(|cx| cx.get::<Tenant>().map(|t| t.0)));
/// assert_eq!(seen.join().unwrap(), Some("acme"));
/// set_carry_otel_context(false);
/// ```
#[cfg(feature = "opentelemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
pub fn set_carry_otel_context(on: bool) -> bool {
    // Relaxed: as `set_carry_spans`.
    CARRY_OTEL.swap(on, Ordering::Relaxed)
}

/// Whether the OpenTelemetry context bridge is on (see [`set_carry_otel_context`]).
///
/// # Examples
/// ```
/// assert!(!localsession_std::carries_otel_context());
/// ```
#[cfg(feature = "opentelemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
#[inline]
#[must_use]
pub fn carries_otel_context() -> bool {
    CARRY_OTEL.load(Ordering::Relaxed)
}

/// What a unit carries besides its session: the span it was created in and the OpenTelemetry
/// context of its session, each only while its bridge is on (see the [crate docs](crate#bridges)).
/// Zero-sized without the `tracing` and `opentelemetry` features. Adapters capture it where a
/// unit is created and [`enter`](Bridges::enter) it around each run or poll.
///
/// # Examples
/// ```
/// use localsession_std::Bridges;
/// // Both bridges are off: nothing is captured, entering costs nothing.
/// let bridges = Bridges::capture(None);
/// assert!(bridges.is_empty());
/// let _guard = bridges.enter();
/// ```
#[derive(Clone, Default)]
pub struct Bridges {
    #[cfg(feature = "tracing")]
    span: Option<tracing::Span>,
    #[cfg(feature = "opentelemetry")]
    otel: Option<opentelemetry::Context>,
}

impl Bridges {
    /// Nothing to carry.
    ///
    /// # Examples
    /// ```
    /// assert!(localsession_std::Bridges::none().is_empty());
    /// ```
    #[must_use]
    pub const fn none() -> Bridges {
        Bridges {
            #[cfg(feature = "tracing")]
            span: None,
            #[cfg(feature = "opentelemetry")]
            otel: None,
        }
    }

    /// Whether either bridge is switched on ([`carries_spans`], [`carries_otel_context`]);
    /// always `false` without the `tracing` and `opentelemetry` features. Lets a hot path skip
    /// capturing and entering when there is nothing to carry (two relaxed loads).
    ///
    // Linked where the feature is on, to the crate's Bridges section otherwise.
    #[cfg_attr(feature = "tracing", doc = "[`carries_spans`]: crate::carries_spans")]
    #[cfg_attr(not(feature = "tracing"), doc = "[`carries_spans`]: crate#bridges")]
    #[cfg_attr(feature = "opentelemetry", doc = "[`carries_otel_context`]: crate::carries_otel_context")]
    #[cfg_attr(not(feature = "opentelemetry"), doc = "[`carries_otel_context`]: crate#bridges")]
    ///
    /// # Examples
    /// ```
    /// assert!(!localsession_std::Bridges::switched_on()); // both bridges start off
    /// ```
    #[inline]
    #[must_use]
    pub fn switched_on() -> bool {
        let on = false;
        #[cfg(feature = "tracing")]
        let on = on || crate::carries_spans();
        #[cfg(feature = "opentelemetry")]
        let on = on || crate::carries_otel_context();
        on
    }

    /// Captures, for a unit about to be created here with `session`: the current span (span
    /// bridge on, a span entered, the flow not suppressed) and `session`'s [`OTEL_CONTEXT`]
    /// (context bridge on).
    ///
    #[cfg_attr(feature = "opentelemetry", doc = "[`OTEL_CONTEXT`]: crate::OTEL_CONTEXT")]
    #[cfg_attr(not(feature = "opentelemetry"), doc = "[`OTEL_CONTEXT`]: crate#bridges")]
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::Bridges;
    /// let session = SessionMap::new().into();
    /// assert!(Bridges::capture(Some(&session)).is_empty()); // bridges off
    /// ```
    #[inline]
    #[must_use]
    pub fn capture(session: Option<&AnySession>) -> Bridges {
        let _ = session;
        Bridges {
            #[cfg(feature = "tracing")]
            span: capture_span(),
            #[cfg(feature = "opentelemetry")]
            otel: otel_context_of(session),
        }
    }

    /// Only the current span (see [`capture`](Bridges::capture)), for a unit whose session is
    /// read again at each install (tokio's implicit mode).
    ///
    /// # Examples
    /// ```
    /// assert!(localsession_std::Bridges::current_span().is_empty()); // bridge off
    /// ```
    #[inline]
    #[must_use]
    pub fn current_span() -> Bridges {
        Bridges {
            #[cfg(feature = "tracing")]
            span: capture_span(),
            #[cfg(feature = "opentelemetry")]
            otel: None,
        }
    }

    /// Only `session`'s OpenTelemetry context (see [`capture`](Bridges::capture)).
    ///
    /// # Examples
    /// ```
    /// assert!(localsession_std::Bridges::session_context(None).is_empty());
    /// ```
    #[inline]
    #[must_use]
    pub fn session_context(session: Option<&AnySession>) -> Bridges {
        let _ = session;
        Bridges {
            #[cfg(feature = "tracing")]
            span: None,
            #[cfg(feature = "opentelemetry")]
            otel: otel_context_of(session),
        }
    }

    /// Whether nothing was captured (entering does nothing).
    ///
    /// # Examples
    /// ```
    /// assert!(localsession_std::Bridges::default().is_empty());
    /// ```
    #[inline]
    #[must_use]
    pub fn is_empty(&self) -> bool {
        let empty = true;
        #[cfg(feature = "tracing")]
        let empty = empty && self.span.is_none();
        #[cfg(feature = "opentelemetry")]
        let empty = empty && self.otel.is_none();
        empty
    }

    /// Enters the captured span and attaches the captured OpenTelemetry context until the
    /// guard is dropped (on the same thread: the guard is `!Send`).
    ///
    /// # Examples
    /// ```
    /// let bridges = localsession_std::Bridges::none();
    /// {
    ///     let _guard = bridges.enter();
    ///     // ... run the unit ...
    /// }
    /// ```
    #[inline]
    pub fn enter(&self) -> BridgeGuard<'_> {
        if self.is_empty() || installed_session_ended() {
            return BridgeGuard::empty();
        }
        BridgeGuard {
            #[cfg(feature = "opentelemetry")]
            otel: self.otel.clone().map(opentelemetry::Context::attach),
            #[cfg(feature = "tracing")]
            span: self.span.as_ref().map(|s| SpanGuard::Borrowed(s.enter())),
            _not_send: PhantomData,
        }
    }

    /// [`enter`](Bridges::enter), consuming the captured values, for a guard that must outlive
    /// this value (a rayon job's folder, a tokio hook's frame).
    ///
    /// # Examples
    /// ```
    /// let guard = localsession_std::Bridges::none().into_guard();
    /// drop(guard);
    /// ```
    #[inline]
    pub fn into_guard(self) -> BridgeGuard<'static> {
        if self.is_empty() || installed_session_ended() {
            return BridgeGuard::empty();
        }
        self.into_guard_unchecked()
    }

    /// [`into_guard`](Bridges::into_guard) without its check that the session installed on
    /// this thread has not ended: for an executor hook that holds the unit's session and has
    /// checked it itself ([`AnySession::is_valid`]), which spares a thread-local read per poll.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::Bridges;
    /// let session = SessionMap::new().into();
    /// let bridges = Bridges::session_context(Some(&session));
    /// let guard = if session.is_valid() { bridges.into_guard_unchecked() } else { Bridges::none().into_guard() };
    /// drop(guard);
    /// ```
    #[inline]
    pub fn into_guard_unchecked(self) -> BridgeGuard<'static> {
        // A span is kept behind an `Arc` and entered by id: the guard stays two words.
        #[cfg(feature = "tracing")]
        if self.span.is_some() {
            return Bridges::enter_shared(Arc::new(self));
        }
        BridgeGuard {
            #[cfg(feature = "opentelemetry")]
            otel: self.otel.map(opentelemetry::Context::attach),
            #[cfg(feature = "tracing")]
            span: None,
            _not_send: PhantomData,
        }
    }

    /// [`enter`](Bridges::enter) for bridges shared with a table that keeps them (tokio's
    /// implicit mode keeps a task's span in its entry): the guard holds `shared` and enters
    /// and exits the span by id through the span's subscriber, without cloning the span.
    /// Like [`into_guard_unchecked`](Bridges::into_guard_unchecked), it does not check that the
    /// unit's session has not ended: the caller (an executor hook holding the session) does.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// let shared = Arc::new(localsession_std::Bridges::none());
    /// let guard = localsession_std::Bridges::enter_shared(shared.clone());
    /// drop(guard);
    /// ```
    pub fn enter_shared(shared: Arc<Bridges>) -> BridgeGuard<'static> {
        // Without the `tracing` and `opentelemetry` features there is nothing to enter.
        #[cfg(not(any(feature = "tracing", feature = "opentelemetry")))]
        drop(shared);
        BridgeGuard {
            #[cfg(feature = "opentelemetry")]
            otel: shared.otel.clone().map(opentelemetry::Context::attach),
            #[cfg(feature = "tracing")]
            span: match &shared.span {
                Some(span) => {
                    span.with_subscriber(|(id, dispatch)| dispatch.enter(id));
                    Some(SpanGuard::Shared(SharedEntered(shared)))
                }
                None => None,
            },
            _not_send: PhantomData,
        }
    }

    /// `future`, entering these bridges around each of its polls (tracing's `Instrumented`
    /// and OpenTelemetry's `WithContext` in one).
    ///
    /// # Examples
    /// ```
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     use std::task::{Context, Poll, Waker};
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = Context::from_waker(Waker::noop());
    /// #     loop { if let Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v } }
    /// # }
    /// let fut = localsession_std::Bridges::none().wrap(async { 1 + 1 });
    /// assert_eq!(block_on(fut), 2);
    /// ```
    pub fn wrap<F: Future>(self, future: F) -> Bridged<F> {
        Bridged { bridges: self, inner: future }
    }
}

impl fmt::Debug for Bridges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Bridges");
        #[cfg(feature = "tracing")]
        d.field("span", &self.span);
        #[cfg(feature = "opentelemetry")]
        d.field("otel", &self.otel.is_some());
        d.finish()
    }
}

#[cfg(feature = "tracing")]
#[inline]
fn capture_span() -> Option<tracing::Span> {
    if !carries_spans() || crate::is_flow_suppressed() {
        return None;
    }
    let span = tracing::Span::current();
    if span.is_none() { None } else { Some(span) }
}

#[cfg(feature = "opentelemetry")]
#[inline]
fn otel_context_of(session: Option<&AnySession>) -> Option<opentelemetry::Context> {
    if !carries_otel_context() {
        return None;
    }
    session?.get_cloned(&crate::OTEL_CONTEXT)
}

#[cfg(feature = "tracing")]
enum SpanGuard<'a> {
    Borrowed(#[allow(dead_code)] tracing::span::Entered<'a>),
    Shared(#[allow(dead_code)] SharedEntered),
}

/// A span entered by id (see [`Bridges::enter_shared`]); exits it when dropped.
#[cfg(feature = "tracing")]
struct SharedEntered(Arc<Bridges>);

#[cfg(feature = "tracing")]
impl Drop for SharedEntered {
    fn drop(&mut self) {
        if let Some(span) = &self.0.span {
            span.with_subscriber(|(id, dispatch)| dispatch.exit(id));
        }
    }
}

/// The bridges of a unit, entered (see [`Bridges::enter`]); dropping it detaches the
/// OpenTelemetry context and exits the span, in that order. `!Send`.
///
/// # Examples
/// ```
/// let bridges = localsession_std::Bridges::none();
/// let guard: localsession_std::BridgeGuard<'_> = bridges.enter();
/// drop(guard);
/// ```
#[must_use = "dropping the guard exits the span and detaches the context"]
pub struct BridgeGuard<'a> {
    // Dropped in declaration order: the context attached last is detached first.
    #[cfg(feature = "opentelemetry")]
    #[allow(dead_code)]
    otel: Option<opentelemetry::ContextGuard>,
    #[cfg(feature = "tracing")]
    #[allow(dead_code)]
    span: Option<SpanGuard<'a>>,
    _not_send: PhantomData<(*const (), &'a ())>,
}

impl BridgeGuard<'_> {
    /// A guard that entered nothing.
    fn empty() -> Self {
        BridgeGuard {
            #[cfg(feature = "opentelemetry")]
            otel: None,
            #[cfg(feature = "tracing")]
            span: None,
            _not_send: PhantomData,
        }
    }
}

/// Whether the session installed on this thread has ended (disabled, cancelled, past its
/// deadline): its unit then enters no span and attaches no context, so work that outlives its
/// request (a leftover worker serving later requests) does not log or trace under the ended
/// request's span, trace or baggage — the bridges' half of "sessions end with their request".
/// A unit without a session is not affected. One thread-local read and a validity check, only
/// where something was captured.
fn installed_session_ended() -> bool {
    crate::with_current(|s| s.is_some_and(|s| !s.is_valid()))
}

impl fmt::Debug for BridgeGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeGuard").finish_non_exhaustive()
    }
}

pin_project_lite::pin_project! {
    /// A future that enters its [`Bridges`] around each poll (see [`Bridges::wrap`]). Its drop
    /// runs outside them.
    ///
    /// # Examples
    /// ```
    /// use localsession_std::{Bridged, Bridges};
    /// let fut: Bridged<_> = Bridges::none().wrap(async {});
    /// # drop(fut);
    /// ```
    pub struct Bridged<F> {
        bridges: Bridges,
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for Bridged<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _entered = this.bridges.enter();
        this.inner.poll(cx)
    }
}

impl<F> fmt::Debug for Bridged<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bridged").field("bridges", &self.bridges).finish_non_exhaustive()
    }
}
