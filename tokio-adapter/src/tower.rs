//! Context backup across real RPC: tower middleware for servers and clients (Kitex
//! `server.WithContextBackup` / `client.WithContextBackup`). Feature `tower`.
//!
//! - [`ServerBackupLayer`]: for each request, builds a [`Context`] whose metainfo comes from the
//!   request headers — `rpc-persist-<key>` for persistent values, `rpc-transit-<key>` for
//!   transient values sent by the caller — and backs it up as the request's session
//!   (`SessionCtx::new(ctx)`, Kitex `BackupCtx`) around every poll of the handler's future, its
//!   `call`, and its drop; tasks the handler spawns with this crate's helpers (or plain
//!   `tokio::spawn` in implicit mode) inherit it. The backup is gone when the response future
//!   completes or is dropped: it only ever lives in the future. The context is also inserted in
//!   the request's extensions. Malformed metainfo headers are answered with `400 Bad Request`
//!   and a message naming the header; the handler is not called.
//! - [`ClientBackupLayer`]: for each outgoing request, takes the request's [`Context`] (from its
//!   extensions; `Context::background()` if none), recovers what it lacks from the backup with
//!   [`recover_ctx_on_demands`] and your handler `(prev, cur) -> (ctx, backup)`, and writes the
//!   resulting persistent metainfo and this hop's transient metainfo into the request headers.
//!   Transient values received from upstream are not forwarded (they travel one hop).
//!
//! Header keys are lower-cased (HTTP header names are case-insensitive).
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
//!     Ok::<_, Infallible>(req.headers().get("rpc-persist-tenant").map(|v| v.to_str().unwrap().to_owned()))
//! });
//! let client = ClientBackupLayer::new(|_prev: &Context, cur: &Context| (cur.clone(), true)).layer(downstream);
//! let handler = tower::service_fn(move |_req: Request<String>| {
//!     let call = client.clone().oneshot(Request::new(())); // no context: recovered from the backup
//!     async move { Ok::<_, Infallible>(Response::new(call.await.unwrap().unwrap_or_default())) }
//! });
//! let server = ServerBackupLayer::new().layer(handler);
//! let req = Request::builder().header("rpc-persist-tenant", "acme").body(String::new()).unwrap();
//! assert_eq!(server.oneshot(req).await.unwrap().into_body(), "acme");
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use localsession_core::{Context, MetaInfo, SessionCtx, WithSession, recover_ctx_on_demands};
use tower_layer::Layer;
use tower_service::Service;

use crate::FutureExt;

/// Header prefix of persistent metainfo (travels across every hop).
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_core::{Context, MetaInfo};
/// use localsession_tokio::tower::{write_metainfo_headers, PERSISTENT_PREFIX};
///
/// let ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
/// let mut headers = HeaderMap::new();
/// write_metainfo_headers(MetaInfo::of(&ctx), &mut headers).unwrap();
/// assert_eq!(headers[format!("{PERSISTENT_PREFIX}tenant")], "acme");
/// ```
pub const PERSISTENT_PREFIX: &str = "rpc-persist-";
/// Header prefix of transient metainfo (travels one hop).
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_core::{Context, MetaInfo};
/// use localsession_tokio::tower::{write_metainfo_headers, TRANSIENT_PREFIX};
///
/// let ctx = MetaInfo::with_transient(&Context::background(), "hop", "1");
/// let mut headers = HeaderMap::new();
/// write_metainfo_headers(MetaInfo::of(&ctx), &mut headers).unwrap();
/// assert_eq!(headers[format!("{TRANSIENT_PREFIX}hop")], "1");
/// ```
pub const TRANSIENT_PREFIX: &str = "rpc-transit-";

/// A metainfo header that cannot be read or written.
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_tokio::tower::metainfo_from_headers;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("rpc-persist-", "acme".parse().unwrap()); // no key after the prefix
/// let err = metainfo_from_headers(&headers).unwrap_err();
/// assert_eq!(err.header(), "rpc-persist-");
/// assert!(err.to_string().ends_with("the metainfo key after the prefix is empty"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError {
    header: String,
    reason: &'static str,
}

