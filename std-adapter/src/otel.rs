//! OpenTelemetry (feature `opentelemetry`): the session's OpenTelemetry context
//! ([`OTEL_CONTEXT`], carried by the bridge of the `bridge` module), and [`MetaInfo`] persistent
//! values to and from OpenTelemetry baggage.
//!
//! # The context as a session value
//! A request's OpenTelemetry context (its span, its baggage) belongs to the request, so it is
//! put into the request's session once, under [`OTEL_CONTEXT`]. With
//! [`set_carry_otel_context`](crate::set_carry_otel_context) on, every install of that session
//! by the adapters (a thread from `go`, a tokio task's poll, a rayon job) attaches it for as long
//! as the session is installed, so `opentelemetry::Context::current()` is the request's context
//! in every unit that carries the request's session — including plain `tokio::spawn` in the
//! tokio adapter's implicit mode.
//!
//! # Baggage and metainfo
//!
//! Both carry string pairs that travel with a request across services: Kitex's persistent
//! metainfo (`rpc-persist-*` headers) and W3C baggage (the `baggage` header). These functions let
//! a service that receives one propagate the other. Only *persistent* values map to baggage:
//! transient values travel one hop, which baggage has no notion of. Baggage metadata (the
//! `;property` part) has no counterpart in `MetaInfo` and is dropped.

use std::fmt;

use localsession_core::{Context, Key, MetaInfo};
use opentelemetry::baggage::Baggage;

/// The session value holding the request's OpenTelemetry context. Attached wherever the session
/// is installed while [`set_carry_otel_context`](crate::set_carry_otel_context) is on.
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{current, scope, OTEL_CONTEXT};
///
/// let request_cx = opentelemetry::Context::current(); // e.g. with the server span
/// let session = SessionCtx::new(&Context::background()).with(&OTEL_CONTEXT, request_cx);
/// let carried = scope(session, || current().unwrap().get_cloned(&OTEL_CONTEXT));
/// assert!(carried.is_some());
/// ```
pub static OTEL_CONTEXT: Key<opentelemetry::Context> = Key::new("opentelemetry.context");

/// Every persistent value of `ctx`'s metainfo, as baggage. Values that baggage refuses (a key
/// that is not a W3C baggage token, more than 64 entries, more than 8192 bytes in all) are left
/// out; [`try_baggage_from_metainfo`] reports them instead.
///
/// # Examples
/// ```
/// use localsession_core::{Context, MetaInfo};
/// use localsession_std::baggage_from_metainfo;
///
/// let ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
/// let ctx = MetaInfo::with_transient(&ctx, "hop", "1"); // one hop only: not baggage
/// let baggage = baggage_from_metainfo(&ctx);
/// assert_eq!(baggage.get("tenant").map(|v| v.as_str()), Some("acme"));
/// assert_eq!(baggage.len(), 1);
/// ```
#[must_use]
pub fn baggage_from_metainfo(ctx: &Context) -> Baggage {
    let mut baggage = Baggage::new();
    for (key, value) in MetaInfo::of(ctx).persistent_values() {
        let _ = baggage.insert(key.to_owned(), value.to_owned());
    }
    baggage
}

/// Every persistent value of `ctx`'s metainfo, as baggage, or an error naming the first value
/// that baggage refuses.
///
/// # Errors
/// [`BaggageError`] naming the key, if a key is not a valid W3C baggage key or the baggage would
/// exceed its limits (64 entries, 8192 bytes).
///
/// # Examples
/// ```
/// use localsession_core::{Context, MetaInfo};
/// use localsession_std::try_baggage_from_metainfo;
///
/// let ok = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
/// assert_eq!(try_baggage_from_metainfo(&ok).unwrap().len(), 1);
///
/// let bad = MetaInfo::with_persistent(&Context::background(), "not a token", "x");
/// let err = try_baggage_from_metainfo(&bad).unwrap_err();
/// assert_eq!(err.key(), "not a token");
/// assert!(err.to_string().contains("\"not a token\""));
/// ```
pub fn try_baggage_from_metainfo(ctx: &Context) -> Result<Baggage, BaggageError> {
    let mut baggage = Baggage::new();
    for (key, value) in MetaInfo::of(ctx).persistent_values() {
        let _ = baggage.insert(key.to_owned(), value.to_owned());
        // `Baggage::insert` refuses silently; what it kept tells whether it accepted the pair.
        if baggage.get(key).map(|v| v.as_str()) != Some(value) {
            return Err(BaggageError { key: key.to_owned() });
        }
    }
    Ok(baggage)
}

/// `ctx` with every entry of `baggage` as a persistent metainfo value (replacing a persistent
/// value of the same key). Transient values of `ctx` are kept; baggage metadata is dropped.
///
/// # Examples
/// ```
/// use localsession_core::{Context, MetaInfo};
/// use localsession_std::metainfo_with_baggage;
/// use opentelemetry::baggage::Baggage;
///
/// let mut baggage = Baggage::new();
/// let _ = baggage.insert("tenant", "acme");
/// let ctx = metainfo_with_baggage(&Context::background(), &baggage);
/// assert_eq!(MetaInfo::of(&ctx).persistent("tenant"), Some("acme"));
/// ```
#[must_use]
pub fn metainfo_with_baggage(ctx: &Context, baggage: &Baggage) -> Context {
    if baggage.is_empty() {
        return ctx.clone();
    }
    let mut meta = MetaInfo::of(ctx).clone();
    for (key, (value, _metadata)) in baggage {
        meta.set_persistent(key.as_str(), value.as_str());
    }
    MetaInfo::attach(ctx, meta)
}

/// A persistent metainfo value that OpenTelemetry baggage refuses (see
/// [`try_baggage_from_metainfo`]).
///
/// # Examples
/// ```
/// use localsession_core::{Context, MetaInfo};
/// let ctx = MetaInfo::with_persistent(&Context::background(), "a,b", "x");
/// let err = localsession_std::try_baggage_from_metainfo(&ctx).unwrap_err();
/// assert_eq!(err.key(), "a,b");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaggageError {
    key: String,
}

impl BaggageError {
    /// The metainfo key that baggage refused.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// let ctx = MetaInfo::with_persistent(&Context::background(), "", "x");
    /// assert_eq!(localsession_std::try_baggage_from_metainfo(&ctx).unwrap_err().key(), "");
    /// ```
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for BaggageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "persistent metainfo value {:?} cannot be baggage: the key is not a W3C baggage token, \
             or the baggage would exceed 64 entries or 8192 bytes",
            self.key
        )
    }
}

impl std::error::Error for BaggageError {}
