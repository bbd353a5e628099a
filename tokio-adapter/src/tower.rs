//! Context backup across real RPC: tower middleware for servers and clients (Kitex
//! `server.WithContextBackup` / `client.WithContextBackup`). Feature `tower`.
//!
//! - [`ServerBackupLayer`]: for each request, builds a [`Context`] from the request headers
//!   with its [`Propagator`]s (default: [`KitexMetainfo`] — `rpc-persist-*` persistent values,
//!   `rpc-transit-*` transient values sent by the caller) and backs it up as the request's
//!   session (`SessionCtx::new(ctx)`, Kitex `BackupCtx`) around every poll of the handler's
//!   future, its `call`, and its drop; tasks the handler spawns with this crate's helpers (or
//!   plain `tokio::spawn` in implicit mode) inherit it. When the response future completes (`Ok`
//!   or `Err`) or is dropped before completing (the client went away), the backup is *ended*
//!   (`SessionCtx::disable`): a task the request left behind (a `tower::buffer::Buffer` worker,
//!   a pooled connection task, a detached spawn) can no longer use the request's identity —
//!   [`backed_up_ctx`](localsession_core::backed_up_ctx) returns `None` there and
//!   [`ClientBackup`] refuses to send. Opt out with
//!   [`ServerBackupLayer::keep_alive`]. The context is also inserted in the request's
//!   extensions. It is prepared for backward values
//!   ([`MetaInfo::send_backward_value`]), which the response carries as `rpc-backward-*`
//!   headers. Malformed or oversize headers are answered with `400 Bad Request` and a message
//!   naming the header; the handler is not called. Behind a gRPC server (tonic), use
//!   [`ServerBackupLayer::grpc`] (feature `grpc`): the answer is then the gRPC status
//!   `INVALID_ARGUMENT` with the same message ([`Rejection`] chooses the answer).
//! - [`SessionLayer`]: the same request lifecycle for a session of your own, made from each
//!   request by your closure (from its headers and extensions).
//! - [`ClientBackupLayer`]: for each outgoing request, takes the request's [`Context`] (from its
//!   extensions; `Context::background()` if none), recovers what it lacks from the backup with
//!   [`recover_ctx_on_demands`] and your handler `(prev, cur) -> (ctx, backup)`, and writes it
//!   into the request headers with its propagators: by default the persistent metainfo and this
//!   hop's transient metainfo. When the handler accepts the backup, each propagator also
//!   recovers what it carries ([`Propagator::recover`]): with [`W3cTraceContext`], a call made
//!   with no trace context of its own carries the request's. Transient values received from upstream are not forwarded (they
//!   travel one hop). The backward values of the response are put in its extensions as
//!   [`BackwardValues`]. If the session where the call runs has ended, the call fails with
//!   [`ClientBackupError::EndedSession`] instead of sending an old request's identity.
//!
//! # Kitex/Hertz metainfo headers (gopkg's convention)
//! Keys are mapped as CGI variables, as bytedance/gopkg's `metainfo` does, so that Go peers and
//! this crate see the same keys:
//!
//! | header | metainfo |
//! |---|---|
//! | `rpc-persist-abc-def: v` | persistent `ABC_DEF = v` |
//! | `rpc-transit-x-y: v` | transient `X_Y = v` (received from upstream: not forwarded) |
//! | `rpc-backward-k: v` (response) | backward `K = v` |
//!
//! On receive the key after the prefix is upper-cased and `-` becomes `_`
//! ([`header_to_cgi_key`]); on send it is lower-cased and `_` becomes `-`
//! ([`cgi_key_to_header`]). So a key round-trips only in CGI form (`[A-Z0-9_]`): `tenant` is
//! sent as `rpc-persist-tenant` and received as `TENANT`. [`KitexMetainfo::verbatim_keys`]
//! keeps this crate's earlier mapping (header key = metainfo key) for peers that need it.
//!
//! | case | receive | send |
//! |---|---|---|
//! | empty key (`rpc-persist-`) | skipped (as gopkg) | error |
//! | empty value | skipped (as gopkg) | not sent |
//! | value not UTF-8 | `400` | — |
//! | key not a header token, value with control characters or edge whitespace | — | error (gopkg drops it) |
//! | more than [`KitexMetainfo::max_entries`] / [`KitexMetainfo::max_bytes`] | `400` | error |
//! | backward value that cannot be a header | — | dropped (the response is made) |
//!
//! On send, errors are [`ClientBackupError::Header`] rather than gopkg's silent drop: the
//! metainfo is this program's own data, and a lost tenant is worse than an error.
//!
//! # gRPC (tonic)
//! gRPC metadata *are* HTTP/2 headers, and tonic's server and channel are tower services over
//! `http::Request`/`http::Response`, so the same layers serve gRPC: put
//! `ServerBackupLayer::new().grpc()` in `tonic::transport::Server::builder().layer(..)`, and wrap
//! the `Channel` a (generated or hand-written) client is built on in [`ClientBackupLayer`]. The
//! `rpc-persist-*`/`rpc-transit-*` metadata are then Kitex's gRPC metainfo keys, and
//! `traceparent`/`tracestate`/`baggage` those of OpenTelemetry's gRPC instrumentation. A `400`
//! would reach a gRPC client as `INTERNAL`, so in gRPC mode ([`GrpcInvalidArgument`], feature
//! `grpc`) an unreadable header is answered with `grpc-status: 3` (`INVALID_ARGUMENT`) and a
//! `grpc-message` naming the header. A refused client call reaches tonic as an error of the
//! channel, which tonic reports as a `Status` carrying its message.
//!
//! # Examples
//! A handler that calls another service: the tenant its caller sent is forwarded without a
//! context being passed along.
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use localsession_core::Context;
//! use localsession_tokio::tower::{ClientBackupLayer, ServerBackupLayer};
//! use tower::{Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let downstream = tower::service_fn(|req: Request<()>| async move {
//!     Ok::<_, Infallible>(Response::new(req.headers().get("rpc-persist-tenant").map(|v| v.to_str().unwrap().to_owned())))
//! });
//! let client = ClientBackupLayer::new(|_prev: &Context, cur: &Context| (cur.clone(), true)).layer(downstream);
//! let handler = tower::service_fn(move |_req: Request<String>| {
//!     let call = client.clone().oneshot(Request::new(())); // no context: recovered from the backup
//!     async move { Ok::<_, Infallible>(Response::new(call.await.unwrap().into_body().unwrap_or_default())) }
//! });
//! let server = ServerBackupLayer::new().layer(handler);
//! let req = Request::builder().header("rpc-persist-tenant", "acme").body(String::new()).unwrap();
//! assert_eq!(server.oneshot(req).await.unwrap().into_body(), "acme");
//! # }
//! ```
//!
// The gRPC items exist only with the `grpc` feature: linked to their docs when it is on, to the
// gRPC section otherwise (so that `cargo doc` without the feature has no unresolved link).
#![cfg_attr(feature = "grpc", doc = "[`ServerBackupLayer::grpc`]: ServerBackupLayer::grpc")]
#![cfg_attr(feature = "grpc", doc = "[`GrpcInvalidArgument`]: GrpcInvalidArgument")]
#![cfg_attr(not(feature = "grpc"), doc = "[`ServerBackupLayer::grpc`]: #grpc-tonic")]
#![cfg_attr(not(feature = "grpc"), doc = "[`GrpcInvalidArgument`]: #grpc-tonic")]

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use http::header::HeaderMap;
use http::{Request, Response};
use localsession_core::{AnySession, Context, ContextError, MetaInfo, SessionCtx, WithSession, recover_ctx_on_demands};
use tower_layer::Layer;
use tower_service::Service;

