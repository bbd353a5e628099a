//! Isolation end to end over real HTTP on 127.0.0.1: one request's identity never reaches
//! another request. Service A (behind `ServerBackupLayer`, outermost) reads its caller's tenant
//! and request id from the session in deep code (no context parameter), from an explicit spawn,
//! from `spawn_blocking`, and calls service B through `ClientBackupLayer`; B echoes the tenant
//! and request id it received. Three client arrangements:
//!
//! - `startup`: a `tower::buffer::Buffer` built once at startup (its worker has no session);
//! - `lazy`: a `Buffer` built lazily inside a handler (`OnceLock::get_or_init`) with the safe
//!   pattern `Buffer::pair` + `spawn_without_session(worker)`;
//! - `pooled`: hyper-util's pooled client with `NoSessionExecutor`, used directly from handlers.
//!
//! `ClientBackupLayer` sits outside the buffers: headers are written in the calling task. Every
//! hyper-util client uses `NoSessionExecutor`: even behind a buffer, hyper-util's response
//! future — which opens connections and spawns their tasks — is polled in the calling request's
//! task, so with `TokioExecutor` (in implicit mode) pooled connection tasks would keep that
//! request's session (the `tokio_unstable` check of `implicit_task_sessions` catches that).
//!
//! With `--cfg tokio_unstable` the runtimes run the implicit hooks too (plain `tokio::spawn`
//! inherits), and one more test shows the hazard those hooks create — a buffer worker spawned
//! inside a handler capturing that request's session — being caught loudly.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use localsession_core::{Context, MetaInfo, backed_up_ctx};
use localsession_tokio::hyper::NoSessionExecutor;
use localsession_tokio::tower::{ClientBackup, ClientBackupLayer, ServerBackupLayer};
use tower::buffer::Buffer;
use tower::{Layer, Service, ServiceExt, service_fn};

type Body = Full<Bytes>;
type Recover = fn(&Context, &Context) -> (Context, bool);
type Pooled = Client<HttpConnector, Body>;
type Buffered = ClientBackup<Buffer<Request<Body>, ResponseFuture>, Recover>;

const REQUESTS: usize = 1_000;
/// Wall-time cap of one load run (debug builds): fails instead of hanging.
const LOAD_CAP: Duration = Duration::from_secs(60);

/// The live-session count and the implicit task table are process-wide: the tests of this file
/// run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn recover(_prev: &Context, cur: &Context) -> (Context, bool) {
    (cur.clone(), true)
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers).max_blocking_threads(64).enable_all();
    #[cfg(tokio_unstable)]
    localsession_tokio::enable_implicit_sessions(&mut builder);
    builder.build().unwrap()
}