impl HeaderError {
    /// The offending header name (when writing: the header the metainfo key would have become,
    /// prefix included).
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_core::{Context, MetaInfo};
    /// use localsession_tokio::tower::write_metainfo_headers;
    ///
    /// let ctx = MetaInfo::with_persistent(&Context::background(), "user id", "7"); // a space: not a header token
    /// let err = write_metainfo_headers(MetaInfo::of(&ctx), &mut HeaderMap::new()).unwrap_err();
    /// assert_eq!(err.header(), "rpc-persist-user id");
    /// ```
    #[must_use]
    pub fn header(&self) -> &str {
        &self.header
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid metainfo header {:?}: {}", self.header, self.reason)
    }
}

impl std::error::Error for HeaderError {}

/// Reads the metainfo headers of an incoming request: `rpc-persist-*` become persistent values,
/// `rpc-transit-*` transient values received from upstream (readable here, not forwarded).
///
/// # Errors
/// [`HeaderError`] for an empty key (`rpc-persist-` alone) or a value that is not visible ASCII.
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_tokio::tower::metainfo_from_headers;
/// let mut h = HeaderMap::new();
/// h.insert("rpc-persist-tenant", "acme".parse().unwrap());
/// h.insert("rpc-transit-hop", "1".parse().unwrap());
/// let meta = metainfo_from_headers(&h).unwrap();
/// assert_eq!(meta.persistent("tenant"), Some("acme"));
/// assert_eq!(meta.transient("hop"), Some("1"));
/// assert_eq!(meta.transfer_forward().transient("hop"), None); // one hop only
/// ```
pub fn metainfo_from_headers(headers: &HeaderMap) -> Result<MetaInfo, HeaderError> {
    let mut meta = MetaInfo::default();
    for (name, value) in headers {
        let name = name.as_str();
        let (key, persistent) = if let Some(key) = name.strip_prefix(PERSISTENT_PREFIX) {
            (key, true)
        } else if let Some(key) = name.strip_prefix(TRANSIENT_PREFIX) {
            (key, false)
        } else {
            continue;
        };
        if key.is_empty() {
            return Err(HeaderError { header: name.to_owned(), reason: "the metainfo key after the prefix is empty" });
        }
        let value = value.to_str().map_err(|_| HeaderError {
            header: name.to_owned(),
            reason: "the value is not visible ASCII (metainfo values must be header-safe text)",
        })?;
        if persistent {
            meta.set_persistent(key, value);
        } else {
            meta.set_upstream(key, value);
        }
    }
    Ok(meta)
}

/// Writes the metainfo an outgoing request carries: every persistent value, and the transient
/// values set at this hop. Replaces headers of the same names.
///
/// # Errors
/// [`HeaderError`] for a key that is not a valid header-name token or a value that is not
/// visible ASCII.
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_core::{Context, MetaInfo};
/// use localsession_tokio::tower::write_metainfo_headers;
/// let ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
/// let mut h = HeaderMap::new();
/// write_metainfo_headers(MetaInfo::of(&ctx), &mut h).unwrap();
/// assert_eq!(h["rpc-persist-tenant"], "acme");
/// ```
pub fn write_metainfo_headers(meta: &MetaInfo, headers: &mut HeaderMap) -> Result<(), HeaderError> {
    let persistent = meta.persistent_values().map(|kv| (PERSISTENT_PREFIX, kv));
    let transient = meta.outgoing_transient_values().map(|kv| (TRANSIENT_PREFIX, kv));
    for (prefix, (key, value)) in persistent.chain(transient) {
        let header = format!("{prefix}{}", key.to_ascii_lowercase());
        let name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| HeaderError {
            header: header.clone(),
            reason: "the metainfo key is not a valid HTTP header name token",
        })?;
        let value = HeaderValue::from_str(value).map_err(|_| HeaderError {
            header: header.clone(),
            reason: "the value is not visible ASCII (metainfo values must be header-safe text)",
        })?;
        headers.insert(name, value);
    }
    Ok(())
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
///     Ok::<_, Infallible>(Response::new(MetaInfo::of(&ctx).persistent("tenant").unwrap_or("").to_owned()))
/// });
/// let mut svc = ServerBackupLayer::new().layer(handler);
/// let req = Request::builder().header("rpc-persist-tenant", "acme").body(String::new()).unwrap();
/// assert_eq!(svc.call(req).await.unwrap().into_body(), "acme");
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerBackupLayer(());

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
    ///     Ok::<_, Infallible>(Response::new(MetaInfo::of(ctx).transient("hop").unwrap_or("-").to_owned()))
    /// }));
    /// let req = Request::builder().header("rpc-transit-hop", "1").body(String::new()).unwrap();
    /// assert_eq!(svc.oneshot(req).await.unwrap().into_body(), "1");
    /// # }
    /// ```
    #[must_use]
    pub fn new() -> Self {
        ServerBackupLayer(())
    }
}