use localsession_std::{THREAD_STORE, ThreadStore};

mod propagate;
mod reject;
mod w3c;

pub use propagate::{
    BACKWARD_PREFIX, BackwardValues, KitexMetainfo, PERSISTENT_PREFIX, Propagator, TRANSIENT_PREFIX, cgi_key_to_header,
    header_to_cgi_key,
};
#[cfg(feature = "grpc")]
pub use reject::GrpcInvalidArgument;
pub use reject::{BadRequest, Rejection};
pub use w3c::{TraceContext, TraceParent, W3cBaggage, W3cTraceContext};

/// The propagators a layer runs, in order.
type Propagators = Arc<[Arc<dyn Propagator>]>;

fn default_propagators() -> Propagators {
    Arc::from([Arc::new(KitexMetainfo::new()) as Arc<dyn Propagator>])
}

fn appended(list: &Propagators, p: Arc<dyn Propagator>) -> Propagators {
    list.iter().cloned().chain([p]).collect()
}

/// A header that cannot be read or written: names the header and what is wrong with it.
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_tokio::tower::metainfo_from_headers;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("rpc-persist-tenant", http::HeaderValue::from_bytes(b"caf\xe9").unwrap());
/// let err = metainfo_from_headers(&headers).unwrap_err();
/// assert_eq!(err.header(), "rpc-persist-tenant");
/// assert!(err.to_string().ends_with("the value is not UTF-8 text"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError {
    header: String,
    reason: Cow<'static, str>,
}

impl HeaderError {
    /// An error about `header`, for `reason`.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::HeaderError;
    /// let err = HeaderError::new("x-request-id", "empty");
    /// assert_eq!(err.to_string(), "invalid header \"x-request-id\": empty");
    /// ```
    pub fn new(header: impl Into<String>, reason: impl Into<Cow<'static, str>>) -> Self {
        HeaderError { header: header.into(), reason: reason.into() }
    }

    /// The offending header name (when writing metainfo: the header the key would have become,
    /// prefix included).
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_core::{Context, MetaInfo};
    /// use localsession_tokio::tower::write_metainfo_headers;
    ///
    /// let ctx = MetaInfo::with_persistent(&Context::background(), "USER ID", "7"); // a space: not a header token
    /// let err = write_metainfo_headers(MetaInfo::of(&ctx), &mut HeaderMap::new()).unwrap_err();
    /// assert_eq!(err.header(), "rpc-persist-user id");
    /// ```
    #[must_use]
    pub fn header(&self) -> &str {
        &self.header
    }

    /// What is wrong with it.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::HeaderError;
    /// assert_eq!(HeaderError::new("baggage", "too long").reason(), "too long");
    /// ```
    #[must_use]
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid header {:?}: {}", self.header, self.reason)
    }
}

impl std::error::Error for HeaderError {}

/// Reads the metainfo headers of an incoming request with the default [`KitexMetainfo`]
/// (gopkg's CGI-variable keys): `rpc-persist-abc-def` becomes the persistent value `ABC_DEF`,
/// `rpc-transit-x-y` the transient value `X_Y` received from upstream (readable here, not
/// forwarded). Empty keys and empty values are skipped, as gopkg does.
///
/// # Errors
/// [`HeaderError`] naming the header for a value that is not UTF-8, or more metainfo than the
/// limits ([`KitexMetainfo::read`]).
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_tokio::tower::metainfo_from_headers;
/// let mut h = HeaderMap::new();
/// h.insert("rpc-persist-abc-def", "v".parse().unwrap());
/// h.insert("rpc-transit-hop", "1".parse().unwrap());
/// let meta = metainfo_from_headers(&h).unwrap();
/// assert_eq!(meta.persistent("ABC_DEF"), Some("v"));
/// assert_eq!(meta.transient("HOP"), Some("1"));
/// assert_eq!(meta.transfer_forward().transient("HOP"), None); // one hop only
/// ```
pub fn metainfo_from_headers(headers: &HeaderMap) -> Result<MetaInfo, HeaderError> {
    KitexMetainfo::new().read(headers)
}