/// Serves `svc` behind `layer` on an ephemeral port of 127.0.0.1; connection tasks carry no
/// session.
async fn serve<S>(layer: ServerBackupLayer, svc: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = layer.layer(svc);
    localsession_tokio::spawn_without_session(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let svc = TowerToHyperService::new(svc.clone());
            localsession_tokio::spawn_without_session(async move {
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

/// The caller's identity, read deep in the request's code from the backed-up context.
fn deep_identity() -> String {
    match backed_up_ctx() {
        Some(ctx) => {
            let meta = MetaInfo::of(&ctx);
            format!("{}/{}", meta.persistent("TENANT").unwrap_or("?"), meta.persistent("REQ").unwrap_or("?"))
        }
        None => "no-session".to_owned(),
    }
}

async fn body_text(resp: Response<Incoming>) -> String {
    match resp.into_body().collect().await {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        Err(e) => format!("body error: {e}"),
    }
}

/// Service B: echoes the tenant and request id it received (from its own backup, i.e. the
/// headers), and records every tenant it was sent.
async fn serve_echo(received: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    serve(
        ServerBackupLayer::new(),
        service_fn(move |_req: Request<Incoming>| {
            let received = received.clone();
            async move {
                let seen = deep_identity();
                received.lock().unwrap().push(seen.clone());
                Ok::<_, Infallible>(Response::new(Body::from(seen)))
            }
        }),
    )
    .await
}

/// Calls B through `client`; the outcome as text (errors included, never a panic).
async fn call_b<S>(client: &mut S, b: SocketAddr) -> String
where
    S: Service<Request<Body>, Response = Response<Incoming>>,
    S::Error: std::fmt::Display,
{
    let req = Request::get(format!("http://{b}/")).body(Body::default()).unwrap();
    let svc = match client.ready().await {
        Ok(svc) => svc,
        Err(e) => return format!("not ready: {e}"),
    };
    match svc.call(req).await {
        Ok(resp) => body_text(resp).await,
        Err(e) => format!("error: {e}"),
    }
}

/// What service A's handlers share.
struct Clients {
    b: SocketAddr,
    startup: Buffered,
    lazy: OnceLock<Buffered>,
    pooled: ClientBackup<Pooled, Recover>,
}

impl Clients {
    /// Built at startup, outside any request.
    fn new(b: SocketAddr) -> Clients {
        let startup = ClientBackupLayer::new(recover as Recover)
            .layer(Buffer::new(Client::builder(NoSessionExecutor::new()).build_http::<Body>(), 64));
        let pooled = ClientBackupLayer::new(recover as Recover)
            .layer(Client::builder(NoSessionExecutor::new()).build_http::<Body>());
        Clients { b, startup, lazy: OnceLock::new(), pooled }
    }

    /// The lazily built buffered client, with the safe pattern.
    fn lazy(&self) -> Buffered {
        self.lazy
            .get_or_init(|| {
                let (svc, worker) = Buffer::pair(Client::builder(NoSessionExecutor::new()).build_http::<Body>(), 64);
                localsession_tokio::spawn_without_session(worker);
                ClientBackupLayer::new(recover as Recover).layer(svc)
            })
            .clone()
    }
}

/// Service A's handler: the identity as seen by deep code, an explicit spawn, a blocking task,
/// and service B (through the client the request names in `x-client`).
async fn handle_a(clients: Arc<Clients>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let mut seen = vec![deep_identity()];
    tokio::task::yield_now().await;
    seen.push(match localsession_tokio::spawn(async { deep_identity() }).await {
        Ok(s) => s,
        Err(e) => format!("spawn failed: {e}"),
    });
    seen.push(match localsession_tokio::spawn_blocking(deep_identity).await {
        Ok(s) => s,
        Err(e) => format!("spawn_blocking failed: {e}"),
    });
    let b = clients.b;
    let downstream = match req.headers().get("x-client").and_then(|v| v.to_str().ok()) {
        Some("startup") => call_b(&mut clients.startup.clone(), b).await,
        Some("lazy") => call_b(&mut clients.lazy(), b).await,
        Some("pooled") => call_b(&mut clients.pooled.clone(), b).await,
        other => format!("unknown client {other:?}"),
    };
    seen.push(downstream);
    seen.push(deep_identity()); // after all the awaits
    Ok(Response::new(Body::from(seen.join(";"))))
}

/// Sends one request to A as tenant `t{i}`, request id `r{i}`, through client arrangement
/// `client`; the response body.
async fn send(driver: &Client<HttpConnector, Body>, a: SocketAddr, i: usize, client: &'static str) -> String {
    let req = Request::get(format!("http://{a}/"))
        .header("rpc-persist-tenant", HeaderValue::from_str(&format!("t{i}")).unwrap())
        .header("rpc-persist-req", HeaderValue::from_str(&format!("r{i}")).unwrap())
        .header("x-client", client)
        .body(Body::default())
        .unwrap();
    match driver.request(req).await {
        Ok(resp) => body_text(resp).await,
        Err(e) => format!("request failed: {e:?}"),
    }
}

/// 1000 concurrent requests, each with its own tenant and request id, over the three client
/// arrangements; no request may see or send another's identity, and the live-session count
/// returns to where it was.
fn concurrent_requests_never_see_or_send_another_identity(workers: usize) {
    let _serial = serial();
    runtime(workers).block_on(async {
        let live_before = localsession_std::live_sessions();
        #[cfg(tokio_unstable)]
        let implicit_before = localsession_tokio::implicit_task_sessions();
        let received = Arc::new(Mutex::new(Vec::new()));
        let b = serve_echo(received.clone()).await;
        let clients = Arc::new(Clients::new(b));
        let a =
            serve(ServerBackupLayer::new(), service_fn(move |req: Request<Incoming>| handle_a(clients.clone(), req)))
                .await;

        let driver = Client::builder(TokioExecutor::new()).build_http::<Body>();
        let mut load = tokio::task::JoinSet::new();
        for i in 0..REQUESTS {
            let driver = driver.clone();
            let client = ["startup", "lazy", "pooled"][i % 3];
            load.spawn(async move { (i, client, send(&driver, a, i, client).await) });
        }
        let mut wrong = Vec::new();
        let mut foreign = 0;
        let deadline = tokio::time::Instant::now() + LOAD_CAP;
        for _ in 0..REQUESTS {
            let next = tokio::time::timeout_at(deadline, load.join_next()).await;
            let (i, client, body) = next.expect("the load did not finish in time").unwrap().unwrap();
            let mine = format!("t{i}/r{i}");
            let seen: Vec<&str> = body.split(';').collect();
            if seen.len() != 5 || seen.iter().any(|s| *s != mine) {
                // Another request's identity looks like `t<digits>/r<digits>` but not ours.
                foreign += seen.iter().filter(|s| s.starts_with('t') && s.contains("/r") && **s != mine).count();
                if wrong.len() < 5 {
                    wrong.push(format!("request {i} via {client}: {body}"));
                }
            }
        }
        assert!(wrong.is_empty(), "{foreign} foreign identities; first wrong responses: {wrong:#?}");
        assert_eq!(foreign, 0);
        // B received each request's identity exactly once (nothing sent twice, nothing lost).
        let mut got = received.lock().unwrap().clone();
        got.sort();
        let mut want: Vec<String> = (0..REQUESTS).map(|i| format!("t{i}/r{i}")).collect();
        want.sort();
        assert_eq!(got, want);

        // Every session bound during the load is unbound again (blocking threads unbind
        // when their closure returns; give them a bounded moment).
        let start = Instant::now();
        while localsession_std::live_sessions() != live_before && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(localsession_std::live_sessions(), live_before, "sessions still bound after the load");
        assert!(live_before.is_some(), "the `live-count` feature of localsession-std is enabled for tests");
        #[cfg(tokio_unstable)]
        {
            // No task kept a session: connection tasks and buffer workers were spawned with none.
            let start = Instant::now();
            while localsession_tokio::implicit_task_sessions() > implicit_before
                && start.elapsed() < Duration::from_secs(5)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let after = localsession_tokio::implicit_task_sessions();
            assert!(after <= implicit_before, "{after} tasks hold a session after the load ({implicit_before} before)");
        }
    });
}

#[test]
fn concurrent_requests_never_see_or_send_another_identity_2_workers() {
    concurrent_requests_never_see_or_send_another_identity(2);
}

#[test]
fn concurrent_requests_never_see_or_send_another_identity_4_workers() {
    concurrent_requests_never_see_or_send_another_identity(4);
}

/// Service A with a buffer built lazily inside its handler the UNSAFE way (`Buffer::new`: its
/// worker is spawned with a plain `tokio::spawn`, which in implicit mode inherits the first
/// request's session), with `ClientBackupLayer` inside the buffer. Each handler returns what
/// its downstream call gave.
#[cfg(tokio_unstable)]
async fn serve_unsafe_lazy_buffer(layer: ServerBackupLayer, b: SocketAddr) -> SocketAddr {
    type Inner = ClientBackup<Pooled, Recover>;
    type Unsafe = Buffer<Request<Body>, <Inner as Service<Request<Body>>>::Future>;
    let cell: Arc<OnceLock<Unsafe>> = Arc::default();
    serve(
        layer,
        service_fn(move |_req: Request<Incoming>| {
            let cell = cell.clone();
            async move {
                let mut client = cell
                    .get_or_init(|| {
                        let client = ClientBackupLayer::new(recover as Recover)
                            .layer(Client::builder(NoSessionExecutor::new()).build_http::<Body>());
                        Buffer::new(client, 16) // the hazard: the worker captures this request's session
                    })
                    .clone();
                let req = Request::get(format!("http://{b}/")).body(Body::default()).unwrap();
                let out = match client.ready().await {
                    Err(e) => format!("not ready: {e}"),
                    Ok(svc) => match svc.call(req).await {
                        Ok(resp) => body_text(resp).await,
                        Err(e) => match e.downcast_ref::<localsession_tokio::tower::ClientBackupError<
                            hyper_util::client::legacy::Error,
                        >>() {
                            Some(localsession_tokio::tower::ClientBackupError::EndedSession(_)) => {
                                format!("EndedSession: {e}")
                            }
                            _ => format!("other error: {e}"),
                        },
                    },
                };
                Ok::<_, Infallible>(Response::new(Body::from(out)))
            }
        }),
    )
    .await
}

/// The hazard is caught loudly. The worker of a `Buffer` built inside a handler is a shared
/// worker (implicit mode knows `Buffer::new`'s spawn site): it never carries the request's
/// session, but one ended from the start, so the client layer inside it refuses every call —
/// the first request's own too — instead of sending one request's tenant for another. (Before,
/// the first request's call went out and the second was refused only once the first had
/// ended; a request arriving while the first was in flight went out with the first's tenant:
/// `adversary_client.rs`, `naive_lazy_buffer_*`.)
#[cfg(tokio_unstable)]
#[test]
fn a_buffer_built_unsafely_inside_a_handler_fails_with_ended_session() {
    let _serial = serial();
    runtime(2).block_on(async {
        let received = Arc::new(Mutex::new(Vec::new()));
        let b = serve_echo(received.clone()).await;
        let a = serve_unsafe_lazy_buffer(ServerBackupLayer::new(), b).await;
        let driver = Client::builder(TokioExecutor::new()).build_http::<Body>();
        for request in 1..=2 {
            let got = tokio::time::timeout(LOAD_CAP, send(&driver, a, request, "-")).await.unwrap();
            assert!(got.starts_with("EndedSession: "), "request {request} got {got:?}");
            assert!(got.contains("outlived the request") && got.contains("shared worker"), "{got}");
            assert!(got.contains("spawn_without_session"), "{got}");
        }
        assert!(received.lock().unwrap().is_empty(), "B must never get a tenant through the naive buffer");
    });
}

/// Without the request lifecycle (the backup kept alive past the response) the same leftover
/// worker used to send the FIRST request's tenant on behalf of the second — the leak this suite
/// guards against. The shared worker carries no request's session, so the lifecycle is no
/// longer what stops it.
#[cfg(tokio_unstable)]
#[test]
fn without_the_request_lifecycle_the_leftover_worker_sends_the_first_tenant() {
    let _serial = serial();
    runtime(2).block_on(async {
        let received = Arc::new(Mutex::new(Vec::new()));
        let b = serve_echo(received.clone()).await;
        let a = serve_unsafe_lazy_buffer(ServerBackupLayer::new().keep_alive(), b).await;
        let driver = Client::builder(TokioExecutor::new()).build_http::<Body>();
        let first = tokio::time::timeout(LOAD_CAP, send(&driver, a, 1, "-")).await.unwrap();
        let second = tokio::time::timeout(LOAD_CAP, send(&driver, a, 2, "-")).await.unwrap();
        assert_ne!((first.as_str(), second.as_str()), ("t1/r1", "t1/r1"), "the leak this suite guards against");
        for got in [&first, &second] {
            assert!(got.starts_with("EndedSession: ") && got.contains("shared worker"), "{got}");
        }
        assert!(received.lock().unwrap().is_empty(), "B must never get a tenant through the naive buffer");
    });
}