impl<S> Layer<S> for ServerBackupLayer {
    type Service = ServerBackup<S>;
    fn layer(&self, inner: S) -> ServerBackup<S> {
        ServerBackup { inner }
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
/// let bad = Request::builder().header("rpc-persist-", "x").body(String::new()).unwrap();
/// let resp = svc.oneshot(bad).await.unwrap();
/// assert_eq!(resp.status(), StatusCode::BAD_REQUEST); // the handler was not called
/// assert!(resp.body().contains("rpc-persist-"));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ServerBackup<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ServerBackup<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<String>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ServerBackupFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let meta = match metainfo_from_headers(req.headers()) {
            Ok(meta) => meta,
            Err(e) => {
                let mut resp = Response::new(ResBody::from(e.to_string()));
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                return ServerBackupFuture { state: ServerState::Rejected { response: Some(resp) } };
            }
        };
        let ctx = MetaInfo::attach(&Context::background(), meta);
        req.extensions_mut().insert(ctx.clone());
        let session = SessionCtx::new(&ctx);
        let fut = localsession_std::scope(session.clone(), || self.inner.call(req));
        ServerBackupFuture { state: ServerState::Inner { fut: fut.with_session(session) } }
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
        #[pin]
        state: ServerState<F, B>,
    }
}

pin_project_lite::pin_project! {
    #[project = ServerStateProj]
    #[derive(Debug)]
    enum ServerState<F, B> {
        // The handler runs with the request's backup bound.
        Inner { #[pin] fut: WithSession<F> },
        // The request was rejected (malformed metainfo); the `400` is taken when polled.
        Rejected { response: Option<Response<B>> },
    }
}

impl<F, B, E> Future for ServerBackupFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            ServerStateProj::Inner { fut } => fut.poll(cx),
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
        ClientBackupLayer { handler }
    }
}

impl<S, H: Clone> Layer<S> for ClientBackupLayer<H> {
    type Service = ClientBackup<S, H>;
    fn layer(&self, inner: S) -> ClientBackup<S, H> {
        ClientBackup { inner, handler: self.handler.clone() }
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
pub enum ClientBackupError<E> {
    /// A metainfo key or value cannot be sent as a header.
    Header(HeaderError),
    /// The inner service's error.
    Inner(E),
}

impl<E: fmt::Display> fmt::Display for ClientBackupError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientBackupError::Header(e) => write!(f, "cannot send request metainfo: {e}"),
            ClientBackupError::Inner(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ClientBackupError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientBackupError::Header(e) => Some(e),
            ClientBackupError::Inner(e) => Some(e),
        }
    }
}

impl<S, H, B> Service<Request<B>> for ClientBackup<S, H>
where
    S: Service<Request<B>>,
    H: Fn(&Context, &Context) -> (Context, bool),
{
    type Response = S::Response;
    type Error = ClientBackupError<S::Error>;
    type Future = ClientBackupFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(ClientBackupError::Inner)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let cur = req.extensions().get::<Context>().cloned().unwrap_or_default();
        let ctx = recover_ctx_on_demands(&cur, |prev, cur| (self.handler)(prev, cur));
        if let Err(e) = write_metainfo_headers(MetaInfo::of(&ctx), req.headers_mut()) {
            return ClientBackupFuture { state: ClientState::Failed { error: Some(e) } };
        }
        req.extensions_mut().insert(ctx);
        ClientBackupFuture { state: ClientState::Inner { fut: self.inner.call(req) } }
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
        Inner { #[pin] fut: F },
        // The metainfo could not be written; the error is taken when polled.
        Failed { error: Option<HeaderError> },
    }
}

impl<F, T, E> Future for ClientBackupFuture<F>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, ClientBackupError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            ClientStateProj::Inner { fut } => fut.poll(cx).map(|r| r.map_err(ClientBackupError::Inner)),
            ClientStateProj::Failed { error } => Poll::Ready(Err(ClientBackupError::Header(
                error.take().expect("`ClientBackupFuture` polled after completion"),
            ))),
        }
    }
}