/// Writes the metainfo an outgoing request carries with the default [`KitexMetainfo`]: every
/// persistent value, and the transient values set at this hop, under `rpc-persist-<key>` /
/// `rpc-transit-<key>` with the key lower-cased and `_` as `-` (`ABC_DEF` ->
/// `rpc-persist-abc-def`). Replaces every metainfo header `headers` had.
///
/// # Errors
/// [`HeaderError`] naming the header, for a key that is not a header-name token, a value that
/// is not header-safe, or two keys that become one header (`TENANT` and `tenant`); nothing is
/// written then ([`KitexMetainfo::write`]).
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_core::{Context, MetaInfo};
/// use localsession_tokio::tower::write_metainfo_headers;
/// let ctx = MetaInfo::with_persistent(&Context::background(), "TENANT_ID", "acme");
/// let mut h = HeaderMap::new();
/// write_metainfo_headers(MetaInfo::of(&ctx), &mut h).unwrap();
/// assert_eq!(h["rpc-persist-tenant-id"], "acme");
/// ```
pub fn write_metainfo_headers(meta: &MetaInfo, headers: &mut HeaderMap) -> Result<(), HeaderError> {
    KitexMetainfo::new().write(meta, headers)
}

/// The server middleware (see the [module docs](self)).
///
/// # Examples
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use localsession_core::MetaInfo;
/// use localsession_tokio::tower::ServerBackupLayer;
/// use tower_layer::Layer;
/// use tower_service::Service;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let handler = tower::service_fn(|_req: Request<String>| async {
///     // Deep in the handler, with no context passed: the backup.
///     let ctx = localsession_core::backed_up_ctx().unwrap();
///     Ok::<_, Infallible>(Response::new(MetaInfo::of(&ctx).persistent("TENANT").unwrap_or("").to_owned()))
/// });
/// let mut svc = ServerBackupLayer::new().layer(handler);
/// let req = Request::builder().header("rpc-persist-tenant", "acme").body(String::new()).unwrap();
/// assert_eq!(svc.call(req).await.unwrap().into_body(), "acme");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ServerBackupLayer<R = BadRequest> {
    end_with_response: bool,
    propagators: Propagators,
    reject: R,
}

impl Default for ServerBackupLayer {
    fn default() -> Self {
        ServerBackupLayer::new()
    }
}

impl ServerBackupLayer {
    /// The layer.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use localsession_core::{Context, MetaInfo};
    /// use localsession_tokio::tower::ServerBackupLayer;
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let svc = ServerBackupLayer::new().layer(tower::service_fn(|req: Request<String>| async move {
    ///     // The request's context is also in its extensions.
    ///     let ctx = req.extensions().get::<Context>().unwrap();
    ///     Ok::<_, Infallible>(Response::new(MetaInfo::of(ctx).transient("HOP").unwrap_or("-").to_owned()))
    /// }));
    /// let req = Request::builder().header("rpc-transit-hop", "1").body(String::new()).unwrap();
    /// assert_eq!(svc.oneshot(req).await.unwrap().into_body(), "1");
    /// # }
    /// ```
    #[must_use]
    pub fn new() -> Self {
        ServerBackupLayer { end_with_response: true, propagators: default_propagators(), reject: BadRequest }
    }
}

impl<R> ServerBackupLayer<R> {
    /// Answers requests whose headers cannot be read with `reject` (default: [`BadRequest`],
    /// a `400`).
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response, StatusCode};
    /// use localsession_tokio::tower::{HeaderError, Rejection, ServerBackupLayer};
    /// use tower::{Layer, ServiceExt};
    ///
    /// /// Answers `422` with the header's name alone.
    /// #[derive(Debug, Clone)]
    /// struct Unprocessable;
    /// impl Rejection<String> for Unprocessable {
    ///     fn reject(&self, error: &HeaderError) -> Response<String> {
    ///         let mut resp = Response::new(error.header().to_owned());
    ///         *resp.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
    ///         resp
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = ServerBackupLayer::new().reject_with(Unprocessable);
    /// let svc = layer.layer(tower::service_fn(|_req: Request<String>| async { Ok::<_, Infallible>(Response::new(String::new())) }));
    /// let bad = Request::builder().header("rpc-persist-tenant", &b"caf\xe9"[..]).body(String::new()).unwrap();
    /// let resp = svc.oneshot(bad).await.unwrap();
    /// assert_eq!((resp.status(), resp.body().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "rpc-persist-tenant"));
    /// # }
    /// ```
    #[must_use]
    pub fn reject_with<R2>(self, reject: R2) -> ServerBackupLayer<R2> {
        ServerBackupLayer { end_with_response: self.end_with_response, propagators: self.propagators, reject }
    }

    /// gRPC mode (feature `grpc`): requests whose headers (gRPC metadata) cannot be read are
    /// answered with the gRPC status `INVALID_ARGUMENT` naming the header
    /// ([`GrpcInvalidArgument`]) instead of a `400`. Use it in
    /// `tonic::transport::Server::builder().layer(..)`.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response, StatusCode};
    /// use localsession_tokio::tower::{ServerBackupLayer, W3cTraceContext};
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = ServerBackupLayer::new().with_propagator(W3cTraceContext::new()).grpc();
    /// // `String` stands in for tonic's body here: any `Default` body works.
    /// let svc = layer.layer(tower::service_fn(|_req: Request<String>| async { Ok::<_, Infallible>(Response::new(String::new())) }));
    /// let bad = Request::builder().header("traceparent", "garbage").body(String::new()).unwrap();
    /// let resp = svc.oneshot(bad).await.unwrap();
    /// assert_eq!(resp.status(), StatusCode::OK); // gRPC errors travel in `grpc-status`
    /// assert_eq!(resp.headers()["grpc-status"], "3"); // INVALID_ARGUMENT
    /// assert!(resp.headers()["grpc-message"].to_str().unwrap().contains("traceparent"));
    /// # }
    /// ```
    #[cfg(feature = "grpc")]
    #[must_use]
    pub fn grpc(self) -> ServerBackupLayer<GrpcInvalidArgument> {
        self.reject_with(GrpcInvalidArgument)
    }

    /// Replaces the propagators that read each request's context from its headers (in order,
    /// each on the context the previous one made) and write the backward values into its
    /// response. Default: [`KitexMetainfo`] alone.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use std::sync::Arc;
    /// use http::{Request, Response};
    /// use localsession_core::MetaInfo;
    /// use localsession_tokio::tower::{Propagator, ServerBackupLayer, W3cBaggage};
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = ServerBackupLayer::new().propagators([Arc::new(W3cBaggage) as Arc<dyn Propagator>]);
    /// let svc = layer.layer(tower::service_fn(|_req: Request<String>| async {
    ///     let ctx = localsession_core::backed_up_ctx().unwrap();
    ///     let meta = MetaInfo::of(&ctx);
    ///     Ok::<_, Infallible>(Response::new(format!("{:?} {:?}", meta.persistent("tenant"), meta.persistent("TENANT"))))
    /// }));
    /// let req = Request::builder().header("baggage", "tenant=acme").header("rpc-persist-tenant", "x").body(String::new()).unwrap();
    /// assert_eq!(svc.oneshot(req).await.unwrap().into_body(), r#"Some("acme") None"#); // Kitex headers not read
    /// # }
    /// ```
    #[must_use]
    pub fn propagators(self, list: impl IntoIterator<Item = Arc<dyn Propagator>>) -> Self {
        ServerBackupLayer { propagators: list.into_iter().collect(), ..self }
    }

    /// Adds a propagator after those already there.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use localsession_core::Context;
    /// use localsession_tokio::tower::{ServerBackupLayer, TraceContext, W3cTraceContext};
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = ServerBackupLayer::new().with_propagator(W3cTraceContext::new()); // Kitex + trace context
    /// let svc = layer.layer(tower::service_fn(|req: Request<String>| async move {
    ///     let trace = TraceContext::of(req.extensions().get::<Context>().unwrap()).unwrap();
    ///     Ok::<_, Infallible>(Response::new(trace.parent.sampled().to_string()))
    /// }));
    /// let req = Request::builder()
    ///     .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    ///     .body(String::new())
    ///     .unwrap();
    /// assert_eq!(svc.oneshot(req).await.unwrap().into_body(), "true");
    /// # }
    /// ```
    #[must_use]
    pub fn with_propagator(self, propagator: impl Propagator + 'static) -> Self {
        ServerBackupLayer { propagators: appended(&self.propagators, Arc::new(propagator)), ..self }
    }

    /// Does not end the backup when the response future completes or is dropped: tasks the
    /// request leaves behind keep a *valid* backup of it (the behaviour before request
    /// lifecycles). Same as `end_with_response(false)`.
    ///
    /// Only for tasks that legitimately continue the request's work after the response (an
    /// audit write, say); a long-lived worker built inside the handler would then send this
    /// request's identity on behalf of later requests.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use std::sync::OnceLock;
    /// use http::{Request, Response};
    /// use localsession_core::AnySession;
    /// use localsession_tokio::tower::ServerBackupLayer;
    /// use tower::{Layer, ServiceExt};
    ///
    /// static KEPT: OnceLock<AnySession> = OnceLock::new(); // e.g. captured by a follow-up task
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let handler = tower::service_fn(|_req: Request<String>| async {
    ///     KEPT.get_or_init(|| localsession_std::current().unwrap());
    ///     Ok::<_, Infallible>(Response::new(String::new()))
    /// });
    /// let svc = ServerBackupLayer::new().keep_alive().layer(handler);
    /// svc.oneshot(Request::new(String::new())).await.unwrap();
    /// assert!(KEPT.get().unwrap().is_valid()); // not ended with the response
    /// # }
    /// ```
    #[must_use]
    pub fn keep_alive(self) -> Self {
        self.end_with_response(false)
    }

    /// Whether the backup ends (is disabled) when the response future completes (`Ok` or
    /// `Err`) or is dropped before completing. `true` by default.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use std::sync::OnceLock;
    /// use http::{Request, Response};
    /// use localsession_core::AnySession;
    /// use localsession_tokio::tower::ServerBackupLayer;
    /// use tower::{Layer, ServiceExt};
    ///
    /// static KEPT: OnceLock<AnySession> = OnceLock::new(); // e.g. captured by a leftover task
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let handler = tower::service_fn(|_req: Request<String>| async {
    ///     KEPT.get_or_init(|| localsession_std::current().unwrap());
    ///     Ok::<_, Infallible>(Response::new(String::new()))
    /// });
    /// let svc = ServerBackupLayer::new().end_with_response(true).layer(handler);
    /// svc.oneshot(Request::new(String::new())).await.unwrap();
    /// assert!(!KEPT.get().unwrap().is_valid()); // ended with the response: leftovers cannot use it
    /// assert!(localsession_core::backed_up_ctx().is_none());
    /// # }
    /// ```
    #[must_use]
    pub fn end_with_response(self, end: bool) -> Self {
        ServerBackupLayer { end_with_response: end, ..self }
    }
}

impl<S, R: Clone> Layer<S> for ServerBackupLayer<R> {
    type Service = ServerBackup<S, R>;
    fn layer(&self, inner: S) -> ServerBackup<S, R> {
        ServerBackup {
            inner,
            end_with_response: self.end_with_response,
            propagators: self.propagators.clone(),
            reject: self.reject.clone(),
        }
    }
}

/// The service made by [`ServerBackupLayer`].
///
/// # Examples
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use localsession_tokio::tower::ServerBackupLayer;
/// use tower::{Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let svc = ServerBackupLayer::new().layer(tower::service_fn(|_req: Request<String>| async {
///     Ok::<_, Infallible>(Response::new(String::from("handled")))
/// }));
/// let bad = Request::builder().header("rpc-persist-tenant", &b"caf\xe9"[..]).body(String::new()).unwrap();
/// let resp = svc.oneshot(bad).await.unwrap();
/// assert_eq!(resp.status(), StatusCode::BAD_REQUEST); // the handler was not called
/// assert!(resp.body().contains("rpc-persist-tenant"));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ServerBackup<S, R = BadRequest> {
    inner: S,
    end_with_response: bool,
    propagators: Propagators,
    reject: R,
}

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for ServerBackup<S, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    R: Rejection<ResBody>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ServerBackupFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let mut ctx = Context::background();
        for p in self.propagators.iter() {
            match p.extract(req.headers(), &ctx) {
                Ok(next) => ctx = next,
                Err(e) => {
                    let resp = self.reject.reject(&e);
                    return ServerBackupFuture {
                        state: ServerState::Rejected { response: Some(resp) },
                        end: EndSession(None),
                        backward: None,
                    };
                }
            }
        }
        let ctx = MetaInfo::with_backward_values_to_send(&ctx);
        req.extensions_mut().insert(ctx.clone());
        let session = SessionCtx::new(&ctx);
        // Made before the inner `call`: if `call` panics, the request is over and its session
        // ends as it unwinds (what `call` already handed the session to must not keep it valid).
        let end = EndSession(self.end_with_response.then(|| session.clone().into()));
        let fut = localsession_std::scope(session.clone(), || self.inner.call(req));
        let backward = Some((ctx, self.propagators.clone()));
        let fut = WithSession::new_in_store(&THREAD_STORE, fut, Some(session.into()));
        ServerBackupFuture { state: ServerState::Inner { fut }, end, backward }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`ServerBackup`].
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use localsession_tokio::tower::{ServerBackupFuture, ServerBackupLayer};
    /// use tower::{Layer, Service};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut svc = ServerBackupLayer::new().layer(tower::service_fn(|_req: Request<String>| async {
    ///     tokio::task::yield_now().await; // the backup is bound again at every poll
    ///     Ok::<_, Infallible>(Response::new(localsession_core::backed_up_ctx().is_some().to_string()))
    /// }));
    /// let fut: ServerBackupFuture<_, String> = svc.call(Request::new(String::new()));
    /// assert!(localsession_std::current().is_none()); // bound only while the future is polled
    /// assert_eq!(fut.await.unwrap().into_body(), "true");
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct ServerBackupFuture<F, B> {
        // Declared first: dropped (with the backup bound) before `end` disables the backup.
        #[pin]
        state: ServerState<F, B>,
        end: EndSession,
        // The request's context and the propagators that write its backward values.
        backward: Option<(Context, Propagators)>,
    }
}

pin_project_lite::pin_project! {
    #[project = ServerStateProj]
    #[derive(Debug)]
    enum ServerState<F, B> {
        // The handler runs with the request's backup bound.
        Inner { #[pin] fut: WithSession<F, ThreadStore> },
        // The request was rejected (malformed metainfo); the answer is taken when polled.
        Rejected { response: Option<Response<B>> },
    }
}

impl<F, B, E> Future for ServerBackupFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            ServerStateProj::Inner { fut } => {
                let mut out = std::task::ready!(fut.poll(cx));
                if let (Ok(resp), Some((ctx, propagators))) = (&mut out, this.backward.take()) {
                    for p in propagators.iter() {
                        p.inject_backward(&ctx, resp.headers_mut());
                    }
                }
                this.end.end();
                Poll::Ready(out)
            }
            ServerStateProj::Rejected { response } => {
                Poll::Ready(Ok(response.take().expect("`ServerBackupFuture` polled after completion")))
            }
        }
    }
}

/// The client middleware (see the [module docs](self)), with a backup handler
/// `(prev, cur) -> (ctx, backup)` as in Kitex's `client.WithContextBackup`.
///
/// The backup is looked up when [`Service::call`] runs, on the calling unit: call it where the
/// request's session is current (inside a handler behind [`ServerBackupLayer`], or a task that
/// inherited it). With `ServiceExt::oneshot`, `call` happens inside the first poll, so that
/// future must be polled where the session is current.
///
/// # Examples
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use localsession_core::{Context, MetaInfo, SessionCtx};
/// use localsession_tokio::tower::ClientBackupLayer;
/// use tower_layer::Layer;
/// use tower_service::Service;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // A "transport" that echoes the tenant header it was given.
/// let transport = tower::service_fn(|req: Request<()>| async move {
///     let tenant = req.headers().get("rpc-persist-tenant").map(|v| v.to_str().unwrap().to_owned());
///     Ok::<_, Infallible>(Response::new(tenant))
/// });
/// let mut client = ClientBackupLayer::new(|_prev: &Context, cur: &Context| (cur.clone(), true)).layer(transport);
///
/// let request_ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
/// let sent = localsession_std::scope(SessionCtx::new(&request_ctx), || client.call(Request::new(())));
/// assert_eq!(sent.await.unwrap().into_body().as_deref(), Some("acme"));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBackupLayer<H> {
    handler: H,
    propagators: Propagators,
}

impl<H> ClientBackupLayer<H>
where
    H: Fn(&Context, &Context) -> (Context, bool) + Clone,
{
    /// A layer with the backup handler `handler(prev, cur) -> (ctx, backup)`.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use localsession_core::{Context, MetaInfo, SessionCtx};
    /// use localsession_tokio::tower::ClientBackupLayer;
    /// use tower::{Layer, Service};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let transport = tower::service_fn(|req: Request<()>| async move {
    ///     Ok::<_, Infallible>(Response::new(req.headers().contains_key("rpc-persist-tenant")))
    /// });
    /// // A handler that declines the backup: nothing is recovered from it.
    /// let mut client = ClientBackupLayer::new(|_prev: &Context, cur: &Context| (cur.clone(), false)).layer(transport);
    /// let backup = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
    /// let sent = localsession_std::scope(SessionCtx::new(&backup), || client.call(Request::new(())));
    /// assert!(!sent.await.unwrap().into_body());
    /// # }
    /// ```
    pub fn new(handler: H) -> Self {
        ClientBackupLayer { handler, propagators: default_propagators() }
    }

    /// Replaces the propagators that write each outgoing request's headers from its context
    /// (in order) and read the backward values of its response. Default: [`KitexMetainfo`]
    /// alone.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use std::sync::Arc;
    /// use http::{Request, Response};
    /// use localsession_core::{Context, MetaInfo};
    /// use localsession_tokio::tower::{ClientBackupLayer, Propagator, W3cBaggage};
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let transport = tower::service_fn(|req: Request<()>| async move {
    ///     Ok::<_, Infallible>(Response::new(format!("{:?}", req.headers().get("baggage"))))
    /// });
    /// let layer = ClientBackupLayer::new(|_prev: &Context, cur: &Context| (cur.clone(), true))
    ///     .propagators([Arc::new(W3cBaggage) as Arc<dyn Propagator>]);
    /// let mut req = Request::new(());
    /// req.extensions_mut().insert(MetaInfo::with_persistent(&Context::background(), "user", "Jürgen"));
    /// assert_eq!(layer.layer(transport).oneshot(req).await.unwrap().into_body(), r#"Some("user=J%C3%BCrgen")"#);
    /// # }
    /// ```
    #[must_use]
    pub fn propagators(self, list: impl IntoIterator<Item = Arc<dyn Propagator>>) -> Self {
        ClientBackupLayer { propagators: list.into_iter().collect(), ..self }
    }

    /// Adds a propagator after those already there.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use localsession_core::{Context, MetaInfo};
    /// use localsession_tokio::tower::{ClientBackupLayer, TraceContext, TraceParent, W3cTraceContext};
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let transport = tower::service_fn(|req: Request<()>| async move {
    ///     Ok::<_, Infallible>(Response::new(req.headers()["traceparent"].to_str().unwrap().to_owned()))
    /// });
    /// let layer = ClientBackupLayer::new(|_prev: &Context, cur: &Context| (cur.clone(), true))
    ///     .with_propagator(W3cTraceContext::new());
    /// let parent = TraceParent { version: 0, trace_id: [0xab; 16], parent_id: [0xcd; 8], flags: 1 };
    /// let mut req = Request::new(());
    /// req.extensions_mut().insert(TraceContext { parent, state: None }.attach(&Context::background()));
    /// let sent = layer.layer(transport).oneshot(req).await.unwrap().into_body();
    /// assert_eq!(sent, format!("00-{}-{}-01", "ab".repeat(16), "cd".repeat(8)));
    /// # }
    /// ```
    #[must_use]
    pub fn with_propagator(self, propagator: impl Propagator + 'static) -> Self {
        ClientBackupLayer { propagators: appended(&self.propagators, Arc::new(propagator)), ..self }
    }
}

impl<S, H: Clone> Layer<S> for ClientBackupLayer<H> {
    type Service = ClientBackup<S, H>;
    fn layer(&self, inner: S) -> ClientBackup<S, H> {
        ClientBackup { inner, handler: self.handler.clone(), propagators: self.propagators.clone() }
    }
}

/// The service made by [`ClientBackupLayer`].
///
/// # Examples
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use localsession_core::{Context, MetaInfo, SessionCtx};
/// use localsession_tokio::tower::ClientBackupLayer;
/// use tower::{Layer, Service};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let transport = tower::service_fn(|req: Request<()>| async move {
///     Ok::<_, Infallible>(Response::new(req.headers()["rpc-persist-tenant"].to_str().unwrap().to_owned()))
/// });
/// let mut client = ClientBackupLayer::new(|_prev: &Context, cur: &Context| (cur.clone(), true)).layer(transport);
/// let backup = MetaInfo::with_persistent(&Context::background(), "tenant", "from-backup");
/// let mut req = Request::new(());
/// req.extensions_mut().insert(MetaInfo::with_persistent(&Context::background(), "tenant", "explicit"));
/// let sent = localsession_std::scope(SessionCtx::new(&backup), || client.call(req));
/// assert_eq!(sent.await.unwrap().into_body(), "explicit"); // the request's own context wins
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBackup<S, H> {
    inner: S,
    handler: H,
    propagators: Propagators,
}

/// The client middleware's error: the metainfo could not be written, or the inner service failed.
///
/// # Examples
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use localsession_core::{Context, MetaInfo};
/// use localsession_tokio::tower::{ClientBackupError, ClientBackupLayer};
/// use tower::{Layer, Service};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let transport = tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
/// let mut client = ClientBackupLayer::new(|_prev: &Context, cur: &Context| (cur.clone(), true)).layer(transport);
/// let mut req = Request::new(());
/// req.extensions_mut().insert(MetaInfo::with_persistent(&Context::background(), "bad key", "v"));
/// let err = client.call(req).await.unwrap_err();
/// assert!(matches!(&err, ClientBackupError::Header(e) if e.header() == "rpc-persist-bad key"));
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientBackupError<E> {
    /// A metainfo key or value cannot be sent as a header.
    Header(HeaderError),
    /// The session bound where the call runs has ended (disabled when its request completed,
    /// expired, or cancelled; the cause is given): the client runs in a task that outlived the
    /// request that created it, and sending would use that old request's identity. Nothing was
    /// sent.
    ///
    /// Typical causes: a `tower::buffer::Buffer` whose worker was spawned inside a handler (in
    /// implicit mode such a worker is a *shared worker*, whose session is ended from the start
    /// — see `ImplicitSessions::shared_workers_spawned_at`, with `--cfg tokio_unstable` —
    /// so every call through it is refused, also while the request that built it is in flight),
    /// or a task that outlived the request that spawned it. Fix: build the client at startup, or inside
    /// [`localsession_std::without_flow`], or spawn its worker with
    /// [`spawn_without_session`](crate::spawn_without_session) — and put [`ClientBackupLayer`]
    /// *outside* the buffer, so that the headers are written in the caller's task.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use localsession_core::{Context, ContextError, SessionCtx};
    /// use localsession_tokio::tower::{ClientBackupError, ClientBackupLayer};
    /// use tower::{Layer, Service};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let transport = tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    /// let mut client = ClientBackupLayer::new(|_prev: &Context, cur: &Context| (cur.clone(), true)).layer(transport);
    /// let old_request = SessionCtx::new(&Context::background());
    /// old_request.disable(); // its request completed
    /// let err = localsession_std::scope(old_request, || client.call(Request::new(()))).await.unwrap_err();
    /// assert!(matches!(err, ClientBackupError::EndedSession(ContextError::Canceled)));
    /// assert!(err.to_string().contains("outlived the request"));
    /// # }
    /// ```
    EndedSession(ContextError),
    /// The inner service's error.
    Inner(E),
}

impl<E: fmt::Display> fmt::Display for ClientBackupError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientBackupError::Header(e) => write!(f, "cannot send request metainfo: {e}"),
            ClientBackupError::EndedSession(cause) => write!(
                f,
                "refusing to send: the session where this client call runs has ended ({cause}); the client \
                 runs in a task that outlived the request that created it (e.g. a tower::buffer::Buffer \
                 worker or a pooled connection task built inside a request handler) and would send that \
                 request's identity; build the client at startup, or inside localsession_std::without_flow, \
                 or spawn its worker with localsession_tokio::spawn_without_session"
            ),
            ClientBackupError::Inner(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ClientBackupError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientBackupError::Header(e) => Some(e),
            ClientBackupError::EndedSession(cause) => Some(cause),
            ClientBackupError::Inner(e) => Some(e),
        }
    }
}

impl<S, H, B, RB> Service<Request<B>> for ClientBackup<S, H>
where
    S: Service<Request<B>, Response = Response<RB>>,
    H: Fn(&Context, &Context) -> (Context, bool),
{
    type Response = S::Response;
    type Error = ClientBackupError<S::Error>;
    type Future = ClientBackupFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(ClientBackupError::Inner)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // An ended session here means a task that outlived its request: fail, never send its
        // identity (nor silently send none).
        if let Some(cause) = localsession_core::with_current(|s| s.and_then(AnySession::err)) {
            return ClientBackupFuture { state: ClientState::Failed { error: Some(ClientFailure::Ended(cause)) } };
        }
        let cur = req.extensions().get::<Context>().cloned().unwrap_or_default();
        // The backup, if the handler accepted it: each propagator then recovers what it carries
        // and the call's context lacks (the trace context, say), as the core does for the
        // persistent metainfo.
        let mut accepted = None;
        let ctx = recover_ctx_on_demands(&cur, |prev, cur| {
            let (ctx, backup) = (self.handler)(prev, cur);
            if backup {
                accepted = Some(prev.clone());
            }
            (ctx, backup)
        });
        let ctx = match accepted {
            Some(prev) => self.propagators.iter().fold(ctx, |ctx, p| p.recover(&prev, &ctx)),
            None => ctx,
        };
        for p in self.propagators.iter() {
            if let Err(e) = p.inject(&ctx, req.headers_mut()) {
                return ClientBackupFuture { state: ClientState::Failed { error: Some(ClientFailure::Header(e)) } };
            }
        }
        req.extensions_mut().insert(ctx);
        ClientBackupFuture {
            state: ClientState::Inner { fut: self.inner.call(req), propagators: self.propagators.clone() },
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`ClientBackup`].
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use localsession_core::Context;
    /// use localsession_tokio::tower::{ClientBackupError, ClientBackupFuture, ClientBackupLayer};
    /// use tower::{Layer, Service};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let transport = tower::service_fn(|_req: Request<()>| async {
    ///     Err::<Response<()>, _>(std::io::Error::other("connection refused"))
    /// });
    /// let mut client = ClientBackupLayer::new(|_prev: &Context, cur: &Context| (cur.clone(), true)).layer(transport);
    /// let fut: ClientBackupFuture<_> = client.call(Request::new(()));
    /// let err = fut.await.unwrap_err();
    /// assert!(matches!(err, ClientBackupError::Inner(_)));
    /// assert_eq!(err.to_string(), "connection refused");
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct ClientBackupFuture<F> {
        #[pin]
        state: ClientState<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = ClientStateProj]
    #[derive(Debug)]
    enum ClientState<F> {
        // The inner call.
        Inner { #[pin] fut: F, propagators: Propagators },
        // The call was refused before reaching the inner service; the error is taken when polled.
        Failed { error: Option<ClientFailure> },
    }
}

/// Why [`ClientBackup::call`] refused a request.
#[derive(Debug)]
enum ClientFailure {
    Header(HeaderError),
    Ended(ContextError),
}

impl<F, RB, E> Future for ClientBackupFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<RB>, ClientBackupError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            ClientStateProj::Inner { fut, propagators } => {
                let mut resp = std::task::ready!(fut.poll(cx)).map_err(ClientBackupError::Inner)?;
                let mut backward = BackwardValues::default();
                for p in propagators.iter() {
                    p.extract_backward(resp.headers(), &mut backward);
                }
                resp.extensions_mut().insert(backward);
                Poll::Ready(Ok(resp))
            }
            ClientStateProj::Failed { error } => {
                Poll::Ready(Err(match error.take().expect("`ClientBackupFuture` polled after completion") {
                    ClientFailure::Header(e) => ClientBackupError::Header(e),
                    ClientFailure::Ended(cause) => ClientBackupError::EndedSession(cause),
                }))
            }
        }
    }
}

/// Ends (disables) a request's session when dropped or when [`end`](EndSession::end) is called:
/// at the completion or the drop of the response future that owns it.
#[derive(Debug)]
struct EndSession(Option<AnySession>);

impl EndSession {
    fn end(&mut self) {
        if let Some(session) = self.0.take() {
            session.disable();
        }
    }
}

impl Drop for EndSession {
    fn drop(&mut self) {
        self.end();
    }
}

/// Server middleware for a session of your own: `make(&request)` builds each request's session
/// (from its headers, its extensions, ...), which is bound around the inner service's `call`,
/// around every poll of its response future and around that future's drop — the request's own
/// code, and what it spawns with this crate's helpers (or plain `tokio::spawn` in implicit
/// mode), sees it with no context parameter.
///
/// **Request lifecycle.** When the response future completes (`Ok` or `Err`) or is dropped
/// before completing (the client went away), or the inner `call` panics, the session is
/// ended: `disable()` for a
/// [`SessionCtx`] or a [`SessionMap`](localsession_core::SessionMap), which also invalidates
/// every session derived from it. A task the request left behind then sees an invalid session,
/// and [`ClientBackup`] refuses to send from it. A user [`Session`](localsession_core::Session)
/// (`AnySession::Custom`) has no `disable` in its trait (as in Go) and cannot be ended by this
/// layer: end it yourself, or build a `SessionMap`/`SessionCtx`. Opt out with
/// [`keep_alive`](SessionLayer::keep_alive).
///
/// # Examples
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use localsession_core::SessionMap;
/// use localsession_tokio::tower::SessionLayer;
/// use tower::{Layer, ServiceExt};
///
/// fn tenant() -> String {
///     // Deep code, no context parameter:
///     let s = localsession_std::current().unwrap();
///     s.value_cloned::<String, _>(&"tenant").unwrap_or_default()
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = SessionLayer::new(|req: &Request<String>| {
///     let tenant = req.headers().get("x-tenant").and_then(|v| v.to_str().ok()).unwrap_or("-");
///     SessionMap::new().with_value("tenant", tenant.to_owned())
/// });
/// let svc = layer.layer(tower::service_fn(|_req: Request<String>| async { Ok::<_, Infallible>(Response::new(tenant())) }));
/// let req = Request::builder().header("x-tenant", "acme").body(String::new()).unwrap();
/// assert_eq!(svc.oneshot(req).await.unwrap().into_body(), "acme");
/// # }
/// ```
#[derive(Clone)]
pub struct SessionLayer<M> {
    make: M,
    end_with_response: bool,
}

impl<M> fmt::Debug for SessionLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLayer").field("end_with_response", &self.end_with_response).finish_non_exhaustive()
    }
}

impl<M> SessionLayer<M> {
    /// A layer whose requests get the session `make(&request)`, ended with the response.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use localsession_core::{Context, SessionCtx};
    /// use localsession_tokio::tower::SessionLayer;
    /// use tower::{Layer, ServiceExt};
    ///
    /// #[derive(Clone)]
    /// struct UserId(u64); // put in the extensions by an authentication layer
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = SessionLayer::new(|req: &Request<()>| {
    ///     let user = req.extensions().get::<UserId>().map_or(0, |u| u.0);
    ///     SessionCtx::new(&Context::background()).with_value("user", user)
    /// });
    /// let svc = layer.layer(tower::service_fn(|_req: Request<()>| async {
    ///     let user = localsession_std::current().unwrap().value_cloned::<u64, _>(&"user");
    ///     Ok::<_, Infallible>(Response::new(user))
    /// }));
    /// let mut req = Request::new(());
    /// req.extensions_mut().insert(UserId(42));
    /// assert_eq!(svc.oneshot(req).await.unwrap().into_body(), Some(42));
    /// # }
    /// ```
    pub fn new(make: M) -> Self {
        SessionLayer { make, end_with_response: true }
    }

    /// Does not end the session with the response (same as `end_with_response(false)`); see
    /// [`ServerBackupLayer::keep_alive`] for when that is sound.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use localsession_core::SessionMap;
    /// use localsession_tokio::tower::SessionLayer;
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let map = SessionMap::new();
    /// let layer = SessionLayer::new({ let map = map.clone(); move |_: &Request<()>| map.clone() }).keep_alive();
    /// let svc = layer.layer(tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) }));
    /// svc.oneshot(Request::new(())).await.unwrap();
    /// assert!(map.is_valid()); // still usable after the response
    /// # }
    /// ```
    #[must_use]
    pub fn keep_alive(self) -> Self {
        self.end_with_response(false)
    }

    /// Whether the session ends (is disabled) when the response future completes (`Ok` or
    /// `Err`) or is dropped before completing. `true` by default.
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use localsession_core::SessionMap;
    /// use localsession_tokio::tower::SessionLayer;
    /// use tower::{Layer, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let map = SessionMap::new();
    /// let layer = SessionLayer::new({ let map = map.clone(); move |_: &Request<()>| map.clone() }).end_with_response(true);
    /// let svc = layer.layer(tower::service_fn(|_req: Request<()>| async { Err::<Response<()>, _>("handler failed") }));
    /// assert!(svc.oneshot(Request::new(())).await.is_err());
    /// assert!(!map.is_valid()); // ended with the (failed) response
    /// # }
    /// ```
    #[must_use]
    pub fn end_with_response(self, end: bool) -> Self {
        SessionLayer { end_with_response: end, ..self }
    }
}

impl<S, M: Clone> Layer<S> for SessionLayer<M> {
    type Service = SessionService<S, M>;
    fn layer(&self, inner: S) -> SessionService<S, M> {
        SessionService { inner, make: self.make.clone(), end_with_response: self.end_with_response }
    }
}

/// The service made by [`SessionLayer`].
///
/// # Examples
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use localsession_core::SessionMap;
/// use localsession_tokio::tower::{SessionLayer, SessionService};
/// use tower::{Layer, Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let inner = tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(localsession_std::current().is_some())) });
/// let mut svc = SessionLayer::new(|_: &Request<()>| SessionMap::new()).layer(inner);
/// let has_session = svc.ready().await.unwrap().call(Request::new(())).await.unwrap().into_body();
/// assert!(has_session);
/// # }
/// ```
#[derive(Clone)]
pub struct SessionService<S, M> {
    inner: S,
    make: M,
    end_with_response: bool,
}

impl<S: fmt::Debug, M> fmt::Debug for SessionService<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionService")
            .field("inner", &self.inner)
            .field("end_with_response", &self.end_with_response)
            .finish_non_exhaustive()
    }
}

impl<S, M, Sess, B> Service<Request<B>> for SessionService<S, M>
where
    S: Service<Request<B>>,
    M: Fn(&Request<B>) -> Sess,
    Sess: Into<AnySession>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = SessionFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let session: AnySession = (self.make)(&req).into();
        // Before the inner `call`, as in `ServerBackup::call`: a panicking `call` ends it.
        let end = EndSession(self.end_with_response.then(|| session.clone()));
        let fut = localsession_std::scope(session.clone(), || self.inner.call(req));
        SessionFuture { fut: WithSession::new_in_store(&THREAD_STORE, fut, Some(session)), end }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`SessionService`]: runs the inner future with the request's
    /// session bound, and ends the session when it completes or is dropped (unless opted out).
    ///
    /// # Examples
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use localsession_core::SessionMap;
    /// use localsession_tokio::tower::{SessionFuture, SessionLayer};
    /// use tower::{Layer, Service};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let map = SessionMap::new();
    /// let layer = SessionLayer::new({ let map = map.clone(); move |_: &Request<()>| map.clone() });
    /// let mut svc = layer.layer(tower::service_fn(|_req: Request<()>| std::future::pending::<Result<Response<()>, Infallible>>()));
    /// let fut: SessionFuture<_> = svc.call(Request::new(()));
    /// drop(fut); // the client went away before the response
    /// assert!(!map.is_valid());
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct SessionFuture<F> {
        // Declared first: dropped (with the session bound) before `end` disables the session.
        #[pin]
        fut: WithSession<F, ThreadStore>,
        end: EndSession,
    }
}

impl<F: Future> Future for SessionFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.fut.poll(cx));
        this.end.end();
        Poll::Ready(out)
    }
}
